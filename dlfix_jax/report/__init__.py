"""The study report: tables, Scott-Knott ESD groups and figures.

``write_report(workdir)`` reads ``workdir/results.jsonl`` and writes
``workdir/report/`` (every file atomically):

================================  ===========================================
``report.md``                     everything below, with the tables inline
``table{1,2,3}.csv``              wide tables: rows = approaches, one column
                                  per dataset x metric, cells ``mean ± std``
                                  or a status label (see
                                  :mod:`dlfix_jax.report.tables`)
``table{1,2,3}_long.csv``         the same cells as numbers: approach,
                                  dataset, metric, status, n, mean, std
``table{1,2,3}.png``              the tables coloured per column
``sk_groups.{csv,md,png}``        Scott-Knott ESD letters per approach and
                                  metric (ACC, RR, ASR, AAOD, NFR, TIME)
``sk_details.csv``                rank, letter, centre, n per metric/approach
``box_<metric>.png``              box plots over seeds, one panel per dataset
``ensembles.csv``, ``discussion_<dataset>_<approach>.png``
                                  only when records carry ``ensembles``: box
                                  plots per combination NO/SV/HV/UP/UD/US for
                                  ACC, ASR, AAOD, NFR
================================  ===========================================

Command line: ``python -m experiments.report --workdir=DIR``.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import tempfile
from typing import Any

from dlfix_jax import fileio
from dlfix_jax.report import tables

REPORT_DIR = "report"
BOX_METRICS = ("acc", "rr", "asr", "aaod", "nfr", "time_s")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "x"


def write_report(workdir: str, *, out_dir: str | None = None,
                 sk_version: str = "p", sk_alpha: float = 0.05,
                 sk_test: str | None = None) -> dict[str, Any]:
    """Writes the report of the study in ``workdir``.

    Args:
      workdir: the study directory holding ``results.jsonl``.
      out_dir: where to write (default ``workdir/report``).
      sk_version: Scott-Knott ESD variant: "p" (parametric, Cohen's d; the
        R package's default), "np" (Kruskal-Wallis + Cliff's δ) or "o".
      sk_alpha: significance level (used by "o" and ``sk_test="chisq"``).
      sk_test: None or "chisq" (see :func:`scott_knott.sk_esd`).

    Returns:
      dict with ``out_dir``, ``files`` (written paths) and ``records``.

    Raises:
      tables.ReportError: missing or empty store, malformed records.
    """
    from dlfix_jax.report import plots  # heavy dependency: matplotlib

    records = tables.load_records(workdir)
    out = os.path.abspath(out_dir or os.path.join(workdir, REPORT_DIR))
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    # Everything is written into a temporary sibling directory that replaces
    # ``out`` only when the whole report is done: a failure (a bad argument,
    # a full disk) leaves the previous report, or none, never a partial one.
    tmp = tempfile.mkdtemp(prefix=".tmp-report-", dir=parent)
    try:
        files = _write_all(records, workdir, tmp, sk_version, sk_alpha,
                           sk_test, plots)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = [os.path.join(out, os.path.relpath(f, tmp)) for f in files]
    return {"out_dir": out, "files": files, "records": len(records)}


def _replace_dir(new: str, out: str) -> None:
    """Moves directory ``new`` to ``out``, replacing an old ``out``."""
    os.chmod(new, fileio.DIR_MODE)
    if os.path.isdir(out):
        old = tempfile.mkdtemp(prefix=".old-report-",
                               dir=os.path.dirname(out))
        os.rename(out, os.path.join(old, "r"))
        os.rename(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, out)


def _write_all(records, workdir, out, sk_version, sk_alpha, sk_test,
               plots) -> list[str]:
    """Writes every report file into ``out``; returns their paths."""
    grid = tables.Grid.from_records(records)
    files: list[str] = []

    def path(name):
        p = os.path.join(out, name)
        files.append(p)
        return p

    md = ["# Study report", ""]
    status_counts = collections.Counter(r["status"] for r in records)
    versions = sorted({f"{r.get('version', '?')} @ {r.get('git_rev', '?')}"
                       for r in records})
    md += [f"Source: `{os.path.join(workdir, tables.RESULTS_FILE)}`: "
           f"{len(records)} records (newest per key).", "",
           f"* datasets: {', '.join(grid.cols)}",
           f"* approaches: {', '.join(grid.rows)}",
           f"* seeds: {', '.join(map(str, grid.seeds))}",
           "* statuses: " + ", ".join(f"{k} {status_counts[k]}"
                                      for k in tables.STATUSES
                                      if status_counts[k]),
           f"* library: {', '.join(versions)}", "",
           "Cells are mean ± sample std over seeds; UNADAPTABLE / FAILURE /"
           " CORRUPTED when every seed has that status, `STATUS (k/n); ok: "
           "...` when seeds differ; — = metric not applicable. ⇑ columns "
           "are relative improvements in % (higher is better).", ""]

    for name in tables.TABLES:
        table = tables.build_table(grid, name)
        tables.write_csv(path(f"{name}.csv"), table.header, table.rows)
        tables.write_csv(path(f"{name}_long.csv"), tables.Table.LONG_HEADER,
                         table.long_rows())
        plots.study_table_png(path(f"{name}.png"), table)
        md += [f"## {table.title}", "", tables.compact_markdown(table),
               f"Files: `{name}.csv`, `{name}_long.csv`, `{name}.png`", "",
               f"![{table.title}]({name}.png)", ""]

    sk = tables.build_sk_table(grid, version=sk_version, alpha=sk_alpha,
                               test=sk_test)
    sk_md = tables.markdown_table(sk.header, sk.rows)
    tables.write_csv(path("sk_groups.csv"), sk.header, sk.rows)
    tables.write_text(path("sk_groups.md"), sk_md)
    details = []
    for m, res in sk.results.items():
        if res is None:
            continue
        for name in res.order:
            details.append([tables.METRICS[m].label, name, res.ranks[name],
                            res.letters[name], repr(res.centers[name]),
                            len(sk.observations[m][name])])
    tables.write_csv(path("sk_details.csv"),
                     ["metric", "approach", "rank", "letter", "center", "n"],
                     details)
    title = (f"Scott-Knott ESD groups (version {sk_version!r}"
             + (f", test={sk_test}" if sk_test else "") + ")")
    plots.sk_table_png(path("sk_groups.png"), title, sk)
    arrow = {True: "↑", False: "↓"}
    orient = ", ".join(
        f"{tables.METRICS[m].label} {arrow[tables.METRICS[m].higher_is_better]}"
        for m in tables.SK_METRICS)
    md += ["## Scott-Knott ESD groups", "",
           f"Treatments = approaches; observations = every ok (dataset, seed)"
           f" value of the metric, pooled over datasets. Letter a = best "
           f"group; orientation: {orient}. Variant: `sk_esd(version="
           f"{sk_version!r})` semantics of the R package ScottKnottESD "
           f"(see `dlfix_jax/report/scott_knott.py`); - = no observations.",
           "", sk_md, "Files: `sk_groups.csv`, `sk_groups.md`, "
           "`sk_details.csv`, `sk_groups.png`", "",
           "![Scott-Knott ESD groups](sk_groups.png)", ""]

    md += ["## Box plots over seeds", ""]
    for m in BOX_METRICS:
        metric = tables.METRICS[m]
        data = {}
        for col in grid.cols:
            data[col] = {row: vals for row in grid.rows
                         if (vals := [v for r in grid.records(row, col)
                                      if (v := tables.metric_value(r, m))
                                      is not None])}
        if not any(data.values()):
            continue
        name = f"box_{_slug(metric.label.lower())}.png"
        plots.box_plot(path(name), f"{metric.label} across seeds", data,
                       ylabel=metric.label + (" (s)" if metric.is_time
                                              else ""))
        md += [f"![{metric.label}]({name})", ""]

    ens = tables.ensemble_values(grid)
    if ens:
        tables.write_csv(path("ensembles.csv"), tables.ENSEMBLE_HEADER,
                         tables.ensemble_long_rows(ens))
        md += ["## Post-processing combinations (discussion)", "",
               "NO = fixed model alone, SV = soft voting, HV = hard voting, "
               "UP / UD / US = uncertainty alignment by perturbation, MC "
               "dropout, temperature scaling (Li et al., ICSE 2023; "
               "`dlfix_jax/ensembles.py`). Boxes over seeds.", "",
               "File: `ensembles.csv`", ""]
        for (row, col), combos in ens.items():
            name = f"discussion_{_slug(col)}_{_slug(row)}.png"
            plots.discussion_png(
                path(name), f"Post-processing combinations: {row} on {col}",
                combos)
            md += [f"![{row} on {col}]({name})", ""]

    bad = [r for r in records if r["status"] != "ok"]
    split = tables.multi_variant(records)
    if bad:
        md += ["## Cells that did not produce a model", "",
               tables.markdown_table(
                   ["approach", "dataset", "model", "seed", "status",
                    "reason"],
                   [[tables.row_label(r, split), r["dataset"],
                     r.get("model", ""),
                     r["seed"], tables.STATUS_LABELS[r["status"]],
                     (r.get("reason") or "")[:200]]
                    for r in sorted(bad, key=lambda r: (
                        r["dataset"], tables.row_label(r, split),
                        r["seed"]))])]
    tables.write_text(path("report.md"), "\n".join(md))
    return files
