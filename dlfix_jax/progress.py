"""Progress lines with elapsed time and ETA, and logging helpers.

:class:`Progress` logs ``desc: i/total (p%), elapsed, ETA`` through absl
logging at most every ``every_s`` seconds (and at the end), for any long
host-side loop: training epochs, Apricot's reduced models, search
generations, ensemble evaluation, study cells. The ETA is computed from the
rate of the work done *in this process* (``start`` marks work already done
before, e.g. cells found in a resumed store), so it is right after a resume.
"""

from __future__ import annotations

import time

from absl import logging


def format_duration(s: float | None) -> str:
    """``1h02m03s`` / ``2m03s`` / ``3s``; ``?`` for None or non-finite."""
    if s is None or s != s or s in (float("inf"), float("-inf")):
        return "?"
    s = int(round(max(s, 0.0)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m
                                                else f"{sec}s")


class Progress:
    """Rate-limited progress reporting over ``total`` units of work.

    Args:
      total: units to do in this process.
      desc: label of the lines.
      every_s: minimum seconds between lines (0: every update).
      start: units already done before this process (not counted in the
        rate; shown in the counter as done).
    """

    def __init__(self, total: int, desc: str = "", every_s: float = 30.0,
                 start: int = 0):
        self.total = int(total)
        self.desc = desc
        self.every_s = float(every_s)
        self.start = int(start)
        self.done_n = 0
        self.t0 = time.perf_counter()
        self._last = self.t0

    def line(self, extra: float | str | None = None) -> str:
        el = time.perf_counter() - self.t0
        left = max(self.total - self.done_n, 0)
        eta = el / self.done_n * left if self.done_n else None
        shown = self.start + self.done_n
        whole = self.start + self.total
        pct = 100.0 * shown / whole if whole else 100.0
        tail = ""
        if isinstance(extra, float):
            tail = f", loss {extra:.4f}"
        elif extra:
            tail = f", {extra}"
        return (f"{self.desc}: {shown}/{whole} ({pct:.0f}%), elapsed "
                f"{format_duration(el)}, ETA {format_duration(eta)}{tail}")

    def update(self, done: int, extra: float | str | None = None,
               force: bool = False) -> None:
        """Sets the units done in this process; logs if due."""
        self.done_n = int(done)
        now = time.perf_counter()
        if force or now - self._last >= self.every_s:
            self._last = now
            logging.info("%s", self.line(extra))

    def step(self, n: int = 1, extra: float | str | None = None,
             force: bool = False) -> str:
        """Adds ``n`` units; logs if due; returns the line."""
        self.update(self.done_n + n, extra, force)
        return self.line(extra)

    def done(self) -> None:
        """Logs the final line when the loop ran long enough to have shown
        progress before."""
        if time.perf_counter() - self.t0 >= self.every_s > 0:
            logging.info("%s (done)", self.line())


class _QuietOrbax:
    """Drops orbax's INFO lines (dozens per checkpoint save or restore) so
    progress lines stay readable; orbax warnings and errors still show."""

    def filter(self, record):
        return record.levelno >= 30 or "orbax" not in record.pathname


def quiet_orbax() -> None:
    """Installs the filter on absl's handler (idempotent)."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
        handler.addFilter(_QuietOrbax())
