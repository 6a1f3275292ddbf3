"""Writes the study report: tables, Scott-Knott ESD groups, figures.

  dlfix report --workdir=runs/study_digits
  (or python -m experiments.report --workdir=runs/study_digits)

Reads ``DIR/results.jsonl`` (read-only; safe while a study still runs) and
writes ``DIR/report/`` (``report.md``, CSVs, PNGs; see
``dlfix_jax.report``). A missing or empty store is an error (exit status 2).
"""

import sys

from absl import app, flags, logging

from dlfix_jax import report
from dlfix_jax.report import tables

_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Study directory holding results.jsonl.")
_OUT = flags.DEFINE_string("out_dir", None,
                           "Output directory (default: WORKDIR/report).")
_SK_VERSION = flags.DEFINE_enum(
    "sk_version", "p", ["p", "np", "o"],
    "Scott-Knott ESD variant: p = parametric (Cohen's d), np = "
    "non-parametric (Kruskal-Wallis, Cliff's delta), o = original test.")
_SK_ALPHA = flags.DEFINE_float("sk_alpha", 0.05,
                               "Significance level (versions o, or p with "
                               "--sk_test=chisq).")
_SK_TEST = flags.DEFINE_enum(
    "sk_test", None, ["chisq"],
    "Also require the original Scott-Knott chi-square test to split (p).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        result = report.write_report(
            _WORKDIR.value, out_dir=_OUT.value, sk_version=_SK_VERSION.value,
            sk_alpha=_SK_ALPHA.value, sk_test=_SK_TEST.value)
    except tables.ReportError as e:
        print(f"report: error: {e}", file=sys.stderr)
        sys.exit(2)
    logging.info("report of %d records: %d files in %s", result["records"],
                 len(result["files"]), result["out_dir"])
    print(f"{result['out_dir']}/report.md")


if __name__ == "__main__":
    app.run(main)
