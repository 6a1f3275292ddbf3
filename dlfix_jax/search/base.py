"""Search base types and the one driver every population search runs under.

A search algorithm is a :class:`Strategy`, a pair of pure functions in
optax's shape:

* ``init(key, x0, score_fn) -> state``: the initial state from the (P, k)
  initial population ``x0``;
* ``step(state, score_fn) -> state``: one generation / iteration.

``score_fn`` maps a (P, k) population to (P,) scores, **maximised** (the
driver folds the sign in); the whole population is scored in one call
through the strategy layer (:func:`dlfix_jax.seed_axis.map_traced`, task
``"population"``: vmap, lax.map or sharded over devices). A state is any pytree with the fields ``key``, ``best_x`` (k,),
``best_s`` (scalar) and ``evaluations``; the strategy keeps its key in the
state, so the random stream is the strategy's own.

:func:`run` owns everything around the generations: the ``lax.while_loop``
(so a search is jit-able and ``vmap``-able over keys), the best-so-far
trace, the stop rule (:class:`StopRule`: :func:`stop_unchanged`,
:func:`stop_window`, :func:`stop_ftol`, or none), the stop code and the
:class:`SearchResult`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dlfix_jax import seed_axis

STOP_REASONS = ("max_generations", "unchanged", "ftol")
"""Names of the ``stop_reason`` codes: 0 = the generation budget ran out,
1 = the best was unchanged for too long (DE / constriction PSO / GA
patience), 2 = pyswarms' ftol criterion."""

STOP_MAX_GENERATIONS, STOP_UNCHANGED, STOP_FTOL = 0, 1, 2


class SearchResult(NamedTuple):
    """What a search returns (a pytree; every field gains a leading axis
    under ``vmap``).

    Attributes:
      best_x: (k,) best candidate found.
      best_fitness: its fitness (in the caller's sign convention).
      generations: generations (iterations) run after initialisation.
      trace: (max_generations + 1,) best-so-far fitness, entry 0 for the
        initial population (NaN when the strategy does not score it);
        NaN after ``generations``.
      stop_reason: int code, see :data:`STOP_REASONS`.
      evaluations: number of fitness evaluations performed.
    """

    best_x: jax.Array
    best_fitness: jax.Array
    generations: jax.Array
    trace: jax.Array
    stop_reason: jax.Array
    evaluations: jax.Array


def stop_reason_name(code) -> str:
    """Name of a stop-reason code (host side)."""
    return STOP_REASONS[int(np.asarray(code))]


def bounds(lower, upper, k: int):
    """Broadcasts scalar / per-dimension bounds to (k,) float32 arrays."""
    lo = jnp.broadcast_to(jnp.asarray(lower, jnp.float32), (k,))
    hi = jnp.broadcast_to(jnp.asarray(upper, jnp.float32), (k,))
    return lo, hi


class Strategy(NamedTuple):
    """A search algorithm as ``(init, step)`` (module docstring)."""

    init: Callable[[jax.Array, jax.Array, Callable], Any]
    step: Callable[[Any, Callable], Any]


class StopRule(NamedTuple):
    """An early-stop rule: ``init() -> rstate`` and ``update(rstate, gen,
    best, prev_best, trace) -> (rstate, stop)`` after generation ``gen``
    (1-based), with ``best`` its best-so-far score, ``prev_best`` the one
    before it (``-inf`` when nothing was scored yet) and ``trace`` the
    best-so-far trace so far; ``code`` is the stop code it reports."""

    init: Callable[[], Any]
    update: Callable[..., tuple[Any, jax.Array]]
    code: int


def stop_never() -> StopRule:
    return StopRule(lambda: jnp.int32(0),
                    lambda r, gen, best, prev, trace: (r, jnp.bool_(False)),
                    STOP_MAX_GENERATIONS)


def stop_unchanged(patience: int, skip_first: bool = False) -> StopRule:
    """Stop when the best (compared in float32) was unchanged for more than
    ``patience`` consecutive generations. ``skip_first``: the first
    generation only sets the reference (Arachne's DE)."""
    def update(count, gen, best, prev, trace):
        same = best.astype(jnp.float32) == prev.astype(jnp.float32)
        count = jnp.where(same, count + 1, 0)
        if skip_first:
            count = jnp.where(gen == 1, 0, count)
        return count, count > patience
    return StopRule(lambda: jnp.int32(0), update, STOP_UNCHANGED)


def stop_window(patience: int) -> StopRule:
    """eAI's rule: at 0-based iteration ``t = gen - 1 > patience``, stop
    unless the best beats the best of ``patience`` generations before."""
    def update(r, gen, best, prev, trace):
        before = trace[jnp.maximum(gen - patience, 0)]
        return r, (gen - 1 > patience) & ~(trace[gen] > before)
    return StopRule(lambda: jnp.int32(0), update, STOP_UNCHANGED)


def stop_ftol(ftol: float, ftol_iter: int) -> StopRule:
    """pyswarms' rule: stop when ``|best - prev| < ftol (1 + |prev|)`` held
    for ``ftol_iter`` consecutive iterations (checked from iteration
    ``ftol_iter + 1`` on, as pyswarms)."""
    def update(consec, gen, best, prev, trace):
        delta = jnp.abs(best - prev) < ftol * (1.0 + jnp.abs(prev))
        consec = jnp.where(delta, consec + 1, 0)
        return consec, (consec >= ftol_iter) & (gen - 1 >= ftol_iter)
    return StopRule(lambda: jnp.int32(0), update, STOP_FTOL)


def run(strategy: Strategy, key: jax.Array,
        fitness_fn: Callable[[jax.Array], jax.Array], x0: jax.Array, *,
        max_generations: int, stop: StopRule | None = None,
        maximize: bool = True, return_state: bool = False,
        population_strategy: str = "auto"):
    """Runs ``strategy`` from the (P, k) population ``x0``.

    Args:
      strategy: the algorithm.
      key: PRNG key (the only randomness; the strategy carries it).
      fitness_fn: ``x (k,) -> scalar``; vmapped over the population.
      x0: (P, k) initial population.
      max_generations: generation budget (>= 0).
      stop: early-stop rule (default: none).
      maximize: maximise (True) or minimise the fitness.
      return_state: also return the strategy's final state (e.g. the GA's
        last population; its scores are in the maximised sign).
      population_strategy: how a population is scored, a
        :mod:`dlfix_jax.seed_axis` strategy for the task ``"population"``
        (:func:`dlfix_jax.seed_axis.map_traced`): ``"vmap"`` one batched
        call, ``"lax_map"`` (= ``"sequential"`` inside the compiled loop)
        one candidate after another, ``"sharded"`` the candidates split over
        the local devices; ``"auto"`` the measured choice per backend
        for a candidate that runs model layers (task ``"population"``); a
        caller whose candidates only update cached logits passes
        ``seed_axis.population_strategy(True)`` (task
        ``"population_head"``).

    Returns:
      :class:`SearchResult` in the caller's sign convention, or
      ``(SearchResult, final_state)`` when ``return_state``.
    """
    if int(max_generations) < 0:
        raise ValueError(f"max_generations must be >= 0, got {max_generations}")
    max_generations = int(max_generations)
    stop = stop or stop_never()
    sign = 1.0 if maximize else -1.0
    pop_strategy = seed_axis.resolve_strategy(population_strategy,
                                              task="population")

    def score_fn(pop):
        return seed_axis.map_traced(lambda x: sign * fitness_fn(x), pop,
                                    pop_strategy, "population")

    x0 = jnp.asarray(x0, jnp.float32)
    st0 = strategy.init(key, x0, score_fn)
    b0 = jnp.asarray(st0.best_s, jnp.float32)
    trace = jnp.full((max_generations + 1,), jnp.nan, jnp.float32)
    trace = trace.at[0].set(jnp.where(jnp.isfinite(b0), b0, jnp.nan))

    def cond(c):
        return (c["gen"] < max_generations) & ~c["stop"]

    def body(c):
        st = strategy.step(c["st"], score_fn)
        gen = c["gen"] + 1
        best = jnp.asarray(st.best_s, jnp.float32)
        trace = c["trace"].at[gen].set(best)
        rs, stopped = stop.update(c["rule"], gen, best, c["prev"], trace)
        return dict(st=st, gen=gen, trace=trace, rule=rs, prev=best,
                    stop=stopped)

    c = dict(st=st0, gen=jnp.int32(0), trace=trace, rule=stop.init(),
             prev=b0, stop=jnp.bool_(False))
    c = jax.lax.while_loop(cond, body, c)
    code = jnp.where(c["stop"], stop.code, STOP_MAX_GENERATIONS)
    st = c["st"]
    res = SearchResult(
        best_x=st.best_x, best_fitness=sign * st.best_s,
        generations=c["gen"], trace=sign * c["trace"],
        stop_reason=jnp.int32(code), evaluations=st.evaluations)
    return (res, st) if return_state else res
