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
call of the strategy layer (synchronous DE; ``seed_axis.map_traced``,
``population_strategy``), which is what makes the population
evaluation a single compiled computation.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from dlfix_jax.search import base


def default_patience(max_generations: int) -> int:
    """Arachne's stagnation window: ``max(10, max_generations // 10)``."""
    return max(10, int(max_generations) // 10)


class DEState(NamedTuple):
    key: jax.Array
    pop: jax.Array
    score: jax.Array
    best_x: jax.Array
    best_s: jax.Array
    evaluations: jax.Array


def de_strategy(lower, upper, *, cr: float = 0.7,
                f_range: tuple[float, float] = (0.5, 1.0)) -> base.Strategy:
    """DE/rand/1/bin as a :class:`~dlfix_jax.search.base.Strategy`."""

    def init(key, pop, score_fn):
        P, k = pop.shape
        if P < 4:
            raise ValueError(f"DE/rand/1 needs a population of at least 4, "
                             f"got {P}")
        score = score_fn(pop)
        b = jnp.argmax(score)
        return DEState(key, pop, score, pop[b], score[b], jnp.int32(P))

    def step(st, score_fn):
        P, k = st.pop.shape
        lo, hi = base.bounds(lower, upper, k)

        def pick_abc(kk, i):
            r = jax.random.choice(kk, P - 1, (3,), replace=False)
            return r + (r >= i)

        key, kf, ks, kj, kc = jax.random.split(st.key, 5)
        f = jax.random.uniform(kf, (), jnp.float32, f_range[0], f_range[1])
        abc = jax.vmap(pick_abc)(jax.random.split(ks, P), jnp.arange(P))
        pop = st.pop
        a, b, c = pop[abc[:, 0]], pop[abc[:, 1]], pop[abc[:, 2]]
        mutant = jnp.clip(a + f * (b - c), lo, hi)
        jrand = jax.random.randint(kj, (P,), 0, k)
        cross = (jax.random.uniform(kc, (P, k)) < cr) | (
            jnp.arange(k)[None, :] == jrand[:, None])
        trial = jnp.where(cross, mutant, pop)
        s_trial = score_fn(trial)
        better = s_trial >= st.score
        pop = jnp.where(better[:, None], trial, pop)
        score = jnp.where(better, s_trial, st.score)
        i = jnp.argmax(score)
        improved = score[i] > st.best_s
        return DEState(key, pop, score,
                       jnp.where(improved, pop[i], st.best_x),
                       jnp.where(improved, score[i], st.best_s),
                       st.evaluations + P)

    return base.Strategy(init, step)


def de(key: jax.Array, fitness_fn: Callable[[jax.Array], jax.Array],
       init_pop: jax.Array, lower, upper, *, max_generations: int = 100,
       cr: float = 0.7, f_range: tuple[float, float] = (0.5, 1.0),
       patience: int | None = None, maximize: bool = True,
       population_strategy: str = "auto"
       ) -> base.SearchResult:
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
      population_strategy: how the population is scored (a
        :mod:`dlfix_jax.seed_axis` strategy, task "population"; see
        :func:`dlfix_jax.search.run`).

    Returns:
      :class:`~dlfix_jax.search.SearchResult`.
    """
    patience = (default_patience(max_generations) if patience is None
                else int(patience))
    return base.run(de_strategy(lower, upper, cr=cr, f_range=f_range), key,
                    fitness_fn, init_pop, max_generations=max_generations,
                    stop=base.stop_unchanged(patience, skip_first=True),
                    maximize=maximize,
                    population_strategy=population_strategy)
