"""Wall-clock timing of one measured function, shared by the benchmarks."""

import time


def timed(fn, repeats: int = 3) -> tuple[float, float]:
    """(first call s, best of ``repeats`` steady-state calls s) of ``fn``,
    waiting for its outputs (``jax.block_until_ready``; a no-op for NumPy
    results)."""
    import jax
    t = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return first, best
