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

from typing import Callable

import jax
import jax.numpy as jnp

from dlfix_jax import search as _search


def ga(key: jax.Array, fitness_fn: Callable[[jax.Array], jax.Array],
       init_pop: jax.Array, lower, upper, *, max_generations: int = 100,
       tournament: int = 3, crossover: str = "uniform", cx_prob: float = 0.9,
       mut_prob: float | None = None, sigma: float = 0.1, n_elite: int = 1,
       patience: int | None = None, maximize: bool = True
       ) -> "_search.SearchResult":
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
    if crossover not in ("uniform", "one_point"):
        raise ValueError(f"unknown crossover {crossover!r}")
    pop0 = jnp.asarray(init_pop, jnp.float32)
    P, k = pop0.shape
    if not 0 <= n_elite < P:
        raise ValueError(f"n_elite must be in [0, {P}), got {n_elite}")
    n_child = P - n_elite
    mut_prob = 1.0 / k if mut_prob is None else mut_prob
    lo, hi = _search._bounds(lower, upper, k)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (k,))
    sign = 1.0 if maximize else -1.0
    score_fn = jax.vmap(lambda x: sign * fitness_fn(x))

    s0 = score_fn(pop0)
    i0 = jnp.argmax(s0)
    trace = jnp.full((max_generations + 1,), jnp.nan, jnp.float32).at[0].set(s0[i0])

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
        mut = jax.random.bernoulli(km, mut_prob, (k,))
        c = c + jnp.where(mut, sigma * jax.random.normal(kn, (k,)), 0.0)
        return jnp.clip(c, lo, hi)

    def cond(st):
        return (st["gen"] < max_generations) & (st["stop"] < 0)

    def body(st):
        key, kc = jax.random.split(st["key"])
        pop, score = st["pop"], st["score"]
        order = jnp.argsort(-score)
        elite = pop[order[:n_elite]]
        elite_s = score[order[:n_elite]]
        kids = jax.vmap(child, in_axes=(0, None, None))(
            jax.random.split(kc, n_child), pop, score)
        kids_s = score_fn(kids)
        pop = jnp.concatenate([elite, kids])
        score = jnp.concatenate([elite_s, kids_s])
        i = jnp.argmax(score)
        improved = score[i] > st["best_s"]
        best_s = jnp.where(improved, score[i], st["best_s"])
        best_x = jnp.where(improved, pop[i], st["best_x"])
        gen = st["gen"] + 1
        same = best_s.astype(jnp.float32) == st["best_s"].astype(jnp.float32)
        unchanged = jnp.where(same, st["unchanged"] + 1, 0)
        stop = -1 if patience is None else jnp.where(
            unchanged > patience, _search.STOP_UNCHANGED, -1)
        return dict(key=key, pop=pop, score=score, best_s=best_s,
                    best_x=best_x, gen=gen, unchanged=unchanged,
                    trace=st["trace"].at[gen].set(best_s),
                    stop=jnp.int32(stop))

    st = dict(key=key, pop=pop0, score=s0, best_s=s0[i0], best_x=pop0[i0],
              gen=jnp.int32(0), unchanged=jnp.int32(0), trace=trace,
              stop=jnp.int32(-1))
    st = jax.lax.while_loop(cond, body, st)
    stop = jnp.where(st["stop"] < 0, _search.STOP_MAX_GENERATIONS, st["stop"])
    return _search.SearchResult(
        best_x=st["best_x"], best_fitness=sign * st["best_s"],
        generations=st["gen"], trace=sign * st["trace"], stop_reason=stop,
        evaluations=P + n_child * st["gen"])
