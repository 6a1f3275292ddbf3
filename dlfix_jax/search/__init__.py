"""Population search on device: differential evolution, PSO, GA.

Every optimiser here

* takes an explicit key (same key -> same result) and a per-candidate
  ``fitness_fn(x: (k,)) -> scalar``; the whole population is scored in one
  ``jax.vmap``-ed call per generation;
* runs its generations under ``lax.while_loop`` with the early-stop test on
  device, so a call is jit-able and ``vmap``-able over keys (the fixers run S
  seeds at once);
* maximises by default (``maximize=False`` minimises, e.g. a pyswarms cost);
* returns a :class:`SearchResult` pytree.

Functions: :func:`de` (DE/rand/1/bin as Arachne's DEAP code),
:func:`pso_global_best` (pyswarms ``GlobalBestPSO``, for CARE),
:func:`pso_constriction` (constriction PSO of the eAI Arachne/NeuRecover
lineage), :func:`ga` (generational GA).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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
        initial population; NaN after ``generations``.
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


def _bounds(lower, upper, k: int):
    """Broadcasts scalar / per-dimension bounds to (k,) float32 arrays."""
    lo = jnp.broadcast_to(jnp.asarray(lower, jnp.float32), (k,))
    hi = jnp.broadcast_to(jnp.asarray(upper, jnp.float32), (k,))
    return lo, hi


from dlfix_jax.search.de import de  # noqa: E402
from dlfix_jax.search.ga import ga  # noqa: E402
from dlfix_jax.search.pso import pso_constriction, pso_global_best  # noqa: E402

__all__ = ["STOP_REASONS", "STOP_FTOL", "STOP_MAX_GENERATIONS",
           "STOP_UNCHANGED", "SearchResult", "de", "ga", "pso_constriction",
           "pso_global_best", "stop_reason_name"]
