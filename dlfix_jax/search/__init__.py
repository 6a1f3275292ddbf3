"""Population search on device: differential evolution, PSO, GA.

Every algorithm is a :class:`~dlfix_jax.search.base.Strategy` (an optax-style
``(init, step)`` pair) run by one driver, :func:`~dlfix_jax.search.base.run`,
which owns the ``lax.while_loop``, the best-so-far trace, the early-stop
rule and the stop code. So every search

* takes an explicit key (same key -> same result) and a per-candidate
  ``fitness_fn(x: (k,)) -> scalar``; the population is scored through the
  strategy layer (:func:`dlfix_jax.seed_axis.map_traced`, task
  ``"population"``: vmap, lax.map or sharded over devices; ``"auto"`` picks
  per backend), chosen with ``population_strategy``;
* is jit-able and ``vmap``-able over keys (the fixers run S seeds at once);
* maximises by default (``maximize=False`` minimises, e.g. a pyswarms cost);
* returns a :class:`SearchResult` pytree.

Convenience entry points: :func:`de` (DE/rand/1/bin as Arachne's DEAP code),
:func:`pso_global_best` (pyswarms ``GlobalBestPSO``, for CARE),
:func:`pso_constriction` (constriction PSO of the eAI Arachne/NeuRecover
lineage), :func:`ga` (generational GA). Strategies for custom drivers:
:func:`de_strategy`, :func:`global_best_strategy`,
:func:`constriction_strategy`, :func:`ga_strategy`.
"""

from dlfix_jax.search.base import (STOP_FTOL, STOP_MAX_GENERATIONS,
                                   STOP_REASONS, STOP_UNCHANGED,
                                   SearchResult, StopRule, Strategy, bounds,
                                   run, stop_ftol, stop_never,
                                   stop_reason_name, stop_unchanged,
                                   stop_window)
from dlfix_jax.search.de import de, de_strategy, default_patience
from dlfix_jax.search.ga import ga, ga_strategy
from dlfix_jax.search.pso import (constriction_chi, constriction_strategy,
                                  global_best_strategy, pso_constriction,
                                  pso_global_best)

__all__ = ["STOP_FTOL", "STOP_MAX_GENERATIONS", "STOP_REASONS",
           "STOP_UNCHANGED", "SearchResult", "StopRule", "Strategy", "bounds",
           "constriction_chi", "constriction_strategy", "de", "de_strategy",
           "default_patience", "ga", "ga_strategy", "global_best_strategy",
           "pso_constriction", "pso_global_best", "run", "stop_ftol",
           "stop_never", "stop_reason_name", "stop_unchanged", "stop_window"]
