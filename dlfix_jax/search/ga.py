"""A generational genetic algorithm over real vectors.

Each generation keeps the ``n_elite`` best individuals unchanged (elitism)
and fills the rest of the population with children: two parents chosen by
tournament selection (``tournament`` contestants drawn with replacement, the
fittest wins), crossed over with probability ``cx_prob`` (``"uniform"``: each
gene from either parent with probability 1/2; ``"one_point"``: genes before a
random cut from the first parent, the rest from the second; otherwise the
child copies the first parent), then Gaussian mutation (each gene with
probability ``mut_prob`` gets ``N(0, sigma^2)`` noise) and a clip to the
bounds. Optional early stop when the best is unchanged (float32) for more
than ``patience`` generations. All children of a generation are scored in one
``vmap``-ed call.
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
                mut_prob: float | None = None, sigma=0.1, n_elite: int = 1
                ) -> base.Strategy:
    """The generational GA as a Strategy (module docstring)."""
    if crossover not in ("uniform", "one_point"):
        raise ValueError(f"unknown crossover {crossover!r}")

    def init(key, pop, score_fn):
        P, k = pop.shape
        if not 0 <= n_elite < P:
            raise ValueError(f"n_elite must be in [0, {P}), got {n_elite}")
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
            do_cx = jax.random.bernoulli(kx, cx_prob)
            c = jnp.where(do_cx & take2, p2, p1)
            mut = jax.random.bernoulli(km, mp, (k,))
            c = c + jnp.where(mut, sig * jax.random.normal(kn, (k,)), 0.0)
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
       patience: int | None = None, maximize: bool = True
       ) -> base.SearchResult:
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
      patience: stagnation window, None -> no early stop.
      maximize: maximise (True) or minimise.

    Returns:
      :class:`~dlfix_jax.search.SearchResult`.
    """
    strategy = ga_strategy(lower, upper, tournament=tournament,
                           crossover=crossover, cx_prob=cx_prob,
                           mut_prob=mut_prob, sigma=sigma, n_elite=n_elite)
    stop = (base.stop_never() if patience is None
            else base.stop_unchanged(int(patience)))
    return base.run(strategy, key, fitness_fn, init_pop,
                    max_generations=max_generations, stop=stop,
                    maximize=maximize)
