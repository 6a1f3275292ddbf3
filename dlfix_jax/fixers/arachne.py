"""Arachne: search-based repair of the last Dense layer's weights.

Source: J. Sohn, S. Kang, S. Yoo, "Arachne: Search-Based Repair of Deep
Neural Networks", ACM TOSEM 2023 (arXiv 1912.12463); semantics checked
against ``coinse/arachne`` (``auto_patch_vk.py``, ``run_localise.py``,
``search/de_vk.py``, ``search/searcher_vk.py``) and the eAI-Repair-Toolkit
Arachne (localisation cap N_g), read but not copied.

Algorithm
---------
1. **Bidirectional localisation** on the target layer (default: the last
   Dense layer), using the failing repair inputs I_neg only:

   * gradient loss ``G_ij = |dL(I_neg)/dw_ij|`` (cross-entropy summed over
     I_neg, as ``tf.gradients`` of the per-sample loss vector);
   * forward impact ``FI_ij = mean_n |o_ni w_ij| / sum_i' |o_ni' w_i'j|``
     (coinse's L1 row normalisation over the previous layer's neurons),
     times the "backward" factor ``mean_n |d out / d z_j|`` L1-normalised
     over ``j``. For the last layer that factor is the same for every ``j``
     (the gradient of the summed output w.r.t. itself), so it does not change
     the ranking; we apply it anyway (``1/C``);
   * keep the top ``N_g = ng_factor * |I_neg|`` weights by ``G`` (eAI;
     ``ng_factor = 0`` keeps all weights, as coinse's ``localise_offline``),
     then their **Pareto front** maximising ``(G, FI)``.

2. **Search** with differential evolution (:func:`dlfix_jax.search.de`,
   DE/rand/1/bin, F ~ U(0.5, 1) per generation, CR 0.7, greedy replacement,
   stop when the best is unchanged for more than max(10, gens/10)
   generations) over new values of the localised weights. Population 100,
   up to 100 generations (TOSEM), individuals drawn from N(mean, std) of the
   layer's kernel, mutants clipped to coinse's bounds
   ``[2 min | min/2, 2 max | max/2]`` (doubling away from zero).
   Fitness (maximise), with ``L_i`` the per-sample cross-entropy::

     F = [N_intact + sum_{broken in I_pos} 1/(L_i+1)]
         + alpha [N_patched + sum_{unfixed in I_neg} 1/(L_i+1)]

   ``alpha = patch_aggr``; default 1.0 (coinse's ``patch_aggr=None`` branch
   is the unweighted sum; the paper varies it per experiment).

3. The best vector is written into the kernel (only the localised entries;
   every other parameter is bit-for-bit the original).

JAX design
----------
Only the target layer changes, so its input activations (``capture``) and
the original logits are computed ONCE; a candidate's logits are
``base + h[:, rows] @ ((v - w0)[:, None] * onehot(cols))``, and the whole population
is scored in one vmapped call per generation, inside ``lax.while_loop``.

Localisation depends only on the problem (not on the key), so ``fix`` runs it
on the host (numpy) *before* any use of the key: its output size ``k`` is a
Python int and the search has static shapes. ``jax.vmap(fix, in_axes=(0,
None, None))`` works because vmap passes unbatched arguments through as
concrete arrays; ``fix`` must not be wrapped in an outer ``jax.jit`` (the
localisation needs concrete data). ``info`` therefore holds arrays only.

Defaults: population 100, max_generations 100, CR 0.7, F ~ U(0.5, 1),
patch_aggr 1.0, ng_factor 20, all passing repair inputs as I_pos.

Deviations from the original
----------------------------
* Synchronous DE (the whole generation's trial vectors are built from one
  population), DEAP's is asynchronous; see :mod:`dlfix_jax.search.de`.
* Bias is never changed (as in both originals: only ``kernel`` entries).
* ``num_positive > 0`` samples that many I_pos with replacement (eAI's 200);
  the default uses all, as coinse's DE.
* Initial individuals are drawn per weight from N(mean, std) of the whole
  kernel (coinse); eAI's "sibling" statistics exclude the weight's own row
  and column — a negligible difference we do not replicate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dlfix_jax import masks
from dlfix_jax import search
from dlfix_jax.fixers import _fitness
from dlfix_jax.fixers import _localize
from dlfix_jax.fixers import base
from dlfix_jax.models import base as models_base

PAPER = ("Sohn, Kang, Yoo. Arachne: Search-Based Repair of Deep Neural "
         "Networks. ACM TOSEM 2023 (arXiv 1912.12463)")


def default_config() -> ml_collections.ConfigDict:
    """Arachne's defaults (see the module docstring)."""
    cfg = ml_collections.ConfigDict()
    cfg.layer = ""             # "" or the logits layer's name (the only one supported)
    cfg.population = 100
    cfg.max_generations = 100
    cfg.patience = -1          # -1 -> max(10, max_generations // 10)
    cfg.cr = 0.7
    cfg.f_low = 0.5
    cfg.f_high = 1.0
    cfg.patch_aggr = 1.0       # alpha
    cfg.ng_factor = 20         # N_g = ng_factor * |I_neg|; 0 -> all weights
    cfg.num_positive = 0       # 0 -> all passing inputs; >0 -> sampled (eAI 200)
    cfg.batch_size = 1024      # for caching activations
    return cfg


def check_config(cfg) -> None:
    base.check_ranges(cfg, population=(4, None), max_generations=(0, None),
                      patience=(-1, None), cr=(0.0, 1.0), f_low=(0.0, 2.0),
                      f_high=(0.0, 2.0), patch_aggr=(0.0, None),
                      ng_factor=(0, None), num_positive=(0, None),
                      batch_size=(1, None))
    if cfg.f_low > cfg.f_high:
        raise ValueError(f"config f_low={cfg.f_low} > f_high={cfg.f_high}")


# ---------------------------------------------------------------------------
# Target layer and applicability
# ---------------------------------------------------------------------------

def target_layer(model: models_base.Model, params=None) -> str:
    """The last layer with parameters; raises ValueError unless it is a
    Dense layer whose output is the logits."""
    if model.is_sequential:
        specs = [s for s in model.layers if s.kind in ("conv", "dense", "bn")]
        if not specs:
            raise ValueError(f"model {model.name!r} has no parametric layer")
        last = specs[-1]
        if last.kind != "dense":
            raise ValueError(f"the last parametric layer {last.name!r} of "
                             f"{model.name!r} is {last.kind!r}, not Dense")
        if not _fitness.is_logits_layer(model, last.name):
            after = model.layers[model.layers.index(last) + 1:]
            raise ValueError(
                f"layers after the last Dense {last.name!r} of {model.name!r} "
                f"({[s.kind for s in after]}) change its output; Arachne's "
                "cached fitness needs the Dense output to be the logits")
        return last.name
    variables = params if params is not None else model.abstract_variables()
    order = model.all_layer_names(variables)
    owners = set(models_base.param_layers(variables["params"]))
    with_params = [n for n in order if n in owners]
    if not with_params:
        raise ValueError(f"model {model.name!r} has no parametric layer")
    name = with_params[-1]
    k = models_base.get_layer_params(variables["params"], name).get("kernel")
    if k is None or len(np.shape(k)) != 2:
        raise ValueError(f"the last parametric layer {name!r} of "
                         f"{model.name!r} is not Dense")
    return name


def applicable(info: base.ProblemInfo) -> str | None:
    """None when the model ends in a Dense layer producing the logits."""
    try:
        target_layer(info.model)
    except ValueError as e:
        return f"Arachne repairs the last Dense layer: {e}"
    return None


# ---------------------------------------------------------------------------
# Host-side preparation (deterministic, key-independent)
# ---------------------------------------------------------------------------

def localise(kernel: np.ndarray, bias: np.ndarray, h_neg: np.ndarray,
             y_neg: np.ndarray, ng_factor: int) -> dict:
    """Arachne's bidirectional localisation on a Dense kernel (host, numpy).

    Args:
      kernel: (d, C) kernel; bias: (C,).
      h_neg: (N_neg, d) layer inputs on the failing inputs; y_neg labels.
      ng_factor: N_g = ng_factor * N_neg gradient candidates (0 -> all).

    Returns:
      dict with ``indices`` (k, 2) kernel positions in C order, ``grad`` and
      ``fi`` (d, C) scores, ``num_candidates`` N_g used.
    """
    grad = _localize.dense_gradient(kernel, bias, h_neg, y_neg)
    front = _localize.forward_impact(kernel, h_neg)
    # The "backward" factor is uniform for the logits layer (module doc).
    fi = front * np.full((kernel.shape[1],), 1.0 / kernel.shape[1])[None, :]
    n_all = grad.size
    ng = n_all if ng_factor <= 0 else min(n_all, int(ng_factor) * len(y_neg))
    flat = _localize.bidirectional(grad, fi, ng)
    idx = np.stack(np.unravel_index(flat, kernel.shape), axis=1).astype(np.int32)
    return {"indices": idx, "grad": grad, "fi": fi, "num_candidates": ng}


def bounds(kernel: np.ndarray) -> tuple[float, float]:
    """coinse's search bounds: min and max pushed away from zero (x2 or /2)."""
    lo, hi = float(np.min(kernel)), float(np.max(kernel))
    lo = lo * 2 if lo < 0 else lo / 2
    hi = hi * 2 if hi > 0 else hi / 2
    return lo, hi


# ---------------------------------------------------------------------------
# Fitness and search (pure JAX)
# ---------------------------------------------------------------------------

def make_fitness(pos: _fitness.LayerCache, y_pos, neg: _fitness.LayerCache,
                 y_neg, rows, cols, w0, patch_aggr: float):
    """Arachne's fitness of one candidate vector ``v`` (k,) (maximise):
    ``score(I_pos) + alpha * score(I_neg)`` on cached-activation logits
    (:mod:`dlfix_jax.fixers._fitness`)."""
    zp = _fitness.candidate_logits(pos, rows, cols, w0)
    zn = _fitness.candidate_logits(neg, rows, cols, w0)

    def fitness(v):
        return (_fitness.correct_score(zp(v), y_pos)
                + patch_aggr * _fitness.correct_score(zn(v), y_neg))

    return fitness


@functools.partial(jax.jit, static_argnames=(
    "population", "max_generations", "patience", "cr", "f_range",
    "patch_aggr", "num_positive"))
def _search(key, h_pos, y_pos, z_pos, h_neg, y_neg, z_neg, rows, cols, w0,
            mean, std, lo, hi, *, population, max_generations, patience, cr,
            f_range, patch_aggr, num_positive):
    k_init, k_pos, k_de = jax.random.split(key, 3)
    if num_positive > 0:
        sel = jax.random.choice(k_pos, h_pos.shape[0], (num_positive,),
                                replace=True)
        h_pos, y_pos, z_pos = h_pos[sel], y_pos[sel], z_pos[sel]
    pos = _fitness.LayerCache("", h_pos, z_pos, z_pos)
    neg = _fitness.LayerCache("", h_neg, z_neg, z_neg)
    fitness = make_fitness(pos, y_pos, neg, y_neg, rows, cols, w0, patch_aggr)
    init = mean + std * jax.random.normal(k_init, (population, rows.shape[0]))
    res = search.de(k_de, fitness, init, lo, hi,
                    max_generations=max_generations, cr=cr, f_range=f_range,
                    patience=patience)
    return res, fitness(w0)


@base.register("arachne", level="neuron", paper=PAPER,
               default_config=default_config, applicable=applicable,
               vmappable=True, abbrev="AR", check_config=check_config,
               codes={"stop_reason": search.STOP_REASONS})
def fix(key: jax.Array, problem: base.Problem,
        config: ml_collections.ConfigDict) -> base.FixResult:
    """Repairs ``problem`` with Arachne (localisation + DE); see module doc.

    Returns:
      FixResult whose ``mask`` selects the localised kernel entries and whose
      ``info`` has ``localised`` ((k, 2) kernel indices), ``num_localised``,
      ``num_candidates`` (N_g), ``generations``, ``fitness_trace`` (best per
      generation, NaN-padded), ``best_fitness``, ``initial_fitness``
      (fitness of the unchanged model), ``stop_reason`` (code into
      :data:`dlfix_jax.search.STOP_REASONS`) and ``evaluations``.

    Raises:
      ValueError: no failing repair inputs, or the model is not applicable.
    """
    model, variables = problem.model, problem.variables
    params = variables["params"]
    if len(problem.failing) == 0:
        raise ValueError("Arachne needs failing repair inputs (I_neg is empty)")
    layer = target_layer(model, variables)
    if config.layer and config.layer != layer:
        # The cached fitness and the localisation treat the layer's output as
        # the logits, so any other layer would be silently mis-scored.
        raise ValueError(
            f"Arachne repairs the logits layer {layer!r} only; config.layer="
            f"{config.layer!r} is not supported")
    lp = models_base.get_layer_params(params, layer)
    kernel = np.asarray(lp["kernel"], np.float32)
    bias = np.asarray(lp.get("bias", np.zeros(kernel.shape[1])), np.float32)
    if kernel.ndim != 2:
        raise ValueError(f"layer {layer!r} is not Dense (kernel {kernel.shape})")

    # --- host part: depends on the problem only, never on the key ---------
    bs = int(config.batch_size)
    neg = _fitness.cache_layer(model, variables, layer, problem.failing.x, bs)
    pos = _fitness.cache_layer(model, variables, layer, problem.passing.x, bs)
    y_neg = np.asarray(problem.failing.y, np.int32)
    y_pos = np.asarray(problem.passing.y, np.int32)
    loc = localise(kernel, bias, neg.h, y_neg, int(config.ng_factor))
    idx = loc["indices"]
    mask = masks.weight_mask(params, layer, idx)
    rows, cols = idx[:, 0], idx[:, 1]
    lo, hi = bounds(kernel)
    num_positive = int(config.num_positive)
    if num_positive > 0 and len(y_pos) == 0:
        num_positive = 0
    max_gens = int(config.max_generations)
    patience = (search.default_patience(max_gens)
                if int(config.patience) < 0 else int(config.patience))

    # --- device part: key-dependent, static shapes -------------------------
    res, f_orig = _search(
        key, jnp.asarray(pos.h), jnp.asarray(y_pos), jnp.asarray(pos.logits),
        jnp.asarray(neg.h), jnp.asarray(y_neg), jnp.asarray(neg.logits),
        jnp.asarray(rows), jnp.asarray(cols), jnp.asarray(kernel[rows, cols]),
        float(np.mean(kernel)), float(np.std(kernel)), lo, hi,
        population=int(config.population),
        max_generations=max_gens, patience=patience, cr=float(config.cr),
        f_range=(float(config.f_low), float(config.f_high)),
        patch_aggr=float(config.patch_aggr), num_positive=num_positive)

    new_params = masks.scatter(params, masks.indices_of(mask), res.best_x)
    new_vars = dict(variables)
    new_vars["params"] = new_params
    info = {
        "localised": jnp.asarray(idx, jnp.int32),
        "num_localised": jnp.int32(len(idx)),
        "num_candidates": jnp.int32(loc["num_candidates"]),
        "generations": res.generations,
        "fitness_trace": res.trace,
        "best_fitness": res.best_fitness,
        "initial_fitness": f_orig,
        "stop_reason": res.stop_reason,
        "evaluations": res.evaluations,
    }
    return base.FixResult(new_vars, mask, info)
