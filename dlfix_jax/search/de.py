"""Differential evolution, DE/rand/1/bin, as in Arachne's DEAP searcher.

Semantics follow ``coinse/arachne`` ``search/de_vk.py`` (read, not copied):

* one mutation factor per generation, ``F ~ U(f_range)`` (dither, default
  U(0.5, 1));
* for each target ``x_i``: three distinct others ``a, b, c`` (all != i),
  mutant ``clip(a + F (b - c), lower, upper)``, binomial crossover with
  ``CR`` (default 0.7) plus one forced dimension ``j_rand``;
* greedy replacement: the trial replaces ``x_i`` when its fitness is ``>=``
  (maximising);
* early stop when the best fitness (compared in float32) is unchanged for
  more than ``patience = max(10, max_generations // 10)`` consecutive
  generations; as in the original, the first generation only sets the
  reference value.

Deviation: the original updates the population in place while it sweeps it
(a later target may pick an already-replaced ``a, b, c``); here all trial
vectors of a generation are built from the same population and scored in one
``vmap``-ed call (synchronous DE), which is what makes the population
evaluation a single batched computation.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dlfix_jax import search as _search


def default_patience(max_generations: int) -> int:
    """Arachne's stagnation window: ``max(10, max_generations // 10)``."""
    return max(10, int(max_generations) // 10)


def de(key: jax.Array, fitness_fn: Callable[[jax.Array], jax.Array],
       init_pop: jax.Array, lower, upper, *, max_generations: int = 100,
       cr: float = 0.7, f_range: tuple[float, float] = (0.5, 1.0),
       patience: int | None = None, maximize: bool = True
       ) -> "_search.SearchResult":
    """Runs DE/rand/1/bin from ``init_pop``.

    Args:
      key: PRNG key (the only randomness).
      fitness_fn: ``x (k,) -> scalar`` fitness; vmapped over the population.
      init_pop: (P, k) initial population, P >= 4.
      lower, upper: scalar or (k,) bounds for the mutant clip.
      max_generations: generation budget.
      cr: crossover probability.
      f_range: (low, high) of the per-generation mutation factor.
      patience: stagnation window; None -> ``max(10, max_generations // 10)``.
      maximize: maximise (True) or minimise the fitness.

    Returns:
      :class:`~dlfix_jax.search.SearchResult`.
    """
    init_pop = jnp.asarray(init_pop, jnp.float32)
    P, k = init_pop.shape
    if P < 4:
        raise ValueError(f"DE/rand/1 needs a population of at least 4, got {P}")
    patience = default_patience(max_generations) if patience is None else int(patience)
    lo, hi = _search._bounds(lower, upper, k)
    sign = 1.0 if maximize else -1.0
    score_fn = jax.vmap(lambda x: sign * fitness_fn(x))

    score0 = score_fn(init_pop)
    b0 = jnp.argmax(score0)
    trace0 = jnp.full((max_generations + 1,), jnp.nan, jnp.float32)
    trace0 = trace0.at[0].set(score0[b0])

    def pick_abc(kk, i):
        r = jax.random.choice(kk, P - 1, (3,), replace=False)
        return r + (r >= i)

    def cond(st):
        return (st["gen"] < max_generations) & (st["stop"] < 0)

    def body(st):
        key, kf, ks, kj, kc = jax.random.split(st["key"], 5)
        f = jax.random.uniform(kf, (), jnp.float32, f_range[0], f_range[1])
        abc = jax.vmap(pick_abc)(jax.random.split(ks, P), jnp.arange(P))
        pop = st["pop"]
        a, b, c = pop[abc[:, 0]], pop[abc[:, 1]], pop[abc[:, 2]]
        mutant = jnp.clip(a + f * (b - c), lo, hi)
        jrand = jax.random.randint(kj, (P,), 0, k)
        cross = (jax.random.uniform(kc, (P, k)) < cr) | (
            jnp.arange(k)[None, :] == jrand[:, None])
        trial = jnp.where(cross, mutant, pop)
        s_trial = score_fn(trial)
        better = s_trial >= st["score"]
        pop = jnp.where(better[:, None], trial, pop)
        score = jnp.where(better, s_trial, st["score"])
        i = jnp.argmax(score)
        improved = score[i] > st["best_s"]
        best_s = jnp.where(improved, score[i], st["best_s"])
        best_x = jnp.where(improved, pop[i], st["best_x"])
        gen = st["gen"] + 1
        same = (best_s.astype(jnp.float32) == st["ref"].astype(jnp.float32))
        unchanged = jnp.where(gen == 1, 0,
                              jnp.where(same, st["unchanged"] + 1, 0))
        stop = jnp.where(unchanged > patience, _search.STOP_UNCHANGED, -1)
        return dict(key=key, pop=pop, score=score, best_s=best_s,
                    best_x=best_x, ref=best_s, gen=gen, unchanged=unchanged,
                    trace=st["trace"].at[gen].set(best_s), stop=stop)

    st = dict(key=key, pop=init_pop, score=score0, best_s=score0[b0],
              best_x=init_pop[b0], ref=score0[b0], gen=jnp.int32(0),
              unchanged=jnp.int32(0), trace=trace0, stop=jnp.int32(-1))
    st = jax.lax.while_loop(cond, body, st)
    stop = jnp.where(st["stop"] < 0, _search.STOP_MAX_GENERATIONS, st["stop"])
    return _search.SearchResult(
        best_x=st["best_x"], best_fitness=sign * st["best_s"],
        generations=st["gen"], trace=sign * st["trace"], stop_reason=stop,
        evaluations=P * (st["gen"] + 1))
