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
from dlfix_jax.fixers import base
from dlfix_jax.models import base as models_base
from dlfix_jax.search.de import default_patience

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


# ---------------------------------------------------------------------------
# Target layer and applicability
# ---------------------------------------------------------------------------

def _param_shapes(model: models_base.Model):
    return jax.eval_shape(model.init, jax.random.key(0))


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
        after = model.layers[model.layers.index(last) + 1:]
        if any(s.kind != "dropout" for s in after):
            raise ValueError(
                f"layers after the last Dense {last.name!r} of {model.name!r} "
                f"({[s.kind for s in after]}) change its output; Arachne's "
                "cached fitness needs the Dense output to be the logits")
        return last.name
    variables = params if params is not None else _param_shapes(model)
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


def applicable(model: models_base.Model, dataset) -> str | None:
    """None when the model ends in a Dense layer producing the logits."""
    del dataset
    try:
        target_layer(model)
    except ValueError as e:
        return f"Arachne repairs the last Dense layer: {e}"
    return None


# ---------------------------------------------------------------------------
# Host-side preparation (deterministic, key-independent)
# ---------------------------------------------------------------------------

def _capture(model, variables, layer, x, batch_size):
    """(input of ``layer`` flattened to (N, d), logits) for ``x``, batched."""
    fn = models_base.jitted_apply(model, (layer,))
    hs, zs = [], []
    for i in range(0, len(x), batch_size):
        z, acts = fn(variables, x[i:i + batch_size])
        hs.append(np.asarray(acts[layer]["input"], np.float32))
        zs.append(np.asarray(z, np.float32))
    if not hs:
        return None, None
    h = np.concatenate(hs)
    if h.ndim != 2:
        raise ValueError(f"input of {layer!r} has shape {h.shape[1:]}, "
                         "expected a flat feature vector")
    return h, np.concatenate(zs)


def _pareto_front(g: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Boolean mask of the points not dominated when maximising (g, f).

    p is dominated iff some q has g_q >= g_p, f_q >= f_p, one strictly.
    """
    order = np.lexsort((-f, -g))  # g descending, then f descending
    gs, fs = g[order], f[order]
    keep = np.zeros(len(g), bool)
    best_f_higher_g = -np.inf   # max f over points with strictly larger g
    i = 0
    while i < len(gs):
        j = i
        while j < len(gs) and gs[j] == gs[i]:
            j += 1
        grp_max = fs[i]  # sorted descending within the group
        for t in range(i, j):
            keep[order[t]] = fs[t] == grp_max and fs[t] > best_f_higher_g
        best_f_higher_g = max(best_f_higher_g, grp_max)
        i = j
    return keep


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
    w = kernel.astype(np.float64)
    h = h_neg.astype(np.float64)
    z = h @ w + bias.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y_neg)), y_neg] -= 1.0
    grad = np.abs(h.T @ p)                                   # (d, C)
    # FI front = mean_n |h_ni w_ij| / sum_i' |h_ni' w_i'j|, without the
    # (N, d, C) tensor: the denominator is (|h| @ |w|)[n, j].
    ah, aw = np.abs(h), np.abs(w)
    denom = ah @ aw                                          # (N, C)
    inv = np.where(denom > 0, 1.0 / np.where(denom > 0, denom, 1.0), 0.0)
    front = aw * (ah.T @ inv) / max(len(h), 1)               # (d, C)
    behind = np.full((w.shape[1],), 1.0 / w.shape[1])        # uniform, see doc
    fi = front * behind[None, :]
    flat_g, flat_f = grad.ravel(), fi.ravel()
    n_all = flat_g.size
    ng = n_all if ng_factor <= 0 else min(n_all, int(ng_factor) * len(y_neg))
    cand = np.argsort(-flat_g, kind="stable")[:ng]
    on_front = _pareto_front(flat_g[cand], flat_f[cand])
    flat = np.sort(cand[on_front])
    idx = np.stack(np.unravel_index(flat, w.shape), axis=1).astype(np.int32)
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

def _ce_and_correct(z, y):
    lse = jax.nn.logsumexp(z, axis=-1)
    loss = lse - jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0]
    return loss, jnp.argmax(z, axis=-1) == y


def make_fitness(h_pos, y_pos, z_pos, h_neg, y_neg, z_neg, rows, cols, w0,
                 num_classes: int, patch_aggr: float):
    """Arachne's fitness of one candidate vector ``v`` (k,) (maximise).

    Logits are the cached originals plus the change of the k kernel entries:
    ``z + h[:, rows] @ ((v - w0)[:, None] * onehot(cols))`` (one
    (N, k) x (k, C) matmul; vmapped over a population it is a batched matmul).
    """
    onehot = jax.nn.one_hot(cols, num_classes, dtype=jnp.float32)  # (k, C)
    hp, hn = h_pos[:, rows], h_neg[:, rows]

    def part(hs, z, y, v):
        zz = z + hs @ ((v - w0)[:, None] * onehot)
        loss, ok = _ce_and_correct(zz, y)
        return jnp.sum(ok) + jnp.sum(jnp.where(ok, 0.0, 1.0 / (loss + 1.0)))

    def fitness(v):
        return part(hp, z_pos, y_pos, v) + patch_aggr * part(hn, z_neg, y_neg, v)

    return fitness


@functools.partial(jax.jit, static_argnames=(
    "num_classes", "population", "max_generations", "patience", "cr",
    "f_range", "patch_aggr", "num_positive"))
def _search(key, h_pos, y_pos, z_pos, h_neg, y_neg, z_neg, rows, cols, w0,
            mean, std, lo, hi, *, num_classes, population, max_generations,
            patience, cr, f_range, patch_aggr, num_positive):
    k_init, k_pos, k_de = jax.random.split(key, 3)
    if num_positive > 0:
        sel = jax.random.choice(k_pos, h_pos.shape[0], (num_positive,),
                                replace=True)
        h_pos, y_pos, z_pos = h_pos[sel], y_pos[sel], z_pos[sel]
    fitness = make_fitness(h_pos, y_pos, z_pos, h_neg, y_neg, z_neg, rows,
                           cols, w0, num_classes, patch_aggr)
    init = mean + std * jax.random.normal(k_init, (population, rows.shape[0]))
    res = search.de(k_de, fitness, init, lo, hi,
                    max_generations=max_generations, cr=cr, f_range=f_range,
                    patience=patience)
    return res, fitness(w0)


@base.register("arachne", level="neuron", paper=PAPER,
               default_config=default_config, applicable=applicable,
               vmappable=True, abbrev="AR")
def fix(key: jax.Array, problem: base.Problem,
        config: ml_collections.ConfigDict) -> base.FixResult:
    """Repairs ``problem`` with Arachne (localisation + DE); see module doc.

    Returns:
      FixResult whose ``info`` has ``mask`` (element mask over params: the
      localised kernel entries), ``localised`` ((k, 2) kernel indices),
      ``num_localised``, ``num_candidates`` (N_g), ``generations``,
      ``fitness_trace`` (best per generation, NaN-padded), ``best_fitness``,
      ``initial_fitness`` (fitness of the unchanged model), ``stop_reason``
      (code into :data:`dlfix_jax.search.STOP_REASONS`) and ``evaluations``.

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
    num_classes = kernel.shape[1]

    # --- host part: depends on the problem only, never on the key ---------
    bs = int(config.batch_size)
    h_neg, z_neg = _capture(model, variables, layer, problem.failing.x, bs)
    h_pos, z_pos = _capture(model, variables, layer, problem.passing.x, bs)
    y_neg = np.asarray(problem.failing.y, np.int32)
    y_pos = np.asarray(problem.passing.y, np.int32)
    if h_pos is None:  # every repair input fails: no I_pos term
        h_pos = np.zeros((0, kernel.shape[0]), np.float32)
        z_pos = np.zeros((0, num_classes), np.float32)
    loc = localise(kernel, bias, h_neg, y_neg, int(config.ng_factor))
    idx = loc["indices"]
    mask = masks.weight_mask(params, layer, idx)
    rows, cols = idx[:, 0], idx[:, 1]
    lo, hi = bounds(kernel)
    num_positive = int(config.num_positive)
    if num_positive > 0 and len(y_pos) == 0:
        num_positive = 0
    max_gens = int(config.max_generations)
    patience = (default_patience(max_gens)
                if int(config.patience) < 0 else int(config.patience))

    # --- device part: key-dependent, static shapes -------------------------
    res, f_orig = _search(
        key, jnp.asarray(h_pos), jnp.asarray(y_pos), jnp.asarray(z_pos),
        jnp.asarray(h_neg), jnp.asarray(y_neg), jnp.asarray(z_neg),
        jnp.asarray(rows), jnp.asarray(cols), jnp.asarray(kernel[rows, cols]),
        float(np.mean(kernel)), float(np.std(kernel)), lo, hi,
        num_classes=num_classes, population=int(config.population),
        max_generations=max_gens, patience=patience, cr=float(config.cr),
        f_range=(float(config.f_low), float(config.f_high)),
        patch_aggr=float(config.patch_aggr), num_positive=num_positive)

    new_params = masks.scatter(params, masks.indices_of(mask), res.best_x)
    new_vars = dict(variables)
    new_vars["params"] = new_params
    info = {
        "mask": mask,
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
    return base.FixResult(new_vars, info)
