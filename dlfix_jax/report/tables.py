"""The study's tables from the results store: loading, cell summaries, CSV.

Reads ``DIR/results.jsonl`` (schema in :mod:`dlfix_jax.study.store`; one
record per dataset/model/approach/seed) **read-only**, so it can run while a
study is still appending:

* the newest record per ``key`` wins (``--force`` appends a newer one);
* the store's own reader (:func:`dlfix_jax.study.store.merged_records`)
  ignores a trailing line without its newline (a torn write in progress)
  and skips a line that is not a JSON record with a key and a known
  ``status``, with a warning naming the line;
* a record without ``dataset``/``approach``/``seed`` is skipped with a
  warning naming its key.

Tables (reference ``approaches.md`` §5): rows = approaches (the study's
abbreviation from the record's ``abbrev``, else the approach name; study
order first), columns = datasets (``dataset/model`` when a dataset was run
with several models). A cell summarises the records of all seeds:

* all ``ok``: ``mean ± std`` over seeds (sample std, ddof = 1; the mean
  alone with one seed); "—" when the metric is null for every seed (AAOD
  without groups, ⇑ASR against a zero baseline);
* all one non-ok status: ``UNADAPTABLE`` / ``FAILURE`` / ``CORRUPTED``;
* mixed: the non-ok statuses with their counts and a summary of the ok
  seeds, e.g. ``FAILURE (2/3); ok: 97.10``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from dlfix_jax import fileio
from dlfix_jax.report import scott_knott
from dlfix_jax.study import store as store_lib  # no JAX import

RESULTS_FILE = store_lib.FILENAME
STATUSES = store_lib.STATUSES
STATUS_LABELS = {"unadaptable": "UNADAPTABLE", "failure": "FAILURE",
                 "corrupted": "CORRUPTED"}
NA = "—"
STUDY_ORDER = ("AP", "ET", "FM", "DR", "HUDD", "HD", "HR", "3M", "RA", "AR",
               "CARE", "NR", "IR", "DTR", "GM", "VERE", "IN")
DATASET_ORDER = ("mnist", "digits", "fashion_mnist", "utkface", "cifar10",
                 "cifar10s", "imagenet")
ENSEMBLE_NAMES = ("NO", "SV", "HV", "UP", "UD", "US")


class ReportError(ValueError):
    """The results store cannot be turned into a report."""


@dataclasses.dataclass(frozen=True)
class Metric:
    """A reported metric: record field, table label, format, orientation."""

    key: str
    label: str
    digits: int
    higher_is_better: bool
    is_time: bool = False

    def fmt(self, value: float) -> str:
        if self.is_time:
            return format_duration(value)
        return f"{value:.{self.digits}f}"


METRICS = {m.key: m for m in (
    Metric("acc", "ACC", 2, True),
    Metric("d_acc", "⇑ACC", 2, True),
    Metric("rr", "RR", 2, True),
    Metric("asr", "ASR", 2, False),
    Metric("d_asr", "⇑ASR", 2, True),
    Metric("aaod", "AAOD", 4, False),
    Metric("d_aaod", "⇑AAOD", 2, True),
    Metric("nfr", "NFR", 2, False),
    Metric("time_s", "TIME", 0, False, is_time=True),
    Metric("time_compile_s", "COMPILE", 0, False, is_time=True),
    Metric("time_execute_s", "EXECUTE", 0, False, is_time=True),
)}
TABLES = {
    "table1": ("Table 1: ACC, ⇑ACC, RR", ("acc", "d_acc", "rr")),
    "table2": ("Table 2: ASR, ⇑ASR, AAOD, ⇑AAOD, NFR",
               ("asr", "d_asr", "aaod", "d_aaod", "nfr")),
    "table3": ("Table 3: TIME (wall-clock of one fix; compile / execute)",
               ("time_s", "time_compile_s", "time_execute_s")),
}
SK_METRICS = ("acc", "rr", "asr", "aaod", "nfr", "time_s")
ENSEMBLE_METRICS = ("acc", "asr", "aaod", "nfr")


def format_duration(seconds: float) -> str:
    """The paper's style: ``17s``, ``9m05s``, ``13h46m`` (``3.2s`` < 10 s)."""
    if seconds is None or not math.isfinite(seconds):
        return NA
    s = max(float(seconds), 0.0)
    if s < 10:
        return f"{s:.1f}s"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


# --------------------------------------------------------------------------
# Loading.

def load_records(workdir: str) -> list[dict]:
    """The newest record per key of the study in ``workdir``: its
    ``results.jsonl`` merged with the shards ``results.p<k>.jsonl`` of a
    multi-process study that has not merged them yet (a running or killed
    one), by :func:`dlfix_jax.study.store.merged_records` (the store's one
    reader: a torn trailing line ignored, invalid lines skipped with a
    warning naming the line; a shard's record supersedes the main
    file's). Each record must also
    name its dataset, approach and seed (else it is skipped with a
    warning).

    Raises:
      ReportError: no store at all, no usable record, or a key recorded by
        two shards (two processes computed one cell: rerun ``dlfix study``,
        whose merge keeps the newest and logs the duplicate).
    """
    path = os.path.join(workdir, RESULTS_FILE)
    if not os.path.isfile(path) and not store_lib.shard_paths(workdir):
        raise ReportError(f"no results store at {path}; run "
                          f"`python -m experiments.run_study --workdir="
                          f"{workdir}` first")
    merged = store_lib.merged_records(workdir)
    for key, files in sorted(merged["duplicates"].items()):
        raise ReportError(
            f"key {key!r} is recorded by two shards ({' and '.join(files)}); "
            f"run `dlfix study` on {workdir} again to merge the shards (it "
            f"keeps the newest record and logs the duplicate)")
    if merged["shard_records"]:
        logging.info("%s: read unmerged shards of a multi-process study (%d "
                     "records)", workdir, merged["shard_records"])
    out = []
    for key, rec in merged["records"].items():
        why = _invalid_reason(rec)
        if why:
            logging.warning("%s: skipping the record of %r: %s", workdir,
                            key, why)
            continue
        out.append(rec)
    if not out:
        raise ReportError(f"the results store {path} holds no records")
    return out


def _invalid_reason(rec: Mapping) -> str | None:
    """What a record the store accepts still lacks for a report."""
    missing = [k for k in ("dataset", "approach", "seed")
               if rec.get(k) is None]
    if missing:
        return f"record lacks {missing}"
    for field in ("metrics", "ensembles"):
        if rec.get(field) is not None and not isinstance(rec[field], dict):
            return f"{field!r} must be an object"
    return None


# --------------------------------------------------------------------------
# The study grid.

def row_label(rec: Mapping, split_variants: bool = False) -> str:
    """The row of a record: the approach's abbreviation, and with
    ``split_variants`` its cell variant (``"AR @1a2b3c"``) so that cells
    made with different fixer configs are never pooled into one row."""
    label = str(rec.get("abbrev") or rec["approach"])
    if split_variants and rec.get("variant"):
        label += f" @{str(rec['variant'])[:6]}"
    return label


def multi_variant(records: Sequence[Mapping]) -> bool:
    """True when some approach has records of more than one variant."""
    seen: dict[str, set] = {}
    for r in records:
        seen.setdefault(row_label(r), set()).add(r.get("variant"))
    return any(len(v) > 1 for v in seen.values())


def _ordered(items: Iterable[str], preferred: Sequence[str]) -> list[str]:
    items = list(dict.fromkeys(items))
    rank = {k.lower(): i for i, k in enumerate(preferred)}
    known = sorted((i for i in items if i.lower() in rank),
                   key=lambda i: rank[i.lower()])
    return known + [i for i in items if i.lower() not in rank]


def mixed_execution(records: Sequence[Mapping]) -> str | None:
    """``"sequential on cpu: seed 2; vmap on cpu: seeds 0, 1"`` when the
    ok records of one cell ran under more than one (seed mode, backend),
    else None. Records without ``execution.mode`` or ``execution.backend``
    (written before the backend was recorded) are not compared."""
    groups: dict[str, list[int]] = {}
    for r in records:
        ex = r.get("execution")
        if r.get("status") != "ok" or not isinstance(ex, Mapping) \
                or "mode" not in ex or "backend" not in ex:
            continue
        how = f"{ex['mode']} on {ex['backend']}"
        groups.setdefault(how, []).append(int(r["seed"]))
    if len(groups) < 2:
        return None
    return "; ".join(
        f"{how}: seed{'s' if len(s) > 1 else ''} "
        + ", ".join(map(str, sorted(s))) for how, s in sorted(groups.items()))


@dataclasses.dataclass
class Grid:
    """Records arranged by (row = approach, column = dataset[/model])."""

    rows: list[str]
    cols: list[str]
    cells: dict[tuple[str, str], list[dict]]
    seeds: list[int]

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> "Grid":
        models: dict[str, set] = {}
        for r in records:
            models.setdefault(r["dataset"], set()).add(r.get("model"))

        def col(r):
            d = r["dataset"]
            return f"{d}/{r.get('model')}" if len(models[d]) > 1 else d

        split = multi_variant(records)
        if split:
            logging.warning(
                "the records hold cells made with different configs of one "
                "approach; they are reported as separate rows "
                "(approach @variant, see each record's fixer_config)")

        def label(r):
            return row_label(r, split)

        cells: dict[tuple[str, str], list[dict]] = {}
        for r in records:
            cells.setdefault((label(r), col(r)), []).append(r)
        for (row, c), recs in cells.items():
            recs.sort(key=lambda r: r["seed"])
            mixed = mixed_execution(recs)
            if mixed:
                logging.warning("%s / %s: its seeds ran under different "
                                "executions (%s); a fixer's round-off can "
                                "differ between them", row, c, mixed)
        datasets = _ordered([r["dataset"] for r in records], DATASET_ORDER)
        cols = []
        for d in datasets:
            cols += sorted({col(r) for r in records if r["dataset"] == d})
        rows = _ordered([label(r) for r in records], STUDY_ORDER)
        seeds = sorted({int(r["seed"]) for r in records})
        return cls(rows=rows, cols=cols, cells=cells, seeds=seeds)

    def records(self, row: str, col: str) -> list[dict]:
        return self.cells.get((row, col), [])


def metric_value(rec: Mapping, key: str) -> float | None:
    """A finite float metric of an ``ok`` record, else None."""
    if rec.get("status") != "ok":
        return None
    v = (rec.get("metrics") or {}).get(key)
    if v is None or isinstance(v, bool):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


@dataclasses.dataclass(frozen=True)
class CellSummary:
    """One table cell: status counts and the ok seeds' statistics."""

    n_total: int
    n_ok: int
    status_counts: dict[str, int]
    values: tuple[float, ...]
    mean: float | None
    std: float | None
    value: str
    status_text: str

    @property
    def display(self) -> str:
        """The cell text (see the module docstring)."""
        if not self.n_total:
            return ""
        if not self.status_text:
            return self.value
        if not self.n_ok:
            return self.status_text
        return f"{self.status_text}; ok: {self.value}"

    @property
    def status(self) -> str:
        """"ok", a non-ok status, "mixed", or "empty" (no records)."""
        if not self.n_total:
            return "empty"
        if len(self.status_counts) > 1:
            return "mixed"
        return next(iter(self.status_counts))


def summarise(records: Sequence[Mapping], metric: Metric) -> CellSummary:
    """Summary of one metric over the seeds' records of one cell."""
    counts: dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    n_total = len(records)
    n_ok = counts.get("ok", 0)
    vals = [v for v in (metric_value(r, metric.key) for r in records)
            if v is not None]
    mean = float(np.mean(vals)) + 0.0 if vals else None  # no "-0.00"
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else (
        0.0 if vals else None)
    if vals:
        value = metric.fmt(mean)
        if len(vals) > 1:
            value += f" ± {metric.fmt(std)}"
    else:
        value = NA
    bad = [(STATUS_LABELS[st], c) for st in STATUSES[1:]
           if (c := counts.get(st, 0))]
    if n_ok == 0 and len(bad) == 1:
        status_text = bad[0][0]
    else:
        status_text = ", ".join(f"{lab} ({c}/{n_total})" for lab, c in bad)
    return CellSummary(n_total=n_total, n_ok=n_ok, status_counts=counts,
                       values=tuple(vals), mean=mean, std=std, value=value,
                       status_text=status_text)


# --------------------------------------------------------------------------
# Tables.

@dataclasses.dataclass(frozen=True)
class Table:
    """A study table: wide display rows plus long numeric rows."""

    name: str
    title: str
    metrics: tuple[str, ...]
    header: list[str]
    rows: list[list[str]]
    cols: list[str]
    summaries: dict[tuple[str, str, str], CellSummary]

    def long_rows(self) -> list[list[Any]]:
        out = []
        for (row, col, m), s in self.summaries.items():
            out.append([row, col, METRICS[m].label, s.status, s.n_total,
                        s.n_ok, _num(s.mean), _num(s.std), s.display])
        return out

    LONG_HEADER = ["approach", "dataset", "metric", "status", "n_records",
                   "n_ok", "mean", "std", "display"]


def _num(v):
    return "" if v is None else repr(float(v))


def build_table(grid: Grid, name: str) -> Table:
    """Table ``name`` (``table1``/``table2``/``table3``) of the grid."""
    title, metrics = TABLES[name]
    header = ["approach"] + [f"{c} {METRICS[m].label}" for c in grid.cols
                             for m in metrics]
    rows, summaries = [], {}
    for row in grid.rows:
        line = [row]
        for col in grid.cols:
            recs = grid.records(row, col)
            for m in metrics:
                s = summarise(recs, METRICS[m])
                summaries[(row, col, m)] = s
                line.append(s.display)
        rows.append(line)
    return Table(name=name, title=title, metrics=tuple(metrics),
                 header=header, rows=rows, cols=list(grid.cols),
                 summaries=summaries)


def compact_markdown(table: Table) -> str:
    """Markdown with one column per dataset, cells ``m1 / m2 / ...``."""
    labels = " / ".join(METRICS[m].label for m in table.metrics)
    header = ["approach"] + table.cols
    rows = []
    for row in dict.fromkeys(r for r, _, _ in table.summaries):
        line = [row]
        for col in table.cols:
            sums = [table.summaries[(row, col, m)] for m in table.metrics]
            first = sums[0]
            values = " / ".join(x.value for x in sums)
            if not first.n_total:
                line.append("")
            elif not first.status_text:
                line.append(values)
            elif not first.n_ok:
                line.append(first.status_text)
            else:
                line.append(f"{first.status_text}; ok: {values}")
        rows.append(line)
    return f"Cells: {labels}\n\n" + markdown_table(header, rows)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]
                   ) -> str:
    def esc(v):
        return str(v).replace("|", "\\|").replace("\n", " ")
    out = ["| " + " | ".join(esc(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(esc(v) for v in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------
# Scott-Knott ESD groups.

@dataclasses.dataclass(frozen=True)
class SKTable:
    header: list[str]
    rows: list[list[str]]
    results: dict[str, scott_knott.SKResult | None]
    observations: dict[str, dict[str, list[float]]]


def sk_observations(grid: Grid, metric: str) -> dict[str, list[float]]:
    """Approach -> the metric's per-dataset, per-seed values (ok records)."""
    out: dict[str, list[float]] = {}
    for row in grid.rows:
        vals = [v for col in grid.cols for r in grid.records(row, col)
                if (v := metric_value(r, metric)) is not None]
        if vals:
            out[row] = vals
    return out


def build_sk_table(grid: Grid, *, metrics: Sequence[str] = SK_METRICS,
                   version: str = "p", alpha: float = 0.05,
                   test: str | None = None) -> SKTable:
    """Group letters per approach and metric ("-": no observations)."""
    results, obs_all = {}, {}
    for m in metrics:
        obs = sk_observations(grid, m)
        obs_all[m] = obs
        results[m] = (scott_knott.sk_esd(
            obs, version=version, alpha=alpha, test=test,
            higher_is_better=METRICS[m].higher_is_better) if obs else None)
    header = ["approach"] + [METRICS[m].label for m in metrics]
    rows = []
    for row in grid.rows:
        line = [row]
        for m in metrics:
            res = results[m]
            line.append(res.letters[row] if res and row in res.letters
                        else "-")
        rows.append(line)
    return SKTable(header=header, rows=rows, results=results,
                   observations=obs_all)


# --------------------------------------------------------------------------
# Ensembles (the discussion figure).

def ensemble_values(grid: Grid) -> dict[tuple[str, str],
                                        dict[str, dict[str, list[float]]]]:
    """(row, col) -> combination -> metric -> per-seed values (ok records)."""
    out = {}
    for (row, col), recs in grid.cells.items():
        combos: dict[str, dict[str, list[float]]] = {}
        for r in recs:
            if r["status"] != "ok" or not r.get("ensembles"):
                continue
            for name, ms in r["ensembles"].items():
                for m, v in (ms or {}).items():
                    if v is None or isinstance(v, bool):
                        continue
                    v = float(v)
                    if math.isfinite(v):
                        combos.setdefault(name, {}).setdefault(m, []).append(v)
        if combos:
            ordered = {n: combos[n] for n in _ordered(combos, ENSEMBLE_NAMES)}
            out[(row, col)] = ordered
    return dict(sorted(out.items(), key=lambda kv: (
        grid.cols.index(kv[0][1]), grid.rows.index(kv[0][0]))))


def ensemble_long_rows(values) -> list[list[Any]]:
    rows = []
    for (row, col), combos in values.items():
        for name, ms in combos.items():
            for m, vals in ms.items():
                std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
                rows.append([row, col, name, m, len(vals),
                             repr(float(np.mean(vals))), repr(std)])
    return rows


ENSEMBLE_HEADER = ["approach", "dataset", "combination", "metric", "n",
                   "mean", "std"]


# --------------------------------------------------------------------------
# Atomic writes.

def write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (:mod:`dlfix_jax.fileio`)."""
    fileio.atomic_write_text(path, text)


def write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (:mod:`dlfix_jax.fileio`)."""
    fileio.atomic_write_bytes(path, data)


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write_csv(path: str, header, rows) -> None:
    write_text(path, csv_text(header, rows))
