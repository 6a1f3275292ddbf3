"""VeRe: verification-guided repair of one hidden neuron per round.

Source: J. Ma, P. Yang, J. Wang, Y. Sun, C.-C. Huang, Z. Wang, "VeRe:
Verification Guided Synthesis for Repairing Deep Neural Networks", ICSE
2024; semantics checked against ``nninjn/VeRe`` @b133bac^
(``backdoor/repair.py``: ``compute_max_effect``, ``new_repair``,
``analyze_neuron_action``, ``repair_data_classification``;
``backdoor/main1.py``; ``backdoor/utils/network.py``; the artifact
README's commands), read but not copied (summary in
``../shared/reference/fixer_specs.md``, section VERE).

The block
---------
VeRe repairs a neuron ``n`` of a hidden **Dense → ReLU → Dense** block:
its value is the ReLU output ``h_n = relu(x·W_in[:, n] + b_in[n])`` (``x``
the input of the first Dense ``D_in``), read by the next Dense ``D_out``.
The original hard-codes this (its ``check_layer = 1`` is the first hidden
dense layer's ReLU output of a VGG13 with two hidden dense layers, its
``VGG13_split2`` the sub-network after it, and its write-back indexes the
state dict positionally around the neuron), which is why the study marked
it UNADAPTABLE on every model but its CIFAR-10 VGG16.

**What ours accepts** (:func:`resolve`): any *sequential* model with a
``dense → [bn] → relu → [flatten | dropout]* → dense`` block whose layers
after the ReLU are all CROWN-supported (``dense``, ``conv``, ``bn``,
``relu``, ``flatten``, ``dropout``, ``avgpool``, ``gap``; see
:mod:`dlfix_jax.fixers._bounds`) and whose two Dense layers have biases.
``config.layer = ""`` takes the **first** such ReLU (the original's
``check_layer = 1``: the first hidden dense layer); a ReLU may be named.
A BatchNorm between ``D_in`` and the ReLU is affine in inference mode
(``a_n z + c_n``) and is folded: the neuron's effective incoming weights
are ``a_n W_in[:, n]`` and bias ``a_n b_in[n] + c_n``, and the fitted
values are written back divided by ``a_n`` (neurons with ``|a_n| <
1e-12`` are never selected). So the study's MNIST LeNet5 (``dense1 →
relu3 → dense2``), UTKFace FaceNet and CIFAR-10 VGG16 (``dense1 →
bn_dense1 → relu_dense1 → dropout → dense2``) are accepted;
ResNet18 and DenseNet121 (not sequential; no hidden Dense) are refused.

Algorithm (per round, ``rounds = 20`` rounds)
---------------------------------------------
1. Run the current model on the repair split. *Failing* inputs: the
   originally failing repair inputs (I_neg) that the current model still
   misclassifies, the first ``max_failing = 128`` in order; *correct*:
   the originally passing inputs (I_pos) it classifies correctly. No
   failing input left: stop.
2. **Intervals.** For each neuron, ``m, M`` = its min and max over the
   whole repair split, ``D = M − m``; ``intervals = 10`` equal intervals
   over ``[m − D, m − D + D·interval_times]`` (``interval_times = 1``: the
   CIFAR branch, all below the observed minimum, i.e. suppression only).
3. **Significance.** For each neuron ``n``, interval ``j`` and failing
   input ``i``: the box over ``h`` in which only ``h_n`` moves within the
   interval (the others fixed at input ``i``'s values); backward CROWN over
   the layers after the ReLU bounds the margin ``(e_true − e_pred)·z``
   below by ``lA·h + lbias``, evaluated at both interval ends, minus the
   current margin: ``gain[n, i, j, end]``. ``eff[n, i] = max(0, max_{j,end}
   gain)``, min-max normalised over neurons per input (0 when constant);
   ``score_n = Σ_i eff[n, i]``; the top-1 neuron is repaired.
4. **Targets.** Failing input ``i``: if some intervals have both ends'
   bound ``> 0`` (margin certified positive at the ends), the one of them
   nearest to the current value (``min`` distance of its ends); otherwise
   the end value with the largest positive gain (a point target); no gain:
   the current value. Correct inputs: their current value. The mini data
   are the failing inputs and the first ``ratio = 10`` × as many correct
   ones.
5. **Fit.** Mini-net ``w2·relu(x·w1 + b1) + b2`` initialised to the
   neuron's (effective) incoming weights and bias and ``(w2, b2) = (1,
   0)``; loss per batch ``Σ hinge² / batch`` with hinge ``out − hi`` above
   the target interval, ``out − lo`` below, 0 inside; Adam ``lr = 0.01``,
   ``local_epochs`` epochs of shuffled batches of ``batch_size = 64``; a
   batch whose loss is exactly 0 takes no step (the original's
   ``continue``, which also leaves Adam's moments untouched).
6. **Write-back** (exact): ``W_in[:, n], b_in[n] ←`` the fitted ``w1, b1``
   (BN folded back); ``b_out += b2·W_out[n, :]``; ``W_out[n, :] *= w2``.
   The model then equals the original with ``h_n`` replaced by the
   mini-net's output, for every input.
7. **Keep-best.** Score = ``#correct(I_pos) + #correct(I_neg)`` on the
   repair split after the round; a strictly higher score becomes the best.
   The next round continues from the *current* (not the best) model, as
   the original does; the best is returned.

Defaults and where they come from
---------------------------------
* ``rounds = 20``, ``intervals = 10``: the artifact README's commands
  (``--layer_round 20 --interval 10``).
* ``local_epochs = 5``: the original's ``--localepoch`` default in its
  safety ``main.py`` (the backdoor CLI has no default; the study does not
  say).
* ``interval_times = 1.0``: the CIFAR branch (the study's only adaptable
  cell); ``max_failing = 128``, ``ratio = 10``, ``lr = 0.01``,
  ``batch_size = 64`` (``BATCH_SIZE`` of the CIFAR branch): the original.
* ``lower_slope = "adaptive"``: auto_LiRPA's default ReLU lower slope for
  ``backward (CROWN)`` (the original's ``approximate_method``).
* ``layer = ""``: the first hidden Dense block (``check_layer = 1``).

Deviations from the paper and the original code
-----------------------------------------------
* **Objective (ours).** The original repairs backdoors: failing inputs
  are poisoned inputs classified as the target, and ``e_pred`` is that
  target. We repair misclassifications: failing = misclassified repair
  inputs, ``e_pred`` their predicted class (per input; the original's
  code is already per input).
* **Data.** The original draws 1,000 poisoned and 1,000 clean repair
  inputs; we use the repair split: ranges over all of it, failing inputs
  from I_neg, correct from I_pos. Keep-best: the original's score is
  ``N·acc_clean + #poisoned fixed`` with ``N = N_clean = 1000`` by
  default, i.e. the number of correct repair inputs; ours is that count
  over I_pos ∪ I_neg (so ``N = |I_pos|``).
* **CROWN** is ours (:mod:`dlfix_jax.fixers._bounds`), not auto_LiRPA:
  the same backward linear relaxation and "adaptive" lower slope;
  intermediate ReLU bounds are CROWN intersected with IBP (auto_LiRPA
  uses CROWN alone; the intersection is never looser). α-CROWN
  ("Optimized" methods) is not implemented (the original's CIFAR runs do
  not use it).
* **Accepted models** (above): any sequential dense–[bn]–relu–dense block
  with a CROWN-supported tail instead of hand-written split modules; BN
  folding is ours. Convolutional "neurons" are not supported.
* Only the backdoor ``compute_max_effect`` + ``new_repair`` path; the
  ``check_layer == 0`` branch (a 1→1 mini-net), the ImageNet variant
  (``interval_times = 1.5``, intervals from ``m``, 16 failing inputs) and
  the PSO / fine-tuning variants are not implemented.
* The ``>=`` keep-best branch (``N·acc + succ >= best and acc >
  acc_0``) of the SVHN/ImageNet branches is not used (the CIFAR branch
  takes it only at ``check_layer == 0``).
* Shapes are padded to ``min(|I_neg|, max_failing)`` failing slots so one
  compilation serves every round; padded slots have no effect.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dlfix_jax import masks
from dlfix_jax.fixers import _bounds
from dlfix_jax.fixers import base
from dlfix_jax.models import base as models_base
from dlfix_jax.models import layers as layers_lib

PAPER = ("Ma, Yang, Wang, Sun, Huang, Wang. VeRe: Verification Guided "
         "Synthesis for Repairing Deep Neural Networks. ICSE 2024")

STOP_REASONS = ("rounds", "no_failing")

_PASS_THROUGH = ("flatten", "dropout")
_MIN_SCALE = 1e-12
# Floats per chunk of the significance computation (neurons x boxes x d).
_CHUNK_FLOATS = 1 << 24


def default_config() -> ml_collections.ConfigDict:
    """VeRe's defaults (see the module docstring for their sources)."""
    cfg = ml_collections.ConfigDict()
    cfg.layer = ""              # "" -> the first dense-[bn]-relu-dense block
    cfg.rounds = 20             # --layer_round
    cfg.intervals = 10          # --interval
    cfg.interval_times = 1.0    # CIFAR branch
    cfg.local_epochs = 5        # --localepoch (safety main.py default)
    cfg.lr = 0.01               # Adam
    cfg.batch_size = 64         # BATCH_SIZE (CIFAR)
    cfg.max_failing = 128       # incor cap
    cfg.ratio = 10              # correct inputs per failing one
    cfg.lower_slope = "adaptive"
    cfg.eval_batch_size = 1024
    return cfg


def check_config(cfg) -> None:
    base.check_ranges(cfg, rounds=(0, None), intervals=(1, None),
                      interval_times=(0.0, None), local_epochs=(0, None),
                      lr=(0.0, None), batch_size=(1, None),
                      max_failing=(1, None), ratio=(0, None),
                      eval_batch_size=(1, None),
                      lower_slope=set(_bounds.LOWER_SLOPES))
    if not cfg.interval_times > 0:
        raise ValueError(f"config interval_times={cfg.interval_times} must "
                         "be > 0")


# ---------------------------------------------------------------------------
# The block
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Block:
    """A ``dense_in → [bn] → relu → ... → dense_out`` block and the layers
    after the ReLU (``tail``, static)."""

    relu: str
    dense_in: str
    bn: str | None
    dense_out: str
    tail: tuple[layers_lib.LayerSpec, ...]


def _block_at(model, i: int) -> Block:
    """The block around the ReLU at index ``i``; ValueError why not."""
    specs = list(model.layers)
    s = specs[i]
    if s.kind != "relu":
        raise ValueError(f"layer {s.name!r} is a {s.kind!r}, not a ReLU")
    j, bn = i - 1, None
    if j >= 0 and specs[j].kind == "bn":
        bn, j = specs[j].name, j - 1
    if j < 0 or specs[j].kind != "dense":
        raise ValueError(f"ReLU {s.name!r} does not follow a Dense layer "
                         "(optionally through one BatchNorm)")
    k = i + 1
    while k < len(specs) and specs[k].kind in _PASS_THROUGH:
        k += 1
    if k == len(specs) or specs[k].kind != "dense":
        raise ValueError(f"ReLU {s.name!r} is not read by a Dense layer "
                         "(through Flatten / Dropout only)")
    for d in (specs[j], specs[k]):
        if not d.opts.get("use_bias", True):
            raise ValueError(f"Dense {d.name!r} has no bias to write back")
    tail = tuple(specs[i + 1:])
    bad = _bounds.unsupported(tail)
    if bad:
        raise ValueError(f"layers after {s.name!r} that CROWN does not "
                         f"support: {bad}")
    return Block(s.name, specs[j].name, bn, specs[k].name, tail)


def resolve(model: models_base.Model, layer: str = "") -> Block:
    """The block VeRe repairs: the ReLU ``layer`` or ("") the first ReLU
    of a dense–[bn]–relu–dense block with a CROWN-supported tail.

    Raises:
      ValueError: the model is not sequential, has no such block, or
        ``layer`` is unknown / not such a ReLU.
    """
    if not model.is_sequential:
        raise ValueError(f"model {model.name!r} is not sequential: VeRe "
                         "needs a Dense -> ReLU -> Dense block and the "
                         "layers after it as a sequence")
    names = [s.name for s in model.layers]
    if layer:
        if layer not in names:
            raise ValueError(f"no layer {layer!r} in model {model.name!r}; "
                             f"layers: {names}")
        return _block_at(model, names.index(layer))
    reasons = []
    for i, s in enumerate(model.layers):
        if s.kind == "relu":
            try:
                return _block_at(model, i)
            except ValueError as e:
                reasons.append(str(e))
    raise ValueError(f"model {model.name!r} has no Dense -> [BN] -> ReLU -> "
                     f"Dense block with a CROWN-supported tail"
                     + (f" ({'; '.join(reasons[:3])})" if reasons else ""))


def applicable(info: base.ProblemInfo) -> str | None:
    try:
        resolve(info.model)
    except ValueError as e:
        return f"VeRe: {e}"
    return None


def bn_affine(model, variables, block: Block):
    """``(a, c)`` (units,) of the BatchNorm after ``dense_in`` in inference
    mode (``a z + c``); ones and zeros without one."""
    units = np.shape(models_base.get_layer_params(
        variables["params"], block.dense_in)["bias"])[0]
    if block.bn is None:
        return np.ones(units, np.float32), np.zeros(units, np.float32)
    spec = [s for s in model.layers if s.name == block.bn][0]
    eps = float(spec.opts.get("epsilon", 1e-3))
    p = variables["params"].get(block.bn, {})
    st = variables["batch_stats"][block.bn]
    scale = np.asarray(p.get("scale", np.ones(units)), np.float64)
    shift = np.asarray(p.get("bias", np.zeros(units)), np.float64)
    a = scale / np.sqrt(np.asarray(st["var"], np.float64) + eps)
    c = shift - np.asarray(st["mean"], np.float64) * a
    return a.astype(np.float32), c.astype(np.float32)


# ---------------------------------------------------------------------------
# Significance (pure JAX; one batched call per round)
# ---------------------------------------------------------------------------

def interval_grid(h: np.ndarray, num: int, times: float) -> np.ndarray:
    """(d, num, 2) intervals ``[m − D + k·s, m − D + (k+1)·s]``, ``s =
    D·times/num``, from each neuron's observed range ``[m, M]``."""
    m, big = h.min(axis=0).astype(np.float64), h.max(axis=0).astype(np.float64)
    diff = big - m
    st = m - diff
    step = diff * float(times) / int(num)
    k = np.arange(int(num), dtype=np.float64)
    lo = st[:, None] + step[:, None] * k[None]
    hi = st[:, None] + step[:, None] * (k[None] + 1)
    return np.stack([lo, hi], axis=-1).astype(np.float32)


def margin_gains(tail, tail_vars, h, c, ori, eps, *,
                 lower_slope: str = "adaptive", chunk: int = 0):
    """``gain[n, i, j, e]``: CROWN's lower bound of the margin ``c_i·z`` at
    end ``e`` of interval ``j`` of neuron ``n`` (the box where only ``h_n``
    moves in that interval, input ``i``'s other values fixed), minus the
    current margin ``ori_i``. Traceable.

    Args:
      tail: the layer specs after the ReLU; ``tail_vars`` their variables.
      h: (S, d) the ReLU outputs of the failing inputs.
      c: (S, C) margin rows ``e_true − e_pred``; ``ori``: (S,) margins.
      eps: (d, K, 2) intervals.
      chunk: neurons per ``vmap`` batch of the ``lax.map`` (0: all).

    Returns:
      (d, S, K, 2).
    """
    s_, d = h.shape
    k = eps.shape[1]

    def one(args):
        n, e = args                                      # (), (K, 2)
        sel = (jnp.arange(d) == n)[None, None, :]
        lo = jnp.where(sel, e[:, None, None, 0], h[None])   # (K, S, d)
        hi = jnp.where(sel, e[:, None, None, 1], h[None])
        lo, hi = lo.reshape(k * s_, d), hi.reshape(k * s_, d)
        cc = jnp.broadcast_to(c[None, :, None, :], (k, s_, 1, c.shape[-1]))
        b = _bounds.crown(tail, tail_vars, lo, hi,
                          cc.reshape(k * s_, 1, c.shape[-1]),
                          lower_slope=lower_slope)
        at_lo = _bounds.evaluate(b.lA, b.lbias, lo)[:, 0]
        at_hi = _bounds.evaluate(b.lA, b.lbias, hi)[:, 0]
        g = jnp.stack([at_lo, at_hi], axis=-1).reshape(k, s_, 2)
        return jnp.transpose(g - ori[None, :, None], (1, 0, 2))

    idx = jnp.arange(d)
    if chunk <= 0 or chunk >= d:
        return jax.vmap(lambda n, e: one((n, e)))(idx, eps)
    return jax.lax.map(one, (idx, eps), batch_size=int(chunk))


@functools.partial(jax.jit, static_argnames=("tail", "lower_slope", "chunk"))
def _gains(tail_vars, h, c, ori, eps, *, tail, lower_slope, chunk):
    return margin_gains(tail, tail_vars, h, c, ori, eps,
                        lower_slope=lower_slope, chunk=chunk)


def significance(gains: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``score_n = Σ_i normalise_n(max(0, max_{j,e} gain[n, i, j, e]))``
    over the valid failing inputs (min-max over neurons per input; 0 for an
    input whose effects are all equal)."""
    eff = np.maximum(0.0, gains.max(axis=(2, 3)))          # (d, S)
    eff = np.where(valid[None, :], eff, 0.0)
    mx, mn = eff.max(axis=0), eff.min(axis=0)
    span = mx - mn
    eff = np.where(span[None] > 0,
                   (eff - mn[None]) / np.where(span > 0, span, 1.0)[None], 0.)
    return eff.sum(axis=1)


def targets(gain_n: np.ndarray, eps_n: np.ndarray, cur: np.ndarray,
            ori: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Target intervals ``(lo, hi)`` (S,) of the repaired neuron for the
    failing inputs (see step 4 of the module docstring).

    Args:
      gain_n: (S, K, 2) the neuron's gains; eps_n: (K, 2) its intervals;
      cur: (S,) its current values; ori: (S,) the current margins.
    """
    lo, hi = cur.astype(np.float32).copy(), cur.astype(np.float32).copy()
    for i in range(len(cur)):
        bound = gain_n[i] + ori[i]                          # (K, 2)
        whole = np.nonzero((bound[:, 0] > 0) & (bound[:, 1] > 0))[0]
        if whole.size:
            dist = np.minimum(np.abs(eps_n[whole, 0] - cur[i]),
                              np.abs(eps_n[whole, 1] - cur[i]))
            j = whole[int(np.argmin(dist))]
            lo[i], hi[i] = eps_n[j, 0], eps_n[j, 1]
            continue
        best = 0.0
        for j in range(gain_n.shape[1]):
            e = int(np.argmax(gain_n[i, j]))
            if gain_n[i, j, e] > best:
                best = gain_n[i, j, e]
                lo[i] = hi[i] = eps_n[j, e]
    return lo, hi


# ---------------------------------------------------------------------------
# Mini-net fit (pure JAX)
# ---------------------------------------------------------------------------

def mini_net(p, x):
    """``w2·relu(x·w1 + b1) + b2`` (N,)."""
    return p["w2"] * jax.nn.relu(x @ p["w1"] + p["b1"]) + p["b2"]


def hinge_sq(out, lo, hi):
    """``(out − hi)²`` above, ``(out − lo)²`` below, 0 inside."""
    e = jnp.where(out > hi, out - hi, jnp.where(out < lo, out - lo, 0.0))
    return e * e


@functools.partial(jax.jit, static_argnames=("epochs", "batch_size", "lr"))
def fit_mini_net(key, x, lo, hi, valid, w1, b1, *, epochs: int,
                 batch_size: int, lr: float):
    """Fits the mini-net (init ``w1, b1, 1, 0``) to the targets on the
    ``valid`` rows: ``epochs`` passes of shuffled batches (the valid rows
    in a random order, the last batch partial), Adam ``lr``; a batch with
    zero loss takes no step. Returns ``(params, losses (epochs, batches))``.
    """
    n = x.shape[0]
    nb = -(-n // batch_size)
    pad = nb * batch_size - n
    x = jnp.pad(x, ((0, pad), (0, 0)))
    lo, hi = jnp.pad(lo, (0, pad)), jnp.pad(hi, (0, pad))
    valid = jnp.pad(valid, (0, pad))
    n_valid = jnp.sum(valid)
    params = {"w1": w1, "b1": b1, "w2": jnp.float32(1.0),
              "b2": jnp.float32(0.0)}
    tx = optax.adam(lr)

    def loss_fn(p, xb, lob, hib, mb, cnt):
        e = hinge_sq(mini_net(p, xb), lob, hib)
        return jnp.sum(jnp.where(mb, e, 0.0)) / jnp.maximum(cnt, 1)

    def epoch(carry, k):
        r = jax.random.uniform(k, (x.shape[0],))
        order = jnp.argsort(jnp.where(valid, r, 2.0))

        def step(carry, b):
            p, st = carry
            idx = jax.lax.dynamic_slice(order, (b * batch_size,),
                                        (batch_size,))
            mb = b * batch_size + jnp.arange(batch_size) < n_valid
            cnt = jnp.sum(mb)
            loss, g = jax.value_and_grad(loss_fn)(p, x[idx], lo[idx],
                                                  hi[idx], mb, cnt)
            upd, st2 = tx.update(g, st, p)
            p2 = optax.apply_updates(p, upd)
            take = (cnt > 0) & (loss != 0)
            pick = lambda a, b_: jnp.where(take, a, b_)  # noqa: E731
            return (jax.tree_util.tree_map(pick, p2, p),
                    jax.tree_util.tree_map(pick, st2, st)), loss

        return jax.lax.scan(step, carry, jnp.arange(nb))

    if epochs == 0:
        return params, jnp.zeros((0, nb), jnp.float32)
    (params, _), losses = jax.lax.scan(epoch, (params, tx.init(params)),
                                       jax.random.split(key, epochs))
    return params, losses


# ---------------------------------------------------------------------------
# Write-back
# ---------------------------------------------------------------------------

def write_back(variables, block: Block, neuron: int, mini, a, c):
    """``variables`` with neuron ``neuron`` replaced by the mini-net: the
    incoming column and bias of ``dense_in`` ← ``(w1, b1)`` (BatchNorm
    ``a z + c`` folded back), ``dense_out``'s bias ``+= b2·W_out[n]`` and
    row ``W_out[n] *= w2``. Every other entry is the original object."""
    n = int(neuron)
    params = variables["params"]
    pin = dict(models_base.get_layer_params(params, block.dense_in))
    pout = dict(models_base.get_layer_params(params, block.dense_out))
    an, cn = jnp.float32(a[n]), jnp.float32(c[n])
    k_in = jnp.asarray(pin["kernel"])
    pin["kernel"] = k_in.at[:, n].set(
        (jnp.asarray(mini["w1"]) / an).astype(k_in.dtype))
    b_in = jnp.asarray(pin["bias"])
    pin["bias"] = b_in.at[n].set(((mini["b1"] - cn) / an).astype(b_in.dtype))
    k_out = jnp.asarray(pout["kernel"])
    row = k_out[n]
    pout["bias"] = (jnp.asarray(pout["bias"]) + mini["b2"] * row).astype(
        k_out.dtype)
    pout["kernel"] = k_out.at[n].set((row * mini["w2"]).astype(k_out.dtype))
    params = models_base.set_layer_params(params, block.dense_in, pin)
    params = models_base.set_layer_params(params, block.dense_out, pout)
    out = dict(variables)
    out["params"] = params
    return out


def neuron_mask(params, block: Block, neurons) -> masks.Mask:
    """Entries :func:`write_back` may change for ``neurons``: their
    ``dense_in`` columns and biases, ``dense_out`` rows and all of
    ``dense_out``'s bias."""
    neurons = np.asarray(sorted(set(int(n) for n in neurons)), np.int64)
    m_in = masks.unit_mask(params, block.dense_in, neurons)
    units = np.shape(models_base.get_layer_params(
        params, block.dense_out)["kernel"])[1]
    idx = np.stack([np.repeat(neurons, units),
                    np.tile(np.arange(units), len(neurons))], axis=1)
    m_out = masks.weight_mask(params, block.dense_out, idx)
    if len(neurons):
        sub = dict(models_base.get_layer_params(m_out, block.dense_out))
        sub["bias"] = np.ones(np.shape(sub["bias"]), bool)
        m_out = models_base.set_layer_params(m_out, block.dense_out, sub)
    return masks.mask_or(m_in, m_out)


# ---------------------------------------------------------------------------
# The fixer
# ---------------------------------------------------------------------------

def _forward(model, variables, block: Block, x, batch_size: int):
    """(logits, ReLU outputs h, dense_in inputs) on ``x`` (host float32)."""
    fn = models_base.jitted_apply(model, (block.relu, block.dense_in))
    zs, hs, xs = [], [], []
    for i in range(0, len(x), batch_size):
        z, acts = fn(variables, x[i:i + batch_size])
        zs.append(np.asarray(z, np.float32))
        hs.append(np.asarray(acts[block.relu]["output"], np.float32))
        xs.append(np.asarray(acts[block.dense_in]["input"], np.float32))
    z, h, xin = (np.concatenate(a) for a in (zs, hs, xs))
    if h.ndim != 2 or xin.ndim != 2:
        raise ValueError(f"VeRe: {block.relu!r} output {h.shape[1:]} / "
                         f"{block.dense_in!r} input {xin.shape[1:]} are not "
                         "flat feature vectors")
    return z, h, xin


def _chunk(d: int, boxes: int, width: int) -> int:
    return max(1, _CHUNK_FLOATS // max(1, boxes * d * width))


@base.register("vere", level="neuron", paper=PAPER,
               default_config=default_config, applicable=applicable,
               vmappable=False, abbrev="VERE", check_config=check_config,
               codes={"stop_reason": STOP_REASONS})
def fix(key: jax.Array, problem: base.Problem,
        config: ml_collections.ConfigDict) -> base.FixResult:
    """Repairs ``problem`` with VeRe (see the module docstring).

    Returns:
      FixResult with the best round's variables, the mask of the entries
      the rounds up to it may have changed, and ``info``: ``neurons``
      (rounds,) the neuron repaired per round (-1: not run), ``best_round``
      (0: the original), ``score_trace`` (rounds + 1,) the keep-best score
      after each round (NaN: not run; entry 0 the original's),
      ``failing_trace`` (rounds,) the failing inputs each round targeted,
      ``rounds_run`` and ``stop_reason`` (code into :data:`STOP_REASONS`).

    Raises:
      ValueError: no failing repair inputs, non-finite variables or
        activations, or a ``config.layer`` that is not such a block.
    """
    model, variables = problem.model, problem.variables
    if len(problem.failing) == 0:
        raise ValueError("VeRe needs failing repair inputs (I_neg is empty)")
    base.check_finite(variables, "VeRe: the model's variables")
    block = resolve(model, str(config.layer))
    bs = int(config.eval_batch_size)
    x_all = jnp.concatenate([problem.failing.x, problem.passing.x])
    y_all = np.concatenate([np.asarray(problem.failing.y),
                            np.asarray(problem.passing.y)]).astype(np.int64)
    n_neg = len(problem.failing)
    slots = min(n_neg, int(config.max_failing))
    ratio = int(config.ratio)
    rows = (ratio + 1) * slots
    num_k = int(config.intervals)
    tail_names = [s.name for s in block.tail]
    a, c = bn_affine(model, variables, block)
    allowed = np.abs(a) > _MIN_SCALE
    rounds = int(config.rounds)
    keys = jax.random.split(key, max(rounds, 1))

    cur = variables
    z, h, xin = _forward(model, cur, block, x_all, bs)
    if not (np.all(np.isfinite(z)) and np.all(np.isfinite(h))
            and np.all(np.isfinite(xin))):
        raise ValueError("VeRe: non-finite activations or logits on the "
                         "repair split")
    d = h.shape[1]
    chunk = _chunk(d, num_k * slots, max(d, model.num_classes))
    best, best_round = variables, 0
    best_score = int(np.sum(z.argmax(1) == y_all))
    score_trace = np.full(rounds + 1, np.nan, np.float32)
    score_trace[0] = best_score
    neurons = np.full(rounds, -1, np.int32)
    failing_trace = np.zeros(rounds, np.int32)
    stop, rounds_run = 0, 0
    for r in range(rounds):
        pred = z.argmax(1)
        fail = np.nonzero(pred[:n_neg] != y_all[:n_neg])[0][:slots]
        if fail.size == 0:
            stop = 1
            break
        cor = n_neg + np.nonzero(pred[n_neg:] == y_all[n_neg:])[0]
        cor = cor[:ratio * fail.size]
        eps = interval_grid(h, num_k, float(config.interval_times))
        valid = np.zeros(slots, bool)
        valid[:fail.size] = True
        hf = np.zeros((slots, d), np.float32)
        hf[:fail.size] = h[fail]
        cm = np.zeros((slots, model.num_classes), np.float32)
        yt, yp = y_all[fail], pred[fail]
        cm[np.arange(fail.size), yt] += 1.0
        cm[np.arange(fail.size), yp] -= 1.0
        ori = np.zeros(slots, np.float32)
        ori[:fail.size] = z[fail, yt] - z[fail, yp]
        tail_vars = models_base.split_variables(cur, tail_names)
        g = np.asarray(_gains(tail_vars, jnp.asarray(hf), jnp.asarray(cm),
                              jnp.asarray(ori), jnp.asarray(eps),
                              tail=block.tail,
                              lower_slope=str(config.lower_slope),
                              chunk=chunk))
        if not np.all(np.isfinite(g[:, valid])):
            raise ValueError("VeRe: non-finite CROWN bounds")
        score = significance(g, valid)
        score = np.where(allowed, score, -np.inf)
        n = int(np.argmax(score))
        lo_f, hi_f = targets(g[n][:fail.size], eps[n], h[fail, n],
                             ori[:fail.size])
        # mini data: failing first, then correct (current values as targets)
        mx = np.zeros((rows, xin.shape[1]), np.float32)
        mlo = np.zeros(rows, np.float32)
        mhi = np.zeros(rows, np.float32)
        mval = np.zeros(rows, bool)
        k1, k2 = fail.size, fail.size + cor.size
        mx[:k1], mlo[:k1], mhi[:k1] = xin[fail], lo_f, hi_f
        mx[k1:k2] = xin[cor]
        mlo[k1:k2] = mhi[k1:k2] = h[cor, n]
        mval[:k2] = True
        pin = models_base.get_layer_params(cur["params"], block.dense_in)
        w1 = jnp.asarray(pin["kernel"])[:, n] * a[n]
        b1 = jnp.asarray(pin["bias"])[n] * a[n] + c[n]
        mini, _ = fit_mini_net(
            keys[r], jnp.asarray(mx), jnp.asarray(mlo), jnp.asarray(mhi),
            jnp.asarray(mval), w1.astype(jnp.float32),
            jnp.asarray(b1, jnp.float32),
            epochs=int(config.local_epochs),
            batch_size=int(config.batch_size), lr=float(config.lr))
        cur = write_back(cur, block, n, mini, a, c)
        z, h, xin = _forward(model, cur, block, x_all, bs)
        s = int(np.sum(z.argmax(1) == y_all)) if np.all(np.isfinite(z)) \
            else -1
        neurons[r], failing_trace[r] = n, fail.size
        score_trace[r + 1] = s
        rounds_run = r + 1
        if s > best_score:
            best, best_score, best_round = cur, s, r + 1
        if not np.all(np.isfinite(h)):
            break  # a diverged mini-net: keep the best so far
    mask = neuron_mask(variables["params"], block, neurons[:best_round])
    info = {
        "neurons": jnp.asarray(neurons),
        "best_round": jnp.int32(best_round),
        "score_trace": jnp.asarray(score_trace),
        "failing_trace": jnp.asarray(failing_trace),
        "rounds_run": jnp.int32(rounds_run),
        "stop_reason": jnp.int32(stop),
    }
    return base.FixResult(best, mask, info)
