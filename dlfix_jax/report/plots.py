"""PNG figures of the report: coloured tables, box plots, the discussion.

Everything draws on :class:`matplotlib.figure.Figure` with the Agg canvas
(no pyplot, no global backend switch, no display needed) and is written
atomically (rendered to memory, then temp file + ``os.replace``).

Colours follow the paper's tables: each column is coloured by its own
values, green = better and red = worse given the metric's orientation;
cells without a value (UNADAPTABLE / FAILURE / CORRUPTED, or no metric) are
grey.
"""

from __future__ import annotations

import io
import math
from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dlfix_jax.report import tables

CMAP = "RdYlGn"
GREY = "#d9d9d9"
DPI = 120


def save_png(fig: Figure, path: str) -> None:
    """Renders ``fig`` to PNG bytes and writes them atomically."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    tables.write_bytes(path, buf.getvalue())


def column_colours(values: Sequence[Sequence[float | None]],
                   higher_is_better: Sequence[bool]) -> list[list]:
    """RGBA per cell, each column scaled to its own min..max (grey if None).

    Args:
      values: rows x columns of numbers (None = no value).
      higher_is_better: one flag per column.
    """
    cmap = colormaps[CMAP]
    n_rows = len(values)
    n_cols = len(higher_is_better)
    out = [[GREY] * n_cols for _ in range(n_rows)]
    for j in range(n_cols):
        col = [values[i][j] for i in range(n_rows)]
        finite = [v for v in col if v is not None and math.isfinite(v)]
        if not finite:
            continue
        lo, hi = min(finite), max(finite)
        for i, v in enumerate(col):
            if v is None or not math.isfinite(v):
                continue
            t = 0.5 if hi == lo else (v - lo) / (hi - lo)
            if not higher_is_better[j]:
                t = 1.0 - t
            # Keep away from the darkest ends so the text stays readable.
            out[i][j] = cmap(0.15 + 0.7 * t)
    return out


def table_png(path: str, title: str, header: Sequence[str],
              rows: Sequence[Sequence[str]],
              colours: Sequence[Sequence] | None = None) -> None:
    """A table image; ``colours`` = rows x (len(header) − 1) cell colours."""
    n_cols = len(header)
    widths = [max(len(str(header[j]).split("\n")[-1]),
                  max((len(str(r[j])) for r in rows), default=0))
              for j in range(n_cols)]
    fig_w = max(4.0, 0.09 * sum(max(w, 4) for w in widths) + 0.5)
    fig_h = 0.9 + 0.26 * (len(rows) + 2)
    fig = Figure(figsize=(fig_w, fig_h))
    ax = fig.add_subplot(111)
    ax.axis("off")
    ax.set_title(title, fontsize=10, loc="left")
    cell_colours = None
    if colours is not None:
        cell_colours = [["white"] + list(c) for c in colours]
    total = float(sum(max(w, 4) for w in widths))
    text = [list(map(str, r)) for r in rows] or [[""] * n_cols]
    tab = ax.table(cellText=text, colLabels=list(header),
                   cellColours=cell_colours if rows else None,
                   colWidths=[max(w, 4) / total for w in widths],
                   loc="upper left", cellLoc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(7)
    tab.scale(1.0, 1.25)
    for (i, _), cell in tab.get_celld().items():
        if i == 0:
            cell.set_facecolor("#eeeeee")
            cell.set_text_props(weight="bold")
            cell.set_height(cell.get_height() * 1.8)
    save_png(fig, path)


def study_table_png(path: str, table: "tables.Table") -> None:
    """The coloured PNG of a study table (one column per dataset x metric)."""
    header = ["approach"] + [f"{c}\n{tables.METRICS[m].label}"
                             for c in table.cols for m in table.metrics]
    rows = [[r[0]] + r[1:] for r in table.rows]
    values, orient = [], []
    for c in table.cols:
        for m in table.metrics:
            orient.append(tables.METRICS[m].higher_is_better)
    for r in table.rows:
        line = []
        for c in table.cols:
            for m in table.metrics:
                s = table.summaries[(r[0], c, m)]
                line.append(s.mean if s.n_ok == s.n_total and s.n_total
                            else None)
        values.append(line)
    table_png(path, table.title, header, rows, column_colours(values, orient))


def sk_table_png(path: str, title: str, sk: "tables.SKTable") -> None:
    """The group-letter table, coloured by group rank (a = green)."""
    values = []
    for r in sk.rows:
        line = []
        for j, m in enumerate(sk.results):
            res = sk.results[m]
            rank = res.ranks.get(r[0]) if res else None
            line.append(-float(rank) if rank is not None else None)
        values.append(line)
    colours = column_colours(values, [True] * len(sk.results))
    table_png(path, title, sk.header, sk.rows, colours)


def box_plot(path: str, title: str,
             data: Mapping[str, Mapping[str, Sequence[float]]],
             *, ylabel: str = "") -> None:
    """One panel per column (dataset), one box per row (approach).

    Args:
      data: dataset -> approach -> values across seeds.
    """
    panels = [(k, v) for k, v in data.items() if v]
    if not panels:
        panels = [("(no data)", {})]
    n = len(panels)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    width = max(4.5, max(0.45 * len(v) + 1.5 for _, v in panels))
    fig = Figure(figsize=(width * ncols, 3.4 * nrows))
    for idx, (name, groups) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, idx + 1)
        labels = list(groups)
        if labels:
            ax.boxplot([np.asarray(groups[k], float) for k in labels],
                       tick_labels=labels, showmeans=True)
            ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        else:
            ax.text(0.5, 0.5, "no values", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


def discussion_png(path: str, title: str,
                   combos: Mapping[str, Mapping[str, Sequence[float]]],
                   metrics: Sequence[str] = tables.ENSEMBLE_METRICS) -> None:
    """The study's discussion figure: per metric, one box per combination.

    Args:
      combos: combination (NO/SV/HV/UP/UD/US) -> metric -> seed values.
    """
    fig = Figure(figsize=(3.2 * len(metrics), 3.3))
    for j, m in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), j + 1)
        labels = [c for c in combos if combos[c].get(m)]
        if labels:
            ax.boxplot([np.asarray(combos[c][m], float) for c in labels],
                       tick_labels=labels, showmeans=True)
        else:
            ax.text(0.5, 0.5, "no values", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_title(tables.METRICS[m].label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
