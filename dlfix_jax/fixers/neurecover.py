"""NeuRecover: regression-aware repair from the last two training checkpoints.

Source: S. Tokui, S. Tokumoto, A. Yoshii, F. Ishikawa, T. Nakagawa,
K. Munakata, S. Kikuchi, "NeuRecover: Regression-Controlled Repair of Deep
Neural Networks with Training History", SANER 2022; semantics checked
against the eAI-Repair-Toolkit (``jst-qaml/eAI-Repair-Toolkit@0884653``,
``src/repair/methods/neurecover/neurecover.py``, a subclass of its
``arachne/arachne.py``), read but not copied (summary in
``../shared/reference/fixer_specs.md``, section NR).

Algorithm
---------
The training history (``Problem.history``, per-epoch variables, oldest
first) gives the last two checkpoints ``T-1 = history[-2]`` and
``T = history[-1]``; the repaired weights are ``problem.variables`` (the
final model, normally ``history[-1]``).

1. **Regressions and improvements** over the whole repair split
   (= I_neg u I_pos, as the original concatenates them): ``deg`` = correct
   under ``T-1`` and wrong under ``T``; ``imp`` = wrong under ``T-1`` and
   correct under ``T`` (:func:`regressions`).
2. **Per-tensor suspiciousness** (:func:`suspiciousness`), over every
   parameter tensor ``k`` (every leaf of ``params``):

   * ``dW_k = W_T - W_{T-1}``; ``diffnorm_k = mean|dW_k| / sum_k mean|dW_k|``;
   * forward impact, for 2-D (Dense) kernels only,
     ``FI_ij = mean_x |a_i(x) W_ij|`` with ``a`` the layer's **actual
     input** (captured), on ``deg`` and on ``imp``; other tensors have none;
     ``finorm_k = mean FI_k / sum_k mean FI_k``;
   * ``susp_k = finorm_deg,k / (finorm_deg,k + finorm_imp,k) * diffnorm_k``
     (0 when ``finorm_deg,k = 0``);
   * ``n_k = round(|W_k| * susp_k * reduction_rate)``, ``reduction_rate = 1``.
3. **Localised set** of every Dense kernel ``k`` (:func:`localised_set`,
   :func:`localise`), with its own ``n = n_k``::

     L_k = top_n(D) & top_n(FI_deg) & top_n(G_deg)
           - (top_n(FI_imp) & top_n(G_imp))

   with ``D = |dW_k|`` and ``G_s = |d sum_{x in s} CE / dW_k|`` through the
   whole model (:func:`ce_gradients`); rankings descending, ties broken by
   the lower flat position (``_localize.top_k``). ``L`` is the union of
   the ``L_k`` (the original's ``localized_weights``); it may span several
   layers, e.g. one weight each in the first and second Dense kernels of
   an MNIST LeNet5.
4. **Search**: the eAI constriction PSO
   (:func:`dlfix_jax.search.pso_constriction`, shared with the Arachne
   family) over ONE particle vector holding every
   entry of ``L`` (order of :func:`dlfix_jax.masks.indices_of`):
   100 particles x at most 100 iterations, ``phi = 4.1`` (chi ~ 0.7298),
   scalar rho per particle, velocities start at 0, ``|v|`` clamped into
   ``[wb/5, 5 wb]`` per entry with ``wb`` = max - min of **that entry's**
   kernel (eAI's per-layer velocity bounds; the floor forces motion), stop
   when the best of the last 10 iterations does not beat the best before
   them. Each entry starts from N(mean, std) of its own kernel. The
   fitness (maximised)::

     F = (N_patched/|I_neg| + 1)/(L_neg + 1)
         + alpha (N_intact/|P| + 1)/(L_pos + 1)

   with ``L`` the mean cross-entropy over the set, ``alpha = 1``, and ``P``
   200 passing inputs drawn **with replacement** (key-dependent). The whole
   swarm is scored in one call per iteration of the strategy layer
   (``seed_axis.population_strategy``: on CPU ``vmap`` for the logits-layer
   case below, ``lax.map`` when layers run per candidate; ``vmap`` on
   accelerators, not measured), inside ``lax.while_loop``:

   * all of ``L`` in the logits layer: cached-activation fitness
     (:mod:`dlfix_jax.fixers._fitness`), a candidate only adds
     ``h[:, rows] @ ...`` to the cached logits;
   * otherwise the input ``h`` and output ``out`` of the earliest
     localised Dense layer are cached once; a candidate changes that
     layer's output by ``h[:, rows] @ ((v - w0) onehot(cols))`` (low rank,
     as ``_fitness.candidate_logits``) and runs the rest of the model
     (``models.base.split_at``) with its other entries scattered into the
     later kernels (:func:`dlfix_jax.fixers._fitness.tail_setup` and
     ``tail_logits``, shared with Arachne's ``"all"`` and GenMuNN); that
     layer's matmul is re-run instead only when it holds at least as many
     genes as it has inputs (``_fitness.LOW_RANK_MAX_FRACTION``). A
     non-sequential model whose ``L`` leaves the logits layer runs the
     whole model from the raw inputs.
5. The best vector is written into the localised kernel entries; every
   other parameter is bit-for-bit the original. ``FixResult.mask`` = the
   localised entries; ``info["localised_layer"]`` gives each entry's
   position in :func:`dense_layers`.

Localisation depends only on the problem (never on the key) and runs on the
host before the search, so the search has static shapes, a second call with
the same shapes compiles nothing, and ``jax.vmap(fix, in_axes=(0, None,
None))`` works (as for Arachne; ``fix`` must not be wrapped in ``jax.jit``).

Defaults and where they come from
---------------------------------
* ``localisation = "all"``: every Dense kernel, as the original (eAI
  NeuRecover's per-tensor loop). ``"last"`` restricts ``L`` to the logits
  Dense kernel (``n_k`` still over every tensor); it was this module's
  behaviour before issue 9 and is kept as a cheaper option (it fails where
  the logits kernel's ``L_k`` is empty, e.g. both MNIST bases below).
* ``particles = 100``, ``max_iterations = 100``, ``phi = 4.1``,
  ``patience = 10``, ``num_positive = 200`` (with replacement),
  ``v_min_factor = 0.2``, ``v_max_factor = 5.0`` (``[wb/5, 5 wb]``):
  the eAI Arachne searcher NeuRecover inherits.
* ``alpha = 1.0``: eAI NeuRecover (marked TODO there).
* ``reduction_rate = 1.0``: eAI NeuRecover.
* ``batch_size = 1024``: ours (activation caching only; no effect on
  results).

Deviations from the original
----------------------------
* **Gradient rankings use the loss.** The original differentiates the sum of
  the model's (softmax) outputs, which is identically 1, so its gradients
  are numerically zero and ``G`` is noise. We use ``|d sum CE / dW|`` on
  ``deg`` (resp. ``imp``) with their true labels, through the whole model.
* **No positional indexing.** The original pairs tensors as
  ``[kernel, bias]`` per layer (``layer_index * 2``) and takes the "previous
  layer in list order" as a Dense layer's input, which breaks on BatchNorm
  and non-sequential models (a likely cause of its CIFAR10S FAILURE). We
  address tensors by name and capture each Dense layer's real input. Only
  trainable ``params`` count as tensors (Keras ``get_weights`` also lists
  BatchNorm moving statistics; they never reach ``L``).
* **Empty improvement set**: the original would average over no inputs
  (NaN); we take ``finorm_imp = 0`` and subtract nothing. **No regression**
  in the repair split (or an empty ``L`` in every Dense kernel): nothing to
  repair; ``fix`` raises ``ValueError`` saying so (with every ``n_k``).
* Initial particles from N(mean, std) of the entry's whole kernel (eAI uses
  each weight's "sibling" statistics, excluding its own row and column; the
  same simplification as our Arachne).
* All particles move synchronously and are scored in one batched call (eAI
  also updates the global best once per iteration; see
  :mod:`dlfix_jax.search.pso`).
* Bias is never changed (only kernel entries can be localised, as in the
  original).

As in the original, the unchanged weights are not a particle, so the best
particle can score below the original model (compare ``info``'s
``best_fitness`` and ``initial_fitness``); nothing keeps the original.

Measured (2 CPU cores shared with other jobs, load 8-15)
--------------------------------------------------------
* Tiny MLP with a two-checkpoint history (``tests/test_neurecover.py``;
  39 failing repair inputs, 31 regressions, 5 improvements): ``n_k`` =
  1933 / 54, ``L`` = 45 weights of ``dense1`` + 2 of ``dense2``, searched
  jointly from ``dense1``'s cached input (``"last"``: the 2 of
  ``dense2``). 3 seeds in one vmapped call: 18.7 s with compilation,
  0.55 s without (21-40 iterations).
* ``benchmarks.fidelity --base`` (our MNIST LeNet5 workdirs, 3 seeds,
  defaults; test ACC / RR / NFR): Adam 1e-3 constant lr, 10 epochs (71
  failing repair inputs; 25 regressions, 38 improvements; ``n_k`` = 859 /
  448 / 44; ``L`` = 2 weights of ``dense2``): 98.77 / 16.67 / 0.07 (orig
  ACC 98.60). Same with a cosine schedule (2 regressions, 2 improvements;
  ``n_k`` = 770 / 387 / 44; ``L`` = 1 weight of ``dense1`` + 1 of
  ``dense2``): 98.90 / 5.88 / 0.14 (orig 98.98). Per seed 3-5 s after a
  first seed of 15-45 s (compilation). ``"last"`` localises nothing on
  either (the logits kernel's ``L_k`` is empty). Study (its own model and
  history): 96.73 / 9.84 / 1.38.
* Digits LeNet5 of ``make study`` (15 epochs): the last two epochs differ
  on 5 regressions and 3 improvements of the 200 repair inputs; before
  the improvement subtraction the three Dense kernels keep 0 / 2 / 1
  weights (``n_k`` = 818 / 369 / 45) and the subtraction removes them, so
  ``L`` is empty and ``fix`` fails with that reason in ~3 s (3 seeds,
  vmapped).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dlfix_jax import masks
from dlfix_jax import predict as predict_lib
from dlfix_jax import search
from dlfix_jax import seed_axis
from dlfix_jax.fixers import _fitness
from dlfix_jax.fixers import _localize
from dlfix_jax.fixers import arachne
from dlfix_jax.fixers import base
from dlfix_jax.models import base as models_base

PAPER = ("Tokui, Tokumoto, Yoshii, Ishikawa, Nakagawa, Munakata, Kikuchi. "
         "NeuRecover: Regression-Controlled Repair of Deep Neural Networks "
         "with Training History. SANER 2022")


LOCALISATIONS = ("all", "last")


def default_config() -> ml_collections.ConfigDict:
    """NeuRecover's defaults (see the module docstring for their sources)."""
    cfg = ml_collections.ConfigDict()
    cfg.particles = 100
    cfg.max_iterations = 100
    cfg.phi = 4.1
    cfg.patience = 10
    cfg.v_min_factor = 0.2     # |v| >= wb / 5
    cfg.v_max_factor = 5.0     # |v| <= 5 wb
    cfg.num_positive = 200     # sampled with replacement; 0 -> all passing
    cfg.alpha = 1.0
    cfg.reduction_rate = 1.0
    cfg.batch_size = 1024      # for caching activations
    # "all": every Dense kernel (the original); "last": the logits kernel
    cfg.localisation = "all"
    return cfg


def check_config(cfg) -> None:
    base.check_ranges(cfg, particles=(2, None), max_iterations=(0, None),
                      patience=(1, None), v_min_factor=(0.0, None),
                      v_max_factor=(0.0, None), num_positive=(0, None),
                      alpha=(0.0, None), reduction_rate=(0.0, None),
                      batch_size=(1, None))
    if not cfg.phi > 4.0:
        raise ValueError(f"config phi={cfg.phi} must be > 4 (constriction)")
    if cfg.localisation not in LOCALISATIONS:
        raise ValueError(f"config localisation={cfg.localisation!r} is not one "
                         f"of {LOCALISATIONS}")
    if cfg.v_min_factor > cfg.v_max_factor:
        raise ValueError(f"config v_min_factor={cfg.v_min_factor} > "
                         f"v_max_factor={cfg.v_max_factor}")


def applicable(info: base.ProblemInfo) -> str | None:
    """None when the problem has a training history of >= 2 epochs and the
    model ends in a Dense logits layer."""
    if info.history_len < 2:
        return ("NeuRecover needs the training history (the last two epoch "
                f"checkpoints); this problem has {info.history_len}")
    reason = arachne.applicable(info)
    if reason is not None:
        return "NeuRecover r" + reason[len("Arachne r"):]
    return None


# ---------------------------------------------------------------------------
# Host-side localisation (deterministic, key-independent)
# ---------------------------------------------------------------------------

def regressions(pred_prev, pred_last, y) -> tuple[np.ndarray, np.ndarray]:
    """``(deg, imp)`` boolean masks: correct under ``T-1`` and wrong under
    ``T`` (regressions), and wrong under ``T-1`` and correct under ``T``."""
    y = np.asarray(y)
    ok_prev = np.asarray(pred_prev) == y
    ok_last = np.asarray(pred_last) == y
    return ok_prev & ~ok_last, ~ok_prev & ok_last


def forward_impact(kernel: np.ndarray, a: np.ndarray) -> np.ndarray:
    """NeuRecover's forward impact ``FI_ij = mean_x |a_i(x) W_ij|`` (d, C)
    of a Dense kernel from its inputs ``a`` (N, d); zeros when N = 0."""
    a = np.asarray(a, np.float64).reshape(-1, kernel.shape[0])
    if len(a) == 0:
        return np.zeros(kernel.shape, np.float64)
    return np.abs(a).mean(axis=0)[:, None] * np.abs(kernel.astype(np.float64))


def suspiciousness(diff_mean: np.ndarray, fi_deg_mean: np.ndarray,
                   fi_imp_mean: np.ndarray) -> np.ndarray:
    """``susp_k`` per tensor from ``mean|dW_k|``, ``mean FI_deg,k`` and
    ``mean FI_imp,k`` (0 for tensors without forward impact)."""
    def norm(m):
        m = np.asarray(m, np.float64)
        s = m.sum()
        return m / s if s > 0 else np.zeros_like(m)

    diffnorm, fd, fi = norm(diff_mean), norm(fi_deg_mean), norm(fi_imp_mean)
    den = fd + fi
    frac = np.where(fd > 0, fd / np.where(den > 0, den, 1.0), 0.0)
    return frac * diffnorm


def num_localised(size: int, susp: float, reduction_rate: float) -> int:
    """``n_k = round(|W_k| susp_k reduction_rate)`` (Python's round)."""
    return int(round(float(size) * float(susp) * float(reduction_rate)))


def localised_set(delta, fi_deg, g_deg, fi_imp, g_imp, n: int,
                  has_imp: bool = True) -> np.ndarray:
    """Sorted flat positions of
    ``top_n(|delta|) & top_n(FI_deg) & top_n(G_deg) - (top_n(FI_imp) &
    top_n(G_imp))`` (nothing subtracted when ``has_imp`` is false)."""
    if n <= 0:
        return np.zeros((0,), np.int64)
    top = lambda s: _localize.top_k(s, n)
    keep = np.intersect1d(np.intersect1d(top(np.abs(delta)), top(fi_deg)),
                          top(g_deg))
    if has_imp:
        keep = np.setdiff1d(keep, np.intersect1d(top(fi_imp), top(g_imp)))
    return np.sort(keep).astype(np.int64)


def dense_layers(model: models_base.Model, params) -> tuple[str, ...]:
    """The Dense layers (2-D kernels) NeuRecover localises over: a
    sequential model's in layer order, a non-sequential model's in
    parameter-tree order."""
    if model.is_sequential:
        names = [s.name for s in model.layers if s.kind == "dense"]
    else:
        names = models_base.param_layers(params)
    return tuple(n for n in names if np.ndim(
        models_base.get_layer_params(params, n)["kernel"]) == 2)


def _dense_inputs(model, variables, layers, x, batch_size) -> dict:
    """Each Dense layer's input on ``x`` (host float32, (N, d))."""
    fn = models_base.jitted_apply(model, tuple(layers))
    out = {n: [] for n in layers}
    for i in range(0, len(x), batch_size):
        _, acts = fn(variables, x[i:i + batch_size])
        for n in layers:
            out[n].append(np.asarray(acts[n]["input"], np.float32))
    res = {}
    for n in layers:
        d = np.shape(models_base.get_layer_params(
            variables["params"], n)["kernel"])[0]
        res[n] = (np.concatenate(out[n]).reshape(-1, d) if out[n]
                  else np.zeros((0, d), np.float32))
    return res


@functools.lru_cache(maxsize=None)
def _ce_grad_fn(model: models_base.Model):
    """Jitted ``(params, rest, x, y) -> d sum CE / d params`` (cached per
    model so repeated fixes compile it once)."""
    def loss(p, rest, xb, yb):
        z = model.apply(dict(rest, params=p), xb).astype(jnp.float32)
        ce, _ = _fitness.cross_entropy_and_correct(z, yb)
        return jnp.sum(ce)
    return jax.jit(jax.grad(loss))


def ce_gradients(model, variables, x, y, batch_size: int = 1024) -> dict:
    """``|d sum_x CE(x) / dW|`` (float64) of every parameter, through the
    whole model (eval mode), summed over ``x``; zeros when ``x`` is empty."""
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    grad_fn = _ce_grad_fn(model)
    acc = jax.tree_util.tree_map(
        lambda p: np.zeros(np.shape(p), np.float64), params)
    for i in range(0, len(x), batch_size):
        g = grad_fn(params, rest, jnp.asarray(x[i:i + batch_size]),
                    jnp.asarray(y[i:i + batch_size], jnp.int32))
        acc = jax.tree_util.tree_map(
            lambda a, b: a + np.asarray(b, np.float64), acc, g)
    return jax.tree_util.tree_map(np.abs, acc)


def localise(model, variables, prev, last, x, y, layers=None,
             reduction_rate: float = 1.0, batch_size: int = 1024) -> dict:
    """NeuRecover's localisation, per Dense kernel of ``layers``.

    Args:
      model: the model; ``variables`` the repaired model (forward impact and
        gradients are taken on it); ``prev``, ``last`` the checkpoints T-1
        and T.
      x, y: the repair split (I_neg u I_pos).
      layers: the Dense layers whose localised sets are returned (default
        :func:`dense_layers`, the original's); ``n_k`` is always computed
        over every parameter tensor.

    Returns:
      dict with ``layers`` (the tuple localised over), ``indices`` (k, 2)
      kernel positions (C order within a layer, layers in ``layers``
      order), ``layer`` (k,) each one's position in ``layers``, ``deg`` and
      ``imp`` masks over ``x``, ``susp`` {tensor path: susp_k},
      ``num_per_layer`` {Dense layer: n_k of its kernel} (every Dense
      layer) and ``per_layer`` {layer in ``layers``: its (k_l, 2) set}.
    """
    x = np.asarray(x)
    y = np.asarray(y, np.int32)
    p_prev, _ = predict_lib.predict_finite(model, prev, x, batch_size)
    p_last, _ = predict_lib.predict_finite(model, last, x, batch_size)
    deg, imp = regressions(p_prev, p_last, y)

    params = variables["params"]
    all_dense = dense_layers(model, params)
    if isinstance(layers, str):
        layers = (layers,)
    layers = all_dense if layers is None else tuple(layers)
    for n in layers:
        if n not in all_dense:
            raise ValueError(f"NeuRecover: {n!r} is not a Dense layer of the "
                             f"model (Dense layers: {list(all_dense)})")
    leaves_prev = jax.tree_util.tree_flatten_with_path(prev["params"])[0]
    leaves_last = jax.tree_util.tree_flatten(last["params"])[0]
    paths = [jax.tree_util.keystr(p) for p, _ in leaves_prev]
    diff_mean = np.array([
        float(np.mean(np.abs(np.asarray(b, np.float64)
                             - np.asarray(a, np.float64))))
        if np.size(a) else 0.0
        for (_, a), b in zip(leaves_prev, leaves_last)])

    acts_deg = _dense_inputs(model, variables, all_dense, x[deg], batch_size)
    acts_imp = _dense_inputs(model, variables, all_dense, x[imp], batch_size)
    kpath = {}
    fi_deg = {}
    fi_imp = {}
    for n in all_dense:
        kernel = np.asarray(models_base.get_layer_params(params, n)["kernel"])
        fi_deg[n] = forward_impact(kernel, acts_deg[n])
        fi_imp[n] = forward_impact(kernel, acts_imp[n])
        want = "".join(f"['{p}']" for p in n.split("/")) + "['kernel']"
        kpath[want] = n
    fd_mean = np.array([float(fi_deg[kpath[p]].mean()) if p in kpath else 0.0
                        for p in paths])
    fi_mean = np.array([float(fi_imp[kpath[p]].mean()) if p in kpath else 0.0
                        for p in paths])
    susp = suspiciousness(diff_mean, fd_mean, fi_mean)
    sizes = [int(np.size(a)) for _, a in leaves_prev]
    n_by_path = {p: num_localised(s, v, reduction_rate)
                 for p, s, v in zip(paths, sizes, susp)}
    num_per_layer = {kpath[p]: n_by_path[p] for p in paths if p in kpath}

    g_deg = ce_gradients(model, variables, x[deg], y[deg], batch_size)
    g_imp = ce_gradients(model, variables, x[imp], y[imp], batch_size)
    per_layer, idxs, lays = {}, [], []
    for i, n in enumerate(layers):
        kernel = np.asarray(models_base.get_layer_params(params, n)["kernel"])
        delta = (np.asarray(models_base.get_layer_params(
            last["params"], n)["kernel"], np.float64)
            - np.asarray(models_base.get_layer_params(
                prev["params"], n)["kernel"], np.float64))
        flat = localised_set(
            delta, fi_deg[n], models_base.get_layer_params(g_deg, n)["kernel"],
            fi_imp[n], models_base.get_layer_params(g_imp, n)["kernel"],
            num_per_layer[n], has_imp=bool(imp.any()))
        idx = np.stack(np.unravel_index(flat, kernel.shape), axis=1).astype(
            np.int32).reshape(-1, 2)
        per_layer[n] = idx
        idxs.append(idx)
        lays.append(np.full((len(idx),), i, np.int32))
    return {"layers": layers,
            "indices": (np.concatenate(idxs) if idxs
                        else np.zeros((0, 2), np.int32)),
            "layer": (np.concatenate(lays) if lays
                      else np.zeros((0,), np.int32)),
            "deg": deg, "imp": imp,
            "susp": dict(zip(paths, susp.tolist())),
            "num_per_layer": num_per_layer, "per_layer": per_layer}


# ---------------------------------------------------------------------------
# Fitness and search (pure JAX)
# ---------------------------------------------------------------------------

def _term(z, y):
    """``(acc + 1) / (mean CE + 1)`` of logits ``z`` on labels ``y``."""
    loss, ok = _fitness.cross_entropy_and_correct(z, y)
    return (jnp.mean(ok) + 1.0) / (jnp.mean(loss) + 1.0)


def combine(z_neg, y_neg, z_pos, y_pos, alpha: float):
    """NeuRecover's fitness from the logits on I_neg and on P:
    ``(acc(I_neg) + 1)/(L_neg + 1) + alpha (acc(P) + 1)/(L_pos + 1)``, ``L``
    the mean cross-entropy; an empty ``P`` contributes 0."""
    f = _term(z_neg, y_neg)
    if y_pos.shape[0] > 0:
        f = f + alpha * _term(z_pos, y_pos)
    return f


def make_fitness(neg: _fitness.LayerCache, y_neg, pos: _fitness.LayerCache,
                 y_pos, rows, cols, w0, alpha: float):
    """NeuRecover's fitness (:func:`combine`, maximise) of one candidate
    ``v`` (k,) for kernel entries of the cached (logits) layer."""
    zn = _fitness.candidate_logits(neg, rows, cols, w0)
    zp = _fitness.candidate_logits(pos, rows, cols, w0)
    y_neg, y_pos = jnp.asarray(y_neg), jnp.asarray(y_pos)

    def fitness(v):
        return combine(zn(v), y_neg, zp(v) if y_pos.shape[0] else None,
                       y_pos, alpha)

    return fitness


@functools.partial(jax.jit, static_argnames=(
    "particles", "max_iterations", "phi", "patience", "num_positive",
    "alpha"))
def _search(key, h_pos, y_pos, z_pos, h_neg, y_neg, z_neg, rows, cols, w0,
            mean, std, v_min, v_max, *, particles, max_iterations, phi,
            patience, num_positive, alpha):
    """The search when every localised weight is in the logits layer: a
    candidate only adds ``h[:, rows] @ ...`` to the cached logits."""
    k_init, k_pos, k_pso = jax.random.split(key, 3)
    h_pos, y_pos, z_pos = _fitness.sample_with_replacement(
        k_pos, num_positive, h_pos, y_pos, z_pos)
    pos = _fitness.LayerCache("", h_pos, z_pos, z_pos)
    neg = _fitness.LayerCache("", h_neg, z_neg, z_neg)
    fitness = make_fitness(neg, y_neg, pos, y_pos, rows, cols, w0, alpha)
    init = mean + std * jax.random.normal(k_init, (particles, rows.shape[0]))
    res = search.pso_constriction(
        k_pso, fitness, init, max_iterations=max_iterations, phi=phi,
        v_min=v_min, v_max=v_max, patience=patience,
        population_strategy=seed_axis.population_strategy(True))
    return res, fitness(w0)


@functools.partial(jax.jit, static_argnames=(
    "particles", "max_iterations", "phi", "patience", "num_positive",
    "alpha"))
def _search_tail(key, h_pos, o_pos, y_pos, h_neg, o_neg, y_neg, w0, mean,
                 std, v_min, v_max, setup, *, particles, max_iterations, phi,
                 patience, num_positive, alpha):
    """The search over localised weights of several Dense layers (or of a
    hidden one), scored by :func:`_fitness.tail_logits` from the earliest
    localised layer's cached input and output (``setup``, a
    :class:`_fitness.TailSetup`); ``mean`` .. ``v_max`` are per entry (each
    from its own layer's kernel)."""
    k_init, k_pos, k_pso = jax.random.split(key, 3)
    h_pos, o_pos, y_pos = _fitness.sample_with_replacement(
        k_pos, num_positive, h_pos, o_pos, y_pos)
    zn = _fitness.tail_logits(setup, h_neg, o_neg)
    zp = _fitness.tail_logits(setup, h_pos, o_pos)

    def fitness(v):
        return combine(zn(v), y_neg, zp(v) if y_pos.shape[0] else None,
                       y_pos, alpha)

    init = mean + std * jax.random.normal(k_init, (particles, w0.shape[0]))
    res = search.pso_constriction(
        k_pso, fitness, init, max_iterations=max_iterations, phi=phi,
        v_min=v_min, v_max=v_max, patience=patience,
        population_strategy=seed_axis.population_strategy(False))
    return res, fitness(w0)


@functools.partial(jax.jit, static_argnames=(
    "model", "leaves", "particles", "max_iterations", "phi", "patience",
    "num_positive", "alpha"))
def _search_full(key, variables, flats, x_pos, y_pos, x_neg, y_neg, w0,
                 mean, std, v_min, v_max, *, model, leaves, particles,
                 max_iterations, phi, patience, num_positive, alpha):
    """The search of a non-sequential model whose localised weights are not
    all in the logits layer: a candidate runs the whole model from the
    inputs with the particle scattered into its parameters."""
    k_init, k_pos, k_pso = jax.random.split(key, 3)
    x_pos, y_pos = _fitness.sample_with_replacement(k_pos, num_positive,
                                                    x_pos, y_pos)
    idx = masks.Indices(leaves, tuple(flats), int(w0.shape[0]))

    def logits(v, x):
        return model.apply(masks.scatter_variables(variables, idx, v),
                           x).astype(jnp.float32)

    def fitness(v):
        return combine(logits(v, x_neg), y_neg,
                       logits(v, x_pos) if y_pos.shape[0] else None, y_pos,
                       alpha)

    init = mean + std * jax.random.normal(k_init, (particles, w0.shape[0]))
    res = search.pso_constriction(
        k_pso, fitness, init, max_iterations=max_iterations, phi=phi,
        v_min=v_min, v_max=v_max, patience=patience,
        population_strategy=seed_axis.population_strategy(False))
    return res, fitness(w0)


def _check_inputs(problem: base.Problem) -> None:
    for name, split in (("failing", problem.failing),
                        ("passing", problem.passing)):
        x = np.asarray(split.x)
        if x.size and not np.all(np.isfinite(x)):
            raise ValueError(
                f"NeuRecover: {name} repair inputs hold non-finite values "
                "(NaN/Inf); regressions and forward impacts would be NaN")


@base.register("neurecover", level="neuron", paper=PAPER,
               default_config=default_config, applicable=applicable,
               vmappable=True, abbrev="NR", check_config=check_config,
               codes={"stop_reason": search.STOP_REASONS})
def fix(key: jax.Array, problem: base.Problem,
        config: ml_collections.ConfigDict) -> base.FixResult:
    """Repairs ``problem`` with NeuRecover (history localisation + PSO); see
    the module docstring.

    Returns:
      FixResult whose ``mask`` selects the localised kernel entries (of
      every Dense kernel; of the logits one with ``localisation="last"``)
      and whose ``info`` has ``localised`` ((k, 2) kernel indices, in the
      particle's order), ``localised_layer`` ((k,) each one's position in
      the localised layers: :func:`dense_layers`, or just the logits layer
      with "last"), ``num_localised``, ``num_per_layer`` (n_k of each of
      those layers' kernels), ``n_target`` (n_k of the logits kernel),
      ``num_regressions``, ``num_improvements`` (over the repair split),
      ``suspiciousness`` (susp_k of the logits kernel), ``iterations``,
      ``fitness_trace`` (best per iteration, NaN-padded), ``best_fitness``,
      ``initial_fitness`` (the unchanged model's), ``stop_reason`` (code
      into :data:`dlfix_jax.search.STOP_REASONS`) and ``evaluations``.

    Raises:
      ValueError: no history of two epochs, non-finite variables, history
        or inputs, no failing inputs, no regression between the last two
        checkpoints, or an empty localised set (in every localised layer).
    """
    model, variables = problem.model, problem.variables
    params = variables["params"]
    hist = problem.history
    if hist is None or len(hist) < 2:
        raise ValueError(applicable(problem.info) or
                         "NeuRecover needs a training history")
    if len(problem.failing) == 0:
        raise ValueError("NeuRecover needs failing repair inputs (I_neg is "
                         "empty)")
    prev, last = hist[-2], hist[-1]
    base.check_finite(variables, "NeuRecover: the model's variables")
    base.check_finite(prev, "NeuRecover: checkpoint T-1's variables")
    base.check_finite(last, "NeuRecover: checkpoint T's variables")
    _check_inputs(problem)
    layer = arachne.target_layer(model, variables)
    all_dense = dense_layers(model, params)
    layers = all_dense if config.localisation == "all" else (layer,)

    # --- host part: depends on the problem only, never on the key ---------
    bs = int(config.batch_size)
    loc = localise(model, variables, prev, last, problem.repair.x,
                   problem.repair.y, layers, float(config.reduction_rate), bs)
    idx, lay = loc["indices"], loc["layer"]
    if not loc["deg"].any():
        raise ValueError(
            "NeuRecover: no regression between the last two checkpoints on "
            "the repair split (nothing is correct at T-1 and wrong at T)")
    if len(idx) == 0:
        where = (f"of {layer!r}" if len(layers) == 1
                 else "in any Dense kernel")
        n_k = {n: loc["num_per_layer"][n] for n in layers}
        raise ValueError(
            f"NeuRecover localised no weight {where} (n_k = {n_k}, "
            f"{int(loc['deg'].sum())} regressions, "
            f"{int(loc['imp'].sum())} improvements)")
    mask = masks.kernel_entries_mask(params, layers, lay, idx)
    g_idx = masks.indices_of(mask)
    # per-entry data in gene order (that of masks.indices_of)
    per_gene = functools.partial(masks.per_gene, params, layers, idx=g_idx)
    lay, rows, cols = masks.gene_coords(params, layers, g_idx)
    idx = np.stack([rows, cols], axis=1)
    mean = per_gene(lambda n, i, k: np.full(k.shape, np.mean(k)))
    std = per_gene(lambda n, i, k: np.full(k.shape, np.std(k)))
    wb = per_gene(lambda n, i, k: np.full(k.shape, np.max(k) - np.min(k)))
    w0 = np.asarray(masks.gather(params, g_idx), np.float32)
    v_min = (wb.astype(np.float64) * float(config.v_min_factor)).astype(
        np.float32)
    v_max = (wb.astype(np.float64) * float(config.v_max_factor)).astype(
        np.float32)
    y_neg = np.asarray(problem.failing.y, np.int32)
    y_pos = np.asarray(problem.passing.y, np.int32)
    num_positive = int(config.num_positive) if len(y_pos) else 0
    kw = dict(particles=int(config.particles),
              max_iterations=int(config.max_iterations),
              phi=float(config.phi), patience=int(config.patience),
              num_positive=num_positive, alpha=float(config.alpha))
    used = [layers[i] for i in np.unique(lay)]

    # --- device part: key-dependent, static shapes -------------------------
    if used == [layer] and _fitness.is_logits_layer(model, layer):
        # only the logits layer: a candidate changes the cached logits
        neg = _fitness.cache_layer(model, variables, layer,
                                   problem.failing.x, bs)
        pos = _fitness.cache_layer(model, variables, layer,
                                   problem.passing.x, bs)
        res, f_orig = _search(
            key, jnp.asarray(pos.h), jnp.asarray(y_pos),
            jnp.asarray(pos.logits), jnp.asarray(neg.h), jnp.asarray(y_neg),
            jnp.asarray(neg.logits), jnp.asarray(rows), jnp.asarray(cols),
            jnp.asarray(w0), jnp.asarray(mean), jnp.asarray(std),
            jnp.asarray(v_min), jnp.asarray(v_max), **kw)
    elif model.is_sequential:
        setup = _fitness.tail_setup(model, variables, mask, layers)
        first = setup.layer
        neg = _fitness.cache_layer(model, variables, first,
                                   problem.failing.x, bs)
        pos = _fitness.cache_layer(model, variables, first,
                                   problem.passing.x, bs)
        res, f_orig = _search_tail(
            key, jnp.asarray(pos.h), jnp.asarray(pos.out), jnp.asarray(y_pos),
            jnp.asarray(neg.h), jnp.asarray(neg.out), jnp.asarray(y_neg),
            jnp.asarray(w0), jnp.asarray(mean), jnp.asarray(std),
            jnp.asarray(v_min), jnp.asarray(v_max), setup, **kw)
    else:
        res, f_orig = _search_full(
            key, variables, tuple(jnp.asarray(f) for f in g_idx.flat),
            jnp.asarray(problem.passing.x), jnp.asarray(y_pos),
            jnp.asarray(problem.failing.x), jnp.asarray(y_neg),
            jnp.asarray(w0), jnp.asarray(mean), jnp.asarray(std),
            jnp.asarray(v_min), jnp.asarray(v_max), model=model,
            leaves=tuple(g_idx.leaves), **kw)

    new_vars = masks.scatter_variables(variables, g_idx, res.best_x)
    tpath = ("".join(f"['{p}']" for p in layer.split("/")) + "['kernel']")
    info = {
        "localised": jnp.asarray(idx, jnp.int32),
        "localised_layer": jnp.asarray(lay, jnp.int32),
        "num_localised": jnp.int32(len(idx)),
        "num_per_layer": jnp.asarray(
            [loc["num_per_layer"][n] for n in layers], jnp.int32),
        "n_target": jnp.int32(loc["num_per_layer"][layer]),
        "num_regressions": jnp.int32(int(loc["deg"].sum())),
        "num_improvements": jnp.int32(int(loc["imp"].sum())),
        "suspiciousness": jnp.float32(loc["susp"].get(tpath, 0.0)),
        "iterations": res.generations,
        "fitness_trace": res.trace,
        "best_fitness": res.best_fitness,
        "initial_fitness": f_orig,
        "stop_reason": res.stop_reason,
        "evaluations": res.evaluations,
    }
    return base.FixResult(new_vars, mask, info)
