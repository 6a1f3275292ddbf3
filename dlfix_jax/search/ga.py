"""A generational genetic algorithm over real vectors.

Each generation keeps the ``n_elite`` best individuals unchanged (elitism)
and fills the rest of the population with children: two parents chosen by
tournament selection (``tournament`` contestants drawn with replacement, the
fittest wins) or, with ``selection="truncation"``, drawn uniformly (with
replacement) from the ``n_parents`` fittest individuals, crossed over with
probability ``cx_prob`` (``"uniform"``: each gene from either parent with
probability 1/2; ``"one_point"``: genes before a random cut from the first
parent, the rest from the second; otherwise the child copies the first
parent), then Gaussian mutation (each gene with
probability ``mut_prob`` gets ``N(0, sigma^2)`` noise) and a clip to the
bounds. Optional early stop when the best is unchanged (float32) for more
than ``patience`` generations. All children of a generation are scored in one
call of the strategy layer (``seed_axis.map_traced``, ``population_strategy``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from dlfix_jax.search import base


class GAState(NamedTuple):
    key: jax.Array
    pop: jax.Array
    score: jax.Array
    best_x: jax.Array
    best_s: jax.Array
    evaluations: jax.Array


def ga_strategy(lower, upper, *, tournament: int = 3,
                crossover: str = "uniform", cx_prob: float = 0.9,
                mut_prob: float | None = None, sigma=0.1, n_elite: int = 1,
                selection: str = "tournament", n_parents: int = 10
                ) -> base.Strategy:
    """The generational GA as a Strategy (module docstring)."""
    if crossover not in ("uniform", "one_point"):
        raise ValueError(f"unknown crossover {crossover!r}")
    if selection not in ("tournament", "truncation"):
        raise ValueError(f"unknown selection {selection!r}")

    def init(key, pop, score_fn):
        P, k = pop.shape
        if not 0 <= n_elite < P:
            raise ValueError(f"n_elite must be in [0, {P}), got {n_elite}")
        if selection == "truncation" and not 1 <= n_parents <= P:
            raise ValueError(f"n_parents must be in [1, {P}], got {n_parents}")
        s0 = score_fn(pop)
        i0 = jnp.argmax(s0)
        return GAState(key, pop, s0, pop[i0], s0[i0], jnp.int32(P))

    def step(st, score_fn):
        P, k = st.pop.shape
        n_child = P - n_elite
        mp = 1.0 / k if mut_prob is None else mut_prob
        lo, hi = base.bounds(lower, upper, k)
        sig = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (k,))

        def select(kk, score):
            if selection == "truncation":
                return order[jax.random.randint(kk, (), 0, n_parents)]
            c = jax.random.randint(kk, (tournament,), 0, P)
            return c[jnp.argmax(score[c])]

        def child(kk, pop, score):
            ka, kb, kx, kc, km, kn = jax.random.split(kk, 6)
            p1 = pop[select(ka, score)]
            p2 = pop[select(kb, score)]
            if crossover == "uniform":
                take2 = jax.random.bernoulli(kc, 0.5, (k,))
            else:
                cut = jax.random.randint(kc, (), 1, max(k, 2))
                take2 = jnp.arange(k) >= cut
            # A probability >= 1 always draws True (uniform < 1): skipping
            # the draw is bit-identical and compiles less.
            if cx_prob < 1:
                take2 = take2 & jax.random.bernoulli(kx, cx_prob)
            c = jnp.where(take2, p2, p1)
            noise = sig * jax.random.normal(kn, (k,))
            if mp < 1:
                noise = jnp.where(jax.random.bernoulli(km, mp, (k,)), noise,
                                  0.0)
            c = c + noise
            return jnp.clip(c, lo, hi)

        key, kc = jax.random.split(st.key)
        pop, score = st.pop, st.score
        order = jnp.argsort(-score)
        elite = pop[order[:n_elite]]
        elite_s = score[order[:n_elite]]
        kids = jax.vmap(child, in_axes=(0, None, None))(
            jax.random.split(kc, n_child), pop, score)
        kids_s = score_fn(kids)
        pop = jnp.concatenate([elite, kids])
        score = jnp.concatenate([elite_s, kids_s])
        i = jnp.argmax(score)
        improved = score[i] > st.best_s
        return GAState(key, pop, score,
                       jnp.where(improved, pop[i], st.best_x),
                       jnp.where(improved, score[i], st.best_s),
                       st.evaluations + n_child)

    return base.Strategy(init, step)


def ga(key: jax.Array, fitness_fn: Callable[[jax.Array], jax.Array],
       init_pop: jax.Array, lower, upper, *, max_generations: int = 100,
       tournament: int = 3, crossover: str = "uniform", cx_prob: float = 0.9,
       mut_prob: float | None = None, sigma: float = 0.1, n_elite: int = 1,
       patience: int | None = None, maximize: bool = True,
       selection: str = "tournament", n_parents: int = 10,
       return_state: bool = False, population_strategy: str = "auto"):
    """Runs the GA from ``init_pop``.

    Args:
      key: PRNG key.
      fitness_fn: ``x (k,) -> scalar``.
      init_pop: (P, k) initial population.
      lower, upper: scalar or (k,) bounds.
      max_generations: generation budget.
      tournament: tournament size.
      crossover: "uniform" or "one_point".
      cx_prob: crossover probability per child.
      mut_prob: per-gene mutation probability (None -> 1/k).
      sigma: scalar or (k,) standard deviation of the Gaussian mutation.
      n_elite: individuals copied unchanged into the next generation.
      selection: "tournament" or "truncation" (parents drawn uniformly from
        the ``n_parents`` fittest).
      n_parents: truncation selection's parent pool (ignored otherwise).
      patience: stagnation window, None -> no early stop.
      maximize: maximise (True) or minimise.
      population_strategy: how the population is scored (a
        :mod:`dlfix_jax.seed_axis` strategy, task "population"; see
        :func:`dlfix_jax.search.run`).
      return_state: also return the final :class:`GAState` (last
        population and its maximised scores).

    Returns:
      :class:`~dlfix_jax.search.SearchResult` (and the final state when
      ``return_state``).
    """
    strategy = ga_strategy(lower, upper, tournament=tournament,
                           crossover=crossover, cx_prob=cx_prob,
                           mut_prob=mut_prob, sigma=sigma, n_elite=n_elite,
                           selection=selection, n_parents=n_parents)
    stop = (base.stop_never() if patience is None
            else base.stop_unchanged(int(patience)))
    return base.run(strategy, key, fitness_fn, init_pop,
                    max_generations=max_generations, stop=stop,
                    maximize=maximize, return_state=return_state,
                    population_strategy=population_strategy)
