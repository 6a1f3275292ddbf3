"""Particle swarm optimisation in the two variants the fixers need.

* :func:`pso_global_best` — pyswarms ``GlobalBestPSO`` (used by CARE):
  ``v <- w v + c1 r1 (pbest - x) + c2 r2 (gbest - x)`` with ``r1, r2 ~ U(0,1)``
  per particle and dimension, ``x <- x + v``, boundary handling
  ``"periodic"`` (pyswarms' default) / ``"nearest"`` (clip) / None, optional
  velocity clamp, initial velocity ``U(0, 1)`` (pyswarms' default without a
  clamp), and pyswarms' ftol stop: stop when
  ``|best - previous best| < ftol (1 + |previous best|)`` held for
  ``ftol_iter`` consecutive iterations (checked before the move, as pyswarms).
* :func:`pso_constriction` — the constriction PSO of the eAI-Repair-Toolkit
  Arachne / NeuRecover searchers: velocities start at 0; each iteration moves
  ``x <- x + v`` first, then ``v <- chi (v + rho1 (p - x) + rho2 (g - x))``
  with ``chi = 2 / (phi - 2 + sqrt(phi^2 - 4 phi))``, ``phi = 4.1`` and scalar
  ``rho1, rho2 ~ U(0, phi)`` per particle and iteration; ``|v|`` is clamped to
  ``[v_min, v_max]`` keeping its sign (eAI: ``[wb / 5, 5 wb]``, ``wb`` the
  range of the layer's weights; a zero velocity gets the sign -1 as there);
  a personal best is replaced only by a strictly better score; stop when the
  best of the last ``patience`` iterations is not better than the best
  before them (eAI: 10).

Deviation (both): all particles move synchronously and are scored together
(one call of the strategy layer per iteration); eAI scores particles one after another but also updates
the global best only once per iteration, so the constriction variant matches
it exactly in distribution.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from dlfix_jax.search import base


def constriction_chi(phi: float = 4.1) -> float:
    """Clerc's constriction coefficient ``2 / (phi - 2 + sqrt(phi^2 - 4 phi))``."""
    if phi <= 4.0:
        raise ValueError(f"constriction needs phi > 4, got {phi}")
    return 2.0 / (phi - 2.0 + (phi * phi - 4.0 * phi) ** 0.5)


def _periodic(x, lo, hi):
    """pyswarms' periodic boundary handler."""
    d = jnp.abs(hi - lo)
    below = lo - x
    above = x - hi
    x = jnp.where(x < lo, hi - jnp.mod(below, d), x)
    return jnp.where(x > hi, lo + jnp.mod(above, d), x)


class PSOState(NamedTuple):
    key: jax.Array
    x: jax.Array
    v: jax.Array
    pbest_x: jax.Array
    pbest_s: jax.Array
    best_x: jax.Array
    best_s: jax.Array
    evaluations: jax.Array


def global_best_strategy(*, w: float = 0.8, c1: float = 0.41,
                         c2: float = 0.41, lower=None, upper=None,
                         bh_strategy: str | None = "periodic",
                         velocity_clamp: tuple[float, float] | None = None
                         ) -> base.Strategy:
    """pyswarms ``GlobalBestPSO`` as a Strategy (module docstring). The
    initial positions are scored by the first step, as in pyswarms."""
    if (lower is None) != (upper is None):
        raise ValueError("give both lower and upper bounds, or neither")
    if bh_strategy not in ("periodic", "nearest", None):
        raise ValueError(f"unknown bh_strategy {bh_strategy!r}")
    bounded = lower is not None and bh_strategy is not None
    vmin, vmax = (0.0, 1.0) if velocity_clamp is None else velocity_clamp

    def init(key, x0, score_fn):
        del score_fn
        P, k = x0.shape
        key, kv = jax.random.split(key)
        v0 = (vmax - vmin) * jax.random.uniform(kv, (P, k)) + vmin
        return PSOState(key, x0, v0, x0,
                        jnp.full((P,), -jnp.inf, jnp.float32), x0[0],
                        jnp.float32(-jnp.inf), jnp.int32(0))

    def step(st, score_fn):
        P, k = st.x.shape
        x = st.x
        s = score_fn(x)
        imp = s > st.pbest_s
        pbest_x = jnp.where(imp[:, None], x, st.pbest_x)
        pbest_s = jnp.where(imp, s, st.pbest_s)
        i = jnp.argmax(pbest_s)
        better = pbest_s[i] > st.best_s
        gbest_s = jnp.where(better, pbest_s[i], st.best_s)
        gbest_x = jnp.where(better, pbest_x[i], st.best_x)
        key, k1, k2 = jax.random.split(st.key, 3)
        r1 = jax.random.uniform(k1, (P, k))
        r2 = jax.random.uniform(k2, (P, k))
        v = (w * st.v + c1 * r1 * (pbest_x - x)
             + c2 * r2 * (gbest_x[None, :] - x))
        if velocity_clamp is not None:
            v = jnp.clip(v, vmin, vmax)
        xn = x + v
        if bounded:
            lo, hi = base.bounds(lower, upper, k)
            xn = (_periodic(xn, lo, hi) if bh_strategy == "periodic"
                  else jnp.clip(xn, lo, hi))
        return PSOState(key, xn, v, pbest_x, pbest_s, gbest_x, gbest_s,
                        st.evaluations + P)

    return base.Strategy(init, step)


def pso_global_best(key: jax.Array, fitness_fn: Callable[[jax.Array], jax.Array],
                    init_pos: jax.Array, *, max_iterations: int = 100,
                    w: float = 0.8, c1: float = 0.41, c2: float = 0.41,
                    lower=None, upper=None, bh_strategy: str | None = "periodic",
                    velocity_clamp: tuple[float, float] | None = None,
                    ftol: float = -jnp.inf, ftol_iter: int = 1,
                    maximize: bool = True,
                    population_strategy: str = "auto"
                    ) -> base.SearchResult:
    """pyswarms-style global-best PSO (defaults: CARE's w=0.8, c1=c2=0.41).

    Args:
      key: PRNG key.
      fitness_fn: ``x (k,) -> scalar``; pass ``maximize=False`` for a cost.
      init_pos: (P, k) initial positions (CARE: all ones).
      max_iterations: iteration budget (``iters``).
      w, c1, c2: inertia, cognitive and social weights.
      lower, upper: bounds (both or neither); positions start inside them.
      bh_strategy: "periodic", "nearest" or None (no boundary handling).
      velocity_clamp: (min, max) elementwise clamp, or None.
      ftol, ftol_iter: pyswarms' relative-change stop (``-inf``: never).
      maximize: maximise (True) or minimise.
      population_strategy: how the population is scored (a
        :mod:`dlfix_jax.seed_axis` strategy, task "population"; see
        :func:`dlfix_jax.search.run`).

    Returns:
      :class:`~dlfix_jax.search.SearchResult` (trace[0] is NaN: pyswarms
      does not score the initial positions before its first iteration).
    """
    strategy = global_best_strategy(w=w, c1=c1, c2=c2, lower=lower,
                                    upper=upper, bh_strategy=bh_strategy,
                                    velocity_clamp=velocity_clamp)
    stop = (base.stop_ftol(ftol, ftol_iter) if ftol > -jnp.inf
            else base.stop_never())
    return base.run(strategy, key, fitness_fn, init_pos,
                    max_generations=max_iterations, stop=stop,
                    maximize=maximize,
                    population_strategy=population_strategy)


def constriction_strategy(*, phi: float = 4.1, v_min: float | None = None,
                          v_max: float | None = None, lower=None, upper=None,
                          rho_per_dim: bool = False) -> base.Strategy:
    """The eAI constriction PSO as a Strategy (module docstring)."""
    chi = constriction_chi(phi)

    def clamp(v):
        mag = jnp.abs(v)
        sgn = jnp.where(v > 0, 1.0, -1.0)
        if v_min is not None:
            mag = jnp.maximum(mag, v_min)
        if v_max is not None:
            mag = jnp.minimum(mag, v_max)
        return sgn * mag if (v_min is not None or v_max is not None) else v

    def init(key, x0, score_fn):
        P, k = x0.shape
        s0 = score_fn(x0)
        i0 = jnp.argmax(s0)
        return PSOState(key, x0, jnp.zeros_like(x0), x0, s0, x0[i0], s0[i0],
                        jnp.int32(P))

    def step(st, score_fn):
        P, k = st.x.shape
        key, k1, k2 = jax.random.split(st.key, 3)
        x = st.x + st.v
        if lower is not None:
            lo, hi = base.bounds(lower, upper, k)
            x = jnp.clip(x, lo, hi)
        shape = (P, k) if rho_per_dim else (P, 1)
        r1 = jax.random.uniform(k1, shape, jnp.float32, 0.0, phi)
        r2 = jax.random.uniform(k2, shape, jnp.float32, 0.0, phi)
        g = st.pbest_x[jnp.argmax(st.pbest_s)]
        v = clamp(chi * (st.v + r1 * (st.pbest_x - x)
                         + r2 * (g[None, :] - x)))
        s = score_fn(x)
        imp = st.pbest_s < s
        pbest_x = jnp.where(imp[:, None], x, st.pbest_x)
        pbest_s = jnp.where(imp, s, st.pbest_s)
        i = jnp.argmax(pbest_s)
        return PSOState(key, x, v, pbest_x, pbest_s, pbest_x[i], pbest_s[i],
                        st.evaluations + P)

    return base.Strategy(init, step)


def pso_constriction(key: jax.Array, fitness_fn: Callable[[jax.Array], jax.Array],
                     init_pos: jax.Array, *, max_iterations: int = 100,
                     phi: float = 4.1, v_min: float | None = None,
                     v_max: float | None = None, patience: int = 10,
                     lower=None, upper=None, rho_per_dim: bool = False,
                     maximize: bool = True,
                     population_strategy: str = "auto"
                     ) -> base.SearchResult:
    """Constriction PSO of the eAI Arachne / NeuRecover searchers.

    Args:
      key: PRNG key.
      fitness_fn: ``x (k,) -> scalar``.
      init_pos: (P, k) initial positions (eAI: N(mu, sigma) of the sibling
        weights).
      max_iterations: iteration budget (eAI: 100).
      phi: constriction parameter (4.1).
      v_min, v_max: bounds on ``|v|`` (sign kept); None disables that side.
      patience: stagnation window (eAI: 10).
      lower, upper: optional position clip (eAI has none).
      rho_per_dim: draw rho per dimension instead of one scalar per particle
        (eAI draws scalars).
      maximize: maximise (True) or minimise.
      population_strategy: how the population is scored (a
        :mod:`dlfix_jax.seed_axis` strategy, task "population"; see
        :func:`dlfix_jax.search.run`).

    Returns:
      :class:`~dlfix_jax.search.SearchResult`.
    """
    strategy = constriction_strategy(phi=phi, v_min=v_min, v_max=v_max,
                                     lower=lower, upper=upper,
                                     rho_per_dim=rho_per_dim)
    return base.run(strategy, key, fitness_fn, init_pos,
                    max_generations=max_iterations,
                    stop=base.stop_window(patience), maximize=maximize,
                    population_strategy=population_strategy)
