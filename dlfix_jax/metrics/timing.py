"""Wall-clock time split into compilation and execution (the study's TIME).

The study reports wall-clock of one fixing run. Under JAX a run also pays for
tracing and XLA compilation, which a second run with the same shapes does
not; we report both parts:

* ``compile_s`` — the sum of JAX's own compilation events recorded while the
  timer runs (``jax.monitoring`` durations of jaxpr tracing, lowering to MLIR
  and the XLA backend compile), for every jit reached, however deeply nested
  in Python code (a fixer calls many jitted kernels). Tracing of a jit nested
  inside another jit's trace is counted once per event JAX records, which may
  double-count a few milliseconds of tracing; lowering and backend compile
  are not nested.
* ``execute_s`` — ``total_s − compile_s``: everything else (device work,
  Python, host transfers).

Usage::

    with Timer() as t:
        out = fix(key, problem, config)
        jax.block_until_ready(out)
    t.total_s, t.compile_s, t.execute_s

    out, compile_s, execute_s = timed(fn, *args)   # blocks on the output
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import jax

COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)

_lock = threading.Lock()
_active: list["Timer"] = []
_registered = False


def _listener(event: str, duration: float, **kwargs) -> None:
    if event in COMPILE_EVENTS:
        with _lock:
            for t in _active:
                t.compile_s += duration
                t.n_compiles += event == COMPILE_EVENTS[-1]


def _ensure_listener() -> None:
    global _registered
    with _lock:
        if not _registered:
            jax.monitoring.register_event_duration_secs_listener(_listener)
            _registered = True


class Timer:
    """Context manager measuring total, compile and execute seconds.

    Timers may nest; each sees every compilation inside its own span. The
    caller must block on asynchronous results (``jax.block_until_ready``)
    inside the ``with`` block for ``execute_s`` to include device work.

    Attributes:
      total_s, compile_s, execute_s: seconds (set on exit; compile_s grows
        while running).
      n_compiles: number of XLA backend compilations seen.
    """

    def __init__(self):
        self.total_s = 0.0
        self.compile_s = 0.0
        self.execute_s = 0.0
        self.n_compiles = 0
        self._t0 = None

    def __enter__(self) -> "Timer":
        _ensure_listener()
        with _lock:
            _active.append(self)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.total_s = time.perf_counter() - self._t0
        with _lock:
            _active.remove(self)
        # Compilation never takes longer than the span containing it.
        self.compile_s = min(self.compile_s, self.total_s)
        self.execute_s = self.total_s - self.compile_s

    def as_dict(self) -> dict[str, float]:
        return {"total_s": self.total_s, "compile_s": self.compile_s,
                "execute_s": self.execute_s, "n_compiles": self.n_compiles}


def timed(fn: Callable, *args, **kwargs) -> tuple[Any, float, float]:
    """Calls ``fn(*args, **kwargs)``, blocks on its output.

    Returns:
      (output, compile_s, execute_s).
    """
    with Timer() as t:
        out = fn(*args, **kwargs)
        jax.block_until_ready(out)
    return out, t.compile_s, t.execute_s
