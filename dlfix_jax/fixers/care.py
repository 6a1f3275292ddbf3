"""CARE: causality-based repair of a hidden layer's neurons.

Source: B. Sun, J. Sun, L. H. Pham, J. Shi, "Causality-based neural network
repair", ICSE 2022; semantics checked against ``sunbingsmu/care`` @37f4ed0
(``{mnist,cifar}_nnrepair/source/causal_inference.py``,
``causal_analysis.py``), read but not copied (summary in
``../shared/reference/fixer_specs.md``, section CARE).

Algorithm
---------
The model is cut at a hidden layer; its (flattened) output ``h`` are the
"neurons". We take ``h`` to be the **input of a Dense layer** ``D`` (the
layer that reads the neurons, so the repair can be folded into it).

1. **Causal attribution** (localisation). For every neuron ``i`` and each
   of ``num_values = 4`` values ``v`` in ``linspace(min_i, max_i, 4)`` of its
   observed range, the do-intervention ``h_i := v`` gives the interventional
   expectation ``IE_i(v) = mean_{x in I_neg} p_{y_true}(f(h(x) with h_i :=
   v))``; ``score_i = max_v IE_i(v) - min_v IE_i(v)``. All neurons x values
   are evaluated in **one** jitted, batched call on cached activations
   (:func:`causal_effects`; ``lax.map`` over neuron chunks of a ``vmap``, so
   memory stays bounded). The top ``num_neurons = 5`` are repaired.
2. **Search**: pyswarms-semantics global-best PSO
   (:func:`dlfix_jax.search.pso_global_best`) over multiplicative factors
   ``r`` (one per repaired neuron, ``h_i <- r_i h_i``): 20 particles,
   ``w = 0.8``, ``c1 = c2 = 0.41``, bounds ``[-10, 10]`` with pyswarms'
   default ``"periodic"`` boundary handling, every particle starting at
   ones, ``ftol = 1e-3`` over ``ftol_iter = 10`` iterations, at most 100
   iterations. The cost (minimised) is::

     cost(r) = (1 - alpha) (1 - acc(I_neg)) + alpha (1 - acc(I_pos))

   with ``alpha = 0.1``. The whole swarm is scored in one call of the strategy
   layer (``seed_axis.population_strategy``: ``vmap`` on CPU when ``D`` is
   the logits layer, ``lax.map`` when layers run after it; ``vmap`` on
   accelerators, not measured)
   on the cached input of ``D`` (only ``D`` and the layers after it are
   recomputed, via :func:`dlfix_jax.fixers._fitness.candidate_logits`).
3. **Fold**: ``h_i <- r_i h_i`` feeding ``D`` is exactly ``D.kernel[i, :] <-
   r_i D.kernel[i, :]``, so the best factors are written into those kernel
   rows: the fixed model has the original architecture, ``FixResult.mask``
   selects those rows, and every other parameter (``D``'s bias included) is
   bit-for-bit the original.

Which layer (``config.layer``)
------------------------------
``""`` (default): the input of the **last Dense layer**, i.e. the
penultimate activations (LeNet5: ``relu4``, 84 neurons; VGG16: the
512-unit block after BN/ReLU/Dropout; ResNet18 / DenseNet121: the pooled
features). This is our choice: the original's ``SPLIT_LAYER`` is a
per-model constant (4 for mnist_nnrepair, 13 for cifar_nnrepair, 6 / 9 for
the backdoor variants), and the study does not say which it used. The last
Dense's input is the one cut every study model has and the cheapest to
search (the fitness is one small matmul).
A sequential model may name any hidden layer ``L`` instead (e.g. ``pool2``
of LeNet5: 400 flattened neurons); it must be followed by a Dense layer with
only Flatten / Dropout in between (else the fold is not exact and
:func:`resolve` refuses). Non-sequential models support only the default.

Defaults and where they come from
---------------------------------
* ``num_values = 4``: ``CALSAL_STEP = 4`` (original code).
* ``num_neurons = 5``: ``REP_N = 5`` (original code).
* ``particles = 20``, ``w = 0.8``, ``c1 = c2 = 0.41``, init at ones,
  bounds ``[-10, 10]``, ``ftol = 1e-3``, ``ftol_iter = 10``,
  ``max_iterations = 100``: the original's pyswarms ``GlobalBestPSO`` call.
* ``bh_strategy = "periodic"``: pyswarms' default (the original passes
  none).
* ``alpha = 0.1``: the original's nnrepair variants (0.2 in its mnist /
  fashion backdoor variants).
* ``layer = ""``: ours (above).

Deviations from the original
----------------------------
* **Objective (ours).** Every original variant repairs a backdoor or a
  safety property (``target = 7`` with a trigger mask): the attribution
  target and the violation are defined for that. For misclassification
  repair we use: attribution on ``p_{y_true}`` averaged over the failing
  repair inputs I_neg; violation ``= 1 - acc(I_neg)`` and accuracy ``=
  acc(I_pos)`` (the study does not say what it used) [inference].
* **Data.** The original draws each cost evaluation from 31 batches of 32 of
  a separate PSO split and takes the neuron ranges over clean and perturbed
  PSO inputs. We use the whole repair split: the ranges over I_neg and
  I_pos together, every cost over all of I_neg and I_pos (deterministic,
  no batching).
* **Where the neurons are.** The original cuts the Keras model at
  ``SPLIT_LAYER`` and multiplies the activations inside a patched model;
  we fold the factors into the next Dense kernel (the issue's
  requirement), which is exact because that kernel reads the neurons
  linearly (only Flatten / Dropout in between).
* The PSO moves all particles synchronously and scores them in one batched
  call; pyswarms does the same (numpy), so this is not a semantic change.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dlfix_jax import masks
from dlfix_jax import search
from dlfix_jax import seed_axis
from dlfix_jax.fixers import _fitness
from dlfix_jax.fixers import _localize
from dlfix_jax.fixers import arachne
from dlfix_jax.fixers import base
from dlfix_jax.models import base as models_base

PAPER = ("Sun, Sun, Pham, Shi. Causality-based Neural Network Repair. "
         "ICSE 2022")

# Layers between the repaired layer and the Dense that reads it that keep
# the fold exact (identity on values at inference; Flatten keeps C order,
# which is the Dense kernel's row order).
_PASS_THROUGH = ("flatten", "dropout")

# Floats per chunk of the causal-effect computation (neurons x values x
# inputs x units); bounds its memory.
_EFFECT_CHUNK_FLOATS = 1 << 25


def default_config() -> ml_collections.ConfigDict:
    """CARE's defaults (see the module docstring for their sources)."""
    cfg = ml_collections.ConfigDict()
    cfg.layer = ""             # "" -> the input of the last Dense layer
    cfg.num_values = 4         # CALSAL_STEP
    cfg.num_neurons = 5        # REP_N
    cfg.particles = 20
    cfg.max_iterations = 100
    cfg.w = 0.8
    cfg.c1 = 0.41
    cfg.c2 = 0.41
    cfg.lower = -10.0
    cfg.upper = 10.0
    cfg.bh_strategy = "periodic"
    cfg.ftol = 1e-3
    cfg.ftol_iter = 10
    cfg.alpha = 0.1
    cfg.batch_size = 1024      # for caching activations
    return cfg


def check_config(cfg) -> None:
    base.check_ranges(cfg, num_values=(2, None), num_neurons=(1, None),
                      particles=(1, None), max_iterations=(0, None),
                      w=(0.0, None), c1=(0.0, None), c2=(0.0, None),
                      ftol=(0.0, None), ftol_iter=(1, None),
                      alpha=(0.0, 1.0), batch_size=(1, None),
                      bh_strategy={"periodic", "nearest"})
    if not cfg.lower < cfg.upper:
        raise ValueError(f"config lower={cfg.lower} must be < upper="
                         f"{cfg.upper}")


# ---------------------------------------------------------------------------
# Which neurons, and the Dense layer they are folded into
# ---------------------------------------------------------------------------

def resolve(model: models_base.Model, layer: str = "", params=None
            ) -> tuple[str, str]:
    """``(hidden, dense)``: the layer whose output neurons are repaired and
    the Dense layer that reads them (its kernel rows get the factors).

    ``layer=""``: the input of the last Dense layer (``hidden`` is then ""
    for non-sequential models, whose Dense input has no layer name).

    Raises:
      ValueError: no Dense layer reads the neurons through Flatten /
        Dropout only (the fold would not be exact), the Dense reads the
        model's input, or ``layer`` is unknown / given for a non-sequential
        model.
    """
    if not model.is_sequential:
        if layer:
            raise ValueError(
                f"config.layer={layer!r}: {model.name!r} is not sequential; "
                "only the default (the input of the last Dense layer) is "
                "supported")
        return "", arachne.target_layer(model, params)
    specs = list(model.layers)
    names = [s.name for s in specs]
    if not layer:
        dense = [i for i, s in enumerate(specs) if s.kind == "dense"]
        if not dense:
            raise ValueError(f"model {model.name!r} has no Dense layer to "
                             "fold the factors into")
        j = dense[-1]
        i = j - 1
        while i >= 0 and specs[i].kind in _PASS_THROUGH:
            i -= 1
        if i < 0:
            raise ValueError(
                f"the last Dense {names[j]!r} of {model.name!r} reads the "
                "model's input, not a hidden layer")
        return names[i], names[j]
    if layer not in names:
        raise ValueError(f"no layer {layer!r} in model {model.name!r}; "
                         f"layers: {names}")
    i = names.index(layer)
    j = i + 1
    while j < len(specs) and specs[j].kind in _PASS_THROUGH:
        j += 1
    if j == len(specs):
        raise ValueError(f"no Dense layer after {layer!r} in {model.name!r}: "
                         "nothing to fold the factors into")
    if specs[j].kind != "dense":
        raise ValueError(
            f"{layer!r} is followed by {specs[j].kind!r} layer "
            f"{names[j]!r} before any Dense: folding factors into the next "
            "Dense kernel would not be exact")
    return layer, names[j]


def applicable(info: base.ProblemInfo) -> str | None:
    """None when a Dense layer reads a hidden layer (the default cut)."""
    try:
        resolve(info.model)
    except ValueError as e:
        return f"CARE folds its factors into a Dense layer: {e}"
    return None


# ---------------------------------------------------------------------------
# Causal attribution (pure JAX; one batched call)
# ---------------------------------------------------------------------------

def _tail_logits(cache: _fitness.LayerCache, delta):
    """Logits for the Dense output changed by ``delta`` (..., N, units)."""
    if cache.tail is None:
        return jnp.asarray(cache.logits) + delta
    out = jnp.asarray(cache.out) + delta
    lead = out.shape[:-2]
    flat = out.reshape((-1,) + out.shape[-1:])
    z = cache.tail.apply(cache.tail_vars, flat)
    return z.reshape(lead + (out.shape[-2], z.shape[-1]))


def causal_effects(cache: _fitness.LayerCache, y, kernel, values, *,
                   chunk: int = 0):
    """``IE[i, t] = mean_n p_{y_n}(model with h_i := values[i, t])`` for
    every neuron ``i`` of the cached Dense input ``h`` (traceable).

    Args:
      cache: the Dense layer's cache over the attribution inputs.
      y: (N,) labels (the class whose probability is the effect).
      kernel: (d, units) the Dense kernel.
      values: (d, V) intervention values per neuron.
      chunk: neurons per ``vmap`` batch of the ``lax.map`` (0: all at once).

    Returns:
      (d, V) interventional expectations.
    """
    h = jnp.asarray(cache.h)
    kernel = jnp.asarray(kernel, jnp.float32)
    y = jnp.asarray(y)

    def one(args):
        i, vals = args                                   # (), (V,)
        # do(h_i := v) changes the Dense output by (v - h_i) * kernel[i].
        delta = ((vals[:, None] - h[None, :, i])[..., None]
                 * kernel[i][None, None, :])              # (V, N, units)
        p = jax.nn.softmax(_tail_logits(cache, delta), axis=-1)
        return jnp.mean(jnp.take_along_axis(
            p, jnp.broadcast_to(y[None, :, None], p.shape[:-1] + (1,)),
            axis=-1)[..., 0], axis=-1)                    # (V,)

    d = values.shape[0]
    idx = jnp.arange(d)
    if chunk <= 0 or chunk >= d:
        return jax.vmap(lambda i, v: one((i, v)))(idx, values)
    return jax.lax.map(one, (idx, values), batch_size=int(chunk))


@functools.partial(jax.jit, static_argnames=("tail", "chunk"))
def _effects(h, out, z, y, kernel, values, tail_vars, *, tail, chunk):
    cache = _fitness.LayerCache("", h, out, z, tail, tail_vars)
    return causal_effects(cache, y, kernel, values, chunk=chunk)


def intervention_values(h: np.ndarray, num_values: int) -> np.ndarray:
    """(d, V) ``linspace(min_i, max_i, V)`` of each neuron's observed range."""
    lo, hi = np.min(h, axis=0), np.max(h, axis=0)
    t = np.linspace(0.0, 1.0, int(num_values), dtype=np.float64)
    return (lo[:, None] + (hi - lo)[:, None] * t[None, :]).astype(np.float32)


def effect_chunk(num_values: int, n: int, units: int) -> int:
    """Neurons per chunk so that one chunk holds ~2^25 floats."""
    per = max(1, int(num_values) * max(n, 1) * max(units, 1))
    return max(1, _EFFECT_CHUNK_FLOATS // per)


# ---------------------------------------------------------------------------
# Cost and search (pure JAX)
# ---------------------------------------------------------------------------

def make_cost(neg: _fitness.LayerCache, y_neg, pos: _fitness.LayerCache,
              y_pos, neurons, w_rows, alpha: float):
    """CARE's cost of factors ``r`` (k,) (minimise):
    ``(1 - alpha)(1 - acc(I_neg)) + alpha (1 - acc(I_pos))`` with the
    Dense kernel rows ``neurons`` scaled by ``r`` (``w_rows`` = those rows,
    (k, units)); an empty set contributes 0."""
    k, units = w_rows.shape
    rows = jnp.repeat(jnp.asarray(neurons), units)
    cols = jnp.tile(jnp.arange(units), k)
    w0 = jnp.ravel(w_rows)
    zn = _fitness.candidate_logits(neg, rows, cols, w0)
    zp = _fitness.candidate_logits(pos, rows, cols, w0)
    y_neg, y_pos = jnp.asarray(y_neg), jnp.asarray(y_pos)

    def err(z, y):
        wrong = jnp.sum(jnp.argmax(z, axis=-1) != y)
        return wrong / max(int(y.shape[0]), 1)

    def cost(r):
        v = jnp.ravel(r[:, None] * w_rows)
        return ((1.0 - alpha) * err(zn(v), y_neg)
                + alpha * err(zp(v), y_pos))

    return cost


@functools.partial(jax.jit, static_argnames=(
    "tail", "particles", "max_iterations", "w", "c1", "c2", "lower", "upper",
    "bh_strategy", "ftol", "ftol_iter", "alpha"))
def _search(key, h_neg, out_neg, z_neg, y_neg, h_pos, out_pos, z_pos, y_pos,
            neurons, w_rows, tail_vars, *, tail, particles, max_iterations,
            w, c1, c2, lower, upper, bh_strategy, ftol, ftol_iter, alpha):
    neg = _fitness.LayerCache("", h_neg, out_neg, z_neg, tail, tail_vars)
    pos = _fitness.LayerCache("", h_pos, out_pos, z_pos, tail, tail_vars)
    cost = make_cost(neg, y_neg, pos, y_pos, neurons, w_rows, alpha)
    x0 = jnp.ones((particles, neurons.shape[0]), jnp.float32)
    res = search.pso_global_best(
        key, cost, x0, max_iterations=max_iterations, w=w, c1=c1, c2=c2,
        lower=lower, upper=upper, bh_strategy=bh_strategy, ftol=ftol,
        ftol_iter=ftol_iter, maximize=False,
        population_strategy=seed_axis.population_strategy(tail is None))
    return res, cost(jnp.ones((neurons.shape[0],), jnp.float32))


def fold(params, dense: str, neurons, factors):
    """``params`` with ``dense``'s kernel rows ``neurons`` (ascending)
    multiplied by ``factors``, and the element mask of those rows."""
    kernel = models_base.get_layer_params(params, dense)["kernel"]
    units = np.shape(kernel)[1]
    neurons = np.asarray(neurons, np.int64)
    idx = np.stack([np.repeat(neurons, units),
                    np.tile(np.arange(units), len(neurons))], axis=1)
    mask = masks.weight_mask(params, dense, idx)
    rows = jnp.asarray(kernel)[jnp.asarray(neurons)]
    vec = jnp.ravel(jnp.asarray(factors, rows.dtype)[:, None] * rows)
    return masks.scatter(params, masks.indices_of(mask), vec), mask


# ---------------------------------------------------------------------------
# The fixer
# ---------------------------------------------------------------------------

def _check_inputs(problem: base.Problem) -> None:
    for name, split in (("failing", problem.failing),
                        ("passing", problem.passing)):
        x = np.asarray(split.x)
        if x.size and not np.all(np.isfinite(x)):
            bad = int(np.sum(~np.all(np.isfinite(
                x.reshape(len(x), -1)), axis=1)))
            raise ValueError(
                f"CARE: {bad} of {len(x)} {name} repair inputs hold "
                "non-finite values (NaN/Inf); the neuron ranges and the "
                "causal effects would be NaN")


@base.register("care", level="neuron", paper=PAPER,
               default_config=default_config, applicable=applicable,
               vmappable=True, abbrev="CARE", check_config=check_config,
               codes={"stop_reason": search.STOP_REASONS})
def fix(key: jax.Array, problem: base.Problem,
        config: ml_collections.ConfigDict) -> base.FixResult:
    """Repairs ``problem`` with CARE (causal attribution + PSO + fold); see
    the module docstring.

    Returns:
      FixResult whose ``mask`` selects the kernel rows of the Dense layer
      that reads the repaired neurons, and whose ``info`` has ``neurons``
      (k,) the repaired neurons (flat indices into the Dense input),
      ``num_neurons``, ``effects`` (d,) every neuron's causal score,
      ``factors`` (k,) the best multiplicative factors, ``iterations``,
      ``cost_trace`` (best cost per iteration, NaN-padded; entry 0 is NaN as
      in pyswarms), ``best_cost``, ``initial_cost`` (cost of the unchanged
      model, factors 1), ``stop_reason`` (code into
      :data:`dlfix_jax.search.STOP_REASONS`) and ``evaluations``.

    Raises:
      ValueError: no failing repair inputs, non-finite variables, inputs or
        activations, or a ``config.layer`` the factors cannot be folded from.
    """
    model, variables = problem.model, problem.variables
    params = variables["params"]
    if len(problem.failing) == 0:
        raise ValueError("CARE needs failing repair inputs (I_neg is empty)")
    base.check_finite(variables, "CARE: the model's variables")
    _check_inputs(problem)
    _, dense = resolve(model, str(config.layer), variables)
    kernel = np.asarray(models_base.get_layer_params(params, dense)["kernel"],
                        np.float32)
    if kernel.ndim != 2:
        raise ValueError(f"layer {dense!r} is not Dense (kernel "
                         f"{kernel.shape})")

    # --- host part: depends on the problem only, never on the key ---------
    bs = int(config.batch_size)
    neg = _fitness.cache_layer(model, variables, dense, problem.failing.x, bs)
    pos = _fitness.cache_layer(model, variables, dense, problem.passing.x, bs)
    for c, what in ((neg, "failing"), (pos, "passing")):
        if not (np.all(np.isfinite(c.h)) and np.all(np.isfinite(c.logits))):
            raise ValueError(f"CARE: non-finite activations of {dense!r} or "
                             f"logits on the {what} repair inputs")
    y_neg = np.asarray(problem.failing.y, np.int32)
    y_pos = np.asarray(problem.passing.y, np.int32)
    nv = int(config.num_values)
    values = intervention_values(np.concatenate([neg.h, pos.h]), nv)
    chunk = effect_chunk(nv, len(neg), kernel.shape[1])
    ie = np.asarray(_effects(
        jnp.asarray(neg.h), jnp.asarray(neg.out), jnp.asarray(neg.logits),
        jnp.asarray(y_neg), jnp.asarray(kernel), jnp.asarray(values),
        neg.tail_vars, tail=neg.tail, chunk=chunk))
    scores = ie.max(axis=1) - ie.min(axis=1)
    if not np.all(np.isfinite(scores)):
        raise ValueError("CARE: non-finite causal effects")
    neurons = _localize.top_k(scores, int(config.num_neurons))

    # --- device part: key-dependent, static shapes -------------------------
    res, c_orig = _search(
        key, jnp.asarray(neg.h), jnp.asarray(neg.out),
        jnp.asarray(neg.logits), jnp.asarray(y_neg), jnp.asarray(pos.h),
        jnp.asarray(pos.out), jnp.asarray(pos.logits), jnp.asarray(y_pos),
        jnp.asarray(neurons, jnp.int32), jnp.asarray(kernel[neurons]),
        neg.tail_vars, tail=neg.tail, particles=int(config.particles),
        max_iterations=int(config.max_iterations), w=float(config.w),
        c1=float(config.c1), c2=float(config.c2),
        lower=float(config.lower), upper=float(config.upper),
        bh_strategy=str(config.bh_strategy), ftol=float(config.ftol),
        ftol_iter=int(config.ftol_iter), alpha=float(config.alpha))

    new_params, mask = fold(params, dense, neurons, res.best_x)
    new_vars = dict(variables)
    new_vars["params"] = new_params
    info = {
        "neurons": jnp.asarray(neurons, jnp.int32),
        "num_neurons": jnp.int32(len(neurons)),
        "effects": jnp.asarray(scores, jnp.float32),
        "factors": res.best_x,
        "iterations": res.generations,
        "cost_trace": res.trace,
        "best_cost": res.best_fitness,
        "initial_cost": c_orig,
        "stop_reason": res.stop_reason,
        "evaluations": res.evaluations,
    }
    return base.FixResult(new_vars, mask, info)
