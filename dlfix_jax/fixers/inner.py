"""INNER (neuron level): probe-located routing masks and masked repair.

Source: Z. Chen, J. Zhou, Y. Sun, J. Wang, Q. Xuan, X. Yang,
"Interpretability Based Neural Network Repair", ISSTA 2024 (doi
10.1145/3650212.3680330); semantics read (not copied) from
``implicitDeclaration/inner`` @9e2cb68 (``main.py``: ``train_only_probe``,
``probe_train``, ``get_routing_per_layer``, ``single_img_optim``,
``get_weight_mask``, ``repair_mid_layers``, ``layer_rep``; ``exp.py``:
``anomaly_select``; ``utils/my_optim.py``: ``MySGD``; ``model/
cifar10_vgg.py``: ``Probe``, ``VGG13_dense``; ``utils/make_dataset.py``)
and ``shared/reference/fixer_specs.md`` ("IN — INNER"). The study's task is
the original's ``rep_type='wp'`` (wrong predictions): the "bad" inputs are
the failing repair inputs with their true labels and the reported "ASR" is
``1 − accuracy`` on a set of wrongly predicted inputs.

Algorithm
---------
*Blocks and probes.* The original's VGG13 has one probe after each
convolutional stage (after its pooling) and after each hidden Dense layer;
the block a probe belongs to is the last kernel layer before it
(``features1.3`` ... ``dense2``; the logits layer has no probe). On a
sequential model we place a probe site after kernel layer ``k_i`` (every
Conv / Dense but the last) when ``k_i`` is Dense or a pooling / flatten /
GAP layer lies between it and the next kernel layer; the probe reads the
input of the next kernel layer (dropout skipped). A probe on a 4-D feature
map is the original's small CNN ``Probe``: 1×1 conv + BN + ReLU, then
(``depth 2``) conv3×3/s2 ×2c, conv3×3/s2 ×2c, BN, ReLU, conv3×3 ×4c,
conv3×3 ×4c, BN, ReLU or (``depth 1``) two conv3×3 ×c each with BN + ReLU,
then global average pooling and a Dense layer. The original picks depth 2
for its 16×16 and 8×8 maps and depth 1 for 4×4 and 2×2; we use depth 2 when
the map's smaller side is ≥ 8. A probe on a flat vector is linear.

1. *Probe training* (``train_only_probe``): every probe on ``probe_num``
   (1,000) clean inputs (drawn with the key from the training split),
   backbone frozen, Adam lr 0.01, ``probe_epochs`` (50) epochs of batches
   of 128, softmax CE against the true labels.
2. *Layer selection* (``anomaly_select``): the first ``num_select`` (30)
   correctly classified repair inputs (clean) and the first 30 failing ones
   (bad); per probe ``l``, ``score_l = −Σ_k b̄_k log(c̄_k + 1e-7)`` with
   ``c̄``, ``b̄`` the mean probe softmaxes of the clean and bad inputs. The
   ``rep_layer_num`` (3) blocks with the largest scores are repaired, in
   that order.
3. *Routing* (``get_routing_per_layer`` / ``single_img_optim``): for each of
   ``routing_samples`` (100) failing inputs (a key-drawn order; the
   original's shuffled loader), one at a time, a routing ``R`` of the
   block's kernel shape, initialised to 1, takes ``routing_steps`` (40)
   steps ``R ← clip(R − 0.009·g − α·sign(R), 0, 1)`` (α = 0.005), where
   ``g`` is the gradient of ``CE(probe_l(x; W ⊙ R), argmax probe_l(x; W))``
   with respect to the **masked weight** ``W ⊙ R`` (the original replaces
   the parameter's data by ``R ⊙ W`` and reads ``p.grad``), not ``R``. The
   bias is not routed.
4. *Mask* (``get_weight_mask``): per sample, the kernel entries whose
   routing exceeds that sample's mean routing are counted; **every** counted
   entry is in the mask (the ``topk`` cut-off is commented out in the
   original; ``top_k > 0`` here restores a cut at the ``top_k`` most
   counted entries, ties to the lower flat index). A block's mask has the
   kernel's shape.
5. *Repair* (``repair_mid_layers`` / ``layer_rep``): up to ``epochs`` (20)
   epochs. In each, for every selected block in score order, one pass of
   plain SGD (``MySGD``: lr 7e-4, no momentum) over the block's
   parameters on zipped batches of 64 failing and 64 passing repair inputs
   (in order, unshuffled, as the original's loaders), with the loss
   ``0.8·CE(probe_b(x_bad), y_bad) + 0.2·softCE_T=3(probe_b(x_bad),
   stop_grad(probe_b(x_clean)))`` (``softCE = −Σ softmax(t/T) ·
   log_softmax(s/T)``, no T²). The kernel's gradient is multiplied by the
   mask. Then the stop rule; if not met, ``aug_epochs`` (2) passes per
   block of masked SGD on the model's CE over the failing inputs with a
   fresh augmentation per pass (``rota``: rotation by U(−30°, 30°) of the
   normalised input with zero fill; ``flip``: horizontal flip with p 0.5;
   the original's ``crop`` is ``RandomCrop`` to the input's own size
   without padding, the identity, so it is left out), then the stop rule
   again.
6. *Stop rule*: stop when the clean accuracy is ≥ its value before the
   repair − ``clean_drop`` (0.1) and the "ASR" (1 − accuracy on a held-out
   set of wrongly predicted inputs) is < ``asr_threshold`` (0.15, the
   original's value for ``wp``). As the original's ``val_nor`` / ``val_bd``
   (held-out test images and held-out wrong predictions) we use the first
   ``num_valid`` (1,000) validation inputs and the validation inputs the
   original model misclassifies (up to ``num_valid``); when the validation
   split has no misclassified input, the "ASR" is measured on the failing
   repair inputs instead (``info["stop_set"]``). The model at the stop (or
   after the last epoch) is returned; there is no keep-best.

Biases
------
In the original, ``MySGD`` multiplies a parameter's step by the mask only
when the parameter has the mask's (the kernel's) shape: **the block's bias
(and any other same-block parameter) updates unmasked**. We do the same by
default (``bias_unmasked = True``) and therefore put the whole bias of
every selected block into ``FixResult.mask``; ``bias_unmasked = False``
freezes the biases, so only masked kernel entries move.

Defaults and where they come from
---------------------------------
``probe_num = 1000``, ``probe_epochs = 50``, ``probe_lr = 0.01``,
``probe_batch_size = 128`` (``args.probe_train_num``, ``train_only_probe``,
``probe_train``); ``num_select = 30`` (``anomaly_select``);
``rep_layer_num = 3`` (``args.rep_layer_num``); ``routing_samples = 100``,
``routing_steps = 40``, ``routing_lr = 0.009``, ``routing_alpha = 0.005``
(``get_weight_mask`` / ``get_route_avg`` / ``single_img_optim``);
``top_k = 0`` (cut-off commented out; ``args.neuron_num = 100`` unused);
``epochs = 20``, ``lr = 7e-4``, ``batch_size = 64``, ``ce_weight = 0.8``,
``temperature = 3`` (``repair_mid_layers``, ``layer_rep``); ``aug_epochs =
2``, ``aug_rotation = 30``, ``aug_flip = True`` (``epoch2``, ``pro_lib``);
``clean_drop = 0.1``, ``asr_threshold = 0.15``, ``num_valid = 1000``
(``satisfy_bd_asr``, ``val_nor`` / ``val_bd`` of 1,000). ``routing_chunk``
(samples routed at once under ``vmap``) is a memory knob only.

JAX design
----------
Probe features are computed once (the backbone is frozen) and all probes
train in one jitted step on shared batches (``_probes_loss``). Routing runs
``vmap`` over ``routing_chunk`` inputs inside a ``lax.scan`` over chunks,
each a ``fori_loop`` of steps, and returns only the per-entry counts. The
repair steps are :func:`dlfix_jax.training.loop.make_step` with
``masked=True`` (plain SGD, stateless, so a fresh optimiser per pass is
the original's fresh ``MySGD`` per ``layer_rep`` call): gradients are zeroed
outside the mask and the update goes through one select, so every entry
outside ``FixResult.mask`` is bit-for-bit the original. Not vmappable
(host-side loop, stop rule on the host).

Observed (``BENCHMARKS.md``): the union over 100 inputs of "routing above
that input's mean" covered every entry of the chosen kernels on the
study's MNIST LeNet5 (and 99-100% on digits), so in practice the mask is
the whole kernel of each selected block, a consequence of the missing
``topk`` cut. On digits the horizontal flip (not label-preserving for
digits) causes about half of the accuracy loss (``aug_flip=False``: test
ACC ~0.90 instead of ~0.80); the default keeps the original's flip.

Deviations from the paper / original code
-----------------------------------------
* Sequential models only (the original also has ResNet18 with a probe per
  stage); ResNet18 / DenseNet121 are refused. Probe sites follow the rule
  above (the original hard-codes the blocks per architecture).
* BatchNorm: the original runs routing, repair and probe training with the
  model in train mode (batch statistics, of a single image during routing,
  and running statistics updated everywhere). We run every BatchNorm of the
  backbone and, after their training, of the probes on running statistics
  and update no statistics outside the probes' own training; dropout is on
  during the repair steps (keyed), off elsewhere.
* Probes are trained on training-split inputs (the original: 1,000 clean
  test images); they are initialised as torch's defaults (uniform
  ±1/√fan_in for kernels and biases, BatchNorm scale 1 and bias 0).
* Clean inputs for selection and distillation are the correctly classified
  repair inputs (the original: clean test images, in wp mode the first 30
  regardless of correctness); when a zipped pair of batches differs in
  size both are cut to the smaller (the original cuts the clean batch and
  would fail the other way).
* Rotation resamples bilinearly (torchvision's default is nearest).
* Non-finite repair losses raise ``RuntimeError`` (the original would
  continue on NaNs).

``mask``: per selected block, the routed kernel entries, plus the block's
whole bias when ``bias_unmasked``. ``info``: ``stop_reason`` (code into
:data:`STOP_REASONS`), ``epochs`` (repair epochs run), ``num_failing``,
``probe_layers`` (kernel-layer indices, in the model's order of Conv/Dense
layers, of the probe sites), ``probe_acc`` (each probe's training
accuracy), ``layer_scores``, ``selected`` (positions into the probe sites,
in repair order), ``mask_sizes`` (kernel entries per selected block),
``mask_size`` (entries in ``mask``), ``clean_acc_before``, ``asr_before``,
``clean_acc``, ``asr`` (at the end), ``stop_set`` (code into
:data:`STOP_SETS`), ``final_loss`` (mean loss of the last distillation
pass).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dlfix_jax import masks
from dlfix_jax import predict as predict_lib
from dlfix_jax.data import augment
from dlfix_jax.data.source import epoch_indices
from dlfix_jax.fixers import base
from dlfix_jax.fixers.irepair import dropout_logits
from dlfix_jax.models import base as models_base
from dlfix_jax.training import loop

PAPER = ("Chen, Zhou, Sun, Wang, Xuan, Yang. Interpretability Based Neural "
         "Network Repair. ISSTA 2024")

STOP_REASONS = ("satisfied", "max_epochs", "nothing_to_repair")
SATISFIED, MAX_EPOCHS, NOTHING = range(3)
STOP_SETS = ("valid_misclassified", "repair_failing")

_KERNEL_KINDS = ("conv", "dense")
_RESAMPLE_KINDS = ("maxpool", "avgpool", "gap", "flatten")


def default_config() -> ml_collections.ConfigDict:
    """INNER's defaults (see the module docstring for their sources)."""
    cfg = ml_collections.ConfigDict()
    cfg.probe_num = 1000          # args.probe_train_num
    cfg.probe_epochs = 50         # train_only_probe(epochs=50)
    cfg.probe_lr = 0.01           # probe_train: Adam lr 0.01
    cfg.probe_batch_size = 128    # train_only_probe loader
    cfg.num_select = 30           # anomaly_select: 30 clean / 30 bad
    cfg.rep_layer_num = 3         # args.rep_layer_num
    cfg.routing_samples = 100     # get_weight_mask: first 100 bad samples
    cfg.routing_steps = 40        # get_route_avg: single_img_optim(40 ...)
    cfg.routing_lr = 0.009        # single_img_optim
    cfg.routing_alpha = 0.005     # get_route_avg(alpha=0.005)
    cfg.routing_chunk = 25        # samples routed at once (memory only)
    cfg.top_k = 0                 # 0: every counted entry (original)
    cfg.epochs = 20               # repair_mid_layers: epoch = 20
    cfg.lr = 7e-4                 # MySGD(lr=0.0007)
    cfg.batch_size = 64           # repair loaders
    cfg.ce_weight = 0.8           # layer_rep: alpha = 0.8
    cfg.temperature = 3.0         # layer_rep: CrossEntropy(temp=3)
    cfg.aug_epochs = 2            # epoch2 = 2
    cfg.aug_rotation = 30.0       # RandomRotation(30)
    cfg.aug_flip = True           # RandomHorizontalFlip()
    cfg.clean_drop = 0.1          # std_acc >= std_acc_before - 0.1
    cfg.asr_threshold = 0.15      # satisfy_bd_asr (wp)
    cfg.num_valid = 1000          # val_nor / val_bd sizes
    cfg.bias_unmasked = True      # MySGD masks only kernel-shaped params
    return cfg


def check_config(cfg) -> None:
    base.check_ranges(
        cfg, probe_num=(1, None), probe_epochs=(0, None), probe_lr=(0.0, None),
        probe_batch_size=(1, None), num_select=(1, None),
        rep_layer_num=(1, None), routing_samples=(1, None),
        routing_steps=(0, None), routing_lr=(0.0, None),
        routing_alpha=(0.0, None), routing_chunk=(1, None), top_k=(0, None),
        epochs=(0, None), lr=(0.0, None), batch_size=(1, None),
        ce_weight=(0.0, 1.0), temperature=(0.0, None), aug_epochs=(0, None),
        aug_rotation=(0.0, 180.0), clean_drop=(0.0, 1.0),
        asr_threshold=(0.0, 1.0), num_valid=(1, None))
    for k in ("lr", "probe_lr", "temperature"):
        if cfg[k] <= 0:
            raise ValueError(f"config {k}={cfg[k]!r} must be > 0")


# ---------------------------------------------------------------------------
# Probe sites.


@dataclasses.dataclass(frozen=True)
class Site:
    """A probe site: the block's kernel layer, the layer whose output the
    probe reads, and that output's shape (without the batch axis)."""

    layer: str
    kernel_index: int
    cut: str
    feature_shape: tuple


def probe_sites(model: models_base.Model) -> list[Site]:
    """The probe sites of a sequential model (module docstring)."""
    specs = model.layers
    kidx = [i for i, s in enumerate(specs) if s.kind in _KERNEL_KINDS]
    sites = []
    for j, (a, b) in enumerate(zip(kidx[:-1], kidx[1:])):
        between = specs[a + 1:b]
        if not (specs[a].kind == "dense"
                or any(s.kind in _RESAMPLE_KINDS for s in between)):
            continue
        cut = next(s.name for s in reversed(specs[a:b])
                   if s.kind != "dropout")
        head, _ = models_base.split_at(model, cut)
        x = jax.ShapeDtypeStruct((1,) + tuple(model.input_shape), jnp.float32)
        out = jax.eval_shape(
            lambda v, a_: head.apply(v, a_),
            models_base.split_variables(model.abstract_variables(),
                                        _head_names(model, cut)), x)
        sites.append(Site(specs[a].name, j, cut, tuple(out.shape[1:])))
    return sites


def _head_names(model, cut: str) -> tuple[str, ...]:
    names = [s.name for s in model.layers]
    return tuple(names[:names.index(cut) + 1])


def applicable(info: base.ProblemInfo) -> str | None:
    """None when INNER can run; otherwise the reason.

    It needs a sequential model with at least one probe site (a Conv or
    Dense layer before the logits layer), non-empty training and validation
    splits (the probes' training data; the stop rule's sets) and, when the split sizes are known, at least
    one correctly classified repair input (selection and distillation).
    """
    model = info.model
    if not model.is_sequential:
        return (f"model {model.name!r} is not sequential; INNER's probe sites "
                "are defined for sequential models only")
    if not probe_sites(model):
        return (f"model {model.name!r} has no Conv/Dense layer before its "
                "logits layer to attach a probe to")
    if info.n_train == 0:
        return "no training inputs to train the probes on"
    if info.n_valid == 0:
        return "no validation inputs for the stop rule's held-out sets"
    if info.n_failing >= 0 and info.n_repair - info.n_failing < 1:
        return "no correctly classified repair input (clean set)"
    return None


# ---------------------------------------------------------------------------
# Probes.


class ConvProbe(nn.Module):
    """The original's ``Probe`` (``model/cifar10_vgg.py``), NHWC; its
    variables come from :func:`probe_init`."""

    channels: int
    depth: int
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = self.channels

        def bn(h):
            # torch BatchNorm2d defaults: momentum 0.1, eps 1e-5.
            return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                epsilon=1e-5)(h)

        def conv(h, f, k, s):
            p = (k - 1) // 2
            return nn.Conv(f, (k, k), strides=(s, s),
                           padding=((p, p), (p, p)))(h)

        h = nn.relu(bn(conv(x, c, 1, 1)))
        if self.depth == 2:
            h = conv(conv(h, 2 * c, 3, 2), 2 * c, 3, 2)
            h = nn.relu(bn(h))
            h = conv(conv(h, 4 * c, 3, 1), 4 * c, 3, 1)
            h = nn.relu(bn(h))
        else:
            h = nn.relu(bn(conv(h, c, 3, 1)))
            h = nn.relu(bn(conv(h, c, 3, 1)))
        h = jnp.mean(h, axis=(1, 2))
        return nn.Dense(self.num_classes)(h)


class LinearProbe(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


@functools.lru_cache(maxsize=None)
def make_probe(feature_shape: tuple, num_classes: int) -> nn.Module:
    """The probe for features of ``feature_shape`` (cached: one object per
    shape, so jitted functions keyed by it compile once)."""
    if len(feature_shape) == 3:
        depth = 2 if min(feature_shape[:2]) >= 8 else 1
        return ConvProbe(int(feature_shape[-1]), depth, int(num_classes))
    return LinearProbe(int(num_classes))


def _probe_apply(probe, pv, h):
    return probe.apply(pv, h, train=False).astype(jnp.float32)


# Jitted forms (eager flax init / apply compile every primitive separately).
_probe_apply_jit = jax.jit(_probe_apply, static_argnums=0)


@functools.lru_cache(maxsize=None)
def _probes_loss(probes: tuple):
    """Probe-training loss of every probe at once (``loop`` LossFn; batch =
    (tuple of features, labels)). The probes share no parameter, so the sum
    of their CEs gives each probe its own CE's gradient, and Adam's
    per-parameter state makes one optimiser over all of them the
    original's one Adam per probe (trained on the same batches)."""

    def loss_fn(variables, batch, key):
        del key
        feats, y = batch
        total, stats = 0.0, {}
        for i, probe in enumerate(probes):
            k = str(i)
            pv = {"params": variables["params"][k]}
            if k in variables.get("batch_stats", {}):
                pv["batch_stats"] = variables["batch_stats"][k]
                logits, upd = probe.apply(pv, feats[i], train=True,
                                          mutable=["batch_stats"])
                stats[k] = upd["batch_stats"]
            else:
                logits = probe.apply(pv, feats[i], train=True)
            total = total + jnp.mean(loop.cross_entropy(logits, y))
        state = {"batch_stats": stats} if stats else {}
        return total, (state, {"loss": total})

    return loss_fn


def probe_init(probe, key, feature_shape) -> dict:
    """torch's default initialisation of a probe: every Conv / Dense kernel
    and bias U(±1/√fan_in) (``kaiming_uniform(a=√5)`` and the bias rule),
    BatchNorm scale 1, bias 0, running mean 0, variance 1.

    Written out rather than ``probe.init`` with flax initialisers: one
    uniform draw compiles in well under a second, while compiling flax's
    per-parameter key splitting took 4-27 s per probe on the shared 2-core
    machine."""
    x = jax.ShapeDtypeStruct((1,) + tuple(feature_shape), jnp.float32)
    shapes = jax.eval_shape(lambda a: probe.init(jax.random.key(0), a,
                                                 train=False), x)
    flat = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    total = sum(int(np.prod(l.shape)) for _, l in flat)
    u = np.asarray(jax.random.uniform(key, (total,), jnp.float32, -1.0, 1.0))

    def init_module(d, off):
        out = {}
        if "kernel" in d:
            fan_in = int(np.prod(d["kernel"].shape[:-1]))
        for name in sorted(d):
            v = d[name]
            if isinstance(v, dict):
                out[name], off = init_module(v, off)
                continue
            n = int(np.prod(v.shape))
            if "kernel" in d:
                out[name] = jnp.asarray(u[off:off + n].reshape(v.shape)
                                        / math.sqrt(max(1, fan_in)))
            else:   # BatchNorm
                out[name] = jnp.full(v.shape, 1.0 if name == "scale" else 0.0,
                                     v.dtype)
            off += n
        return out, off

    params, _ = init_module(shapes["params"], 0)
    out = {"params": params}
    if "batch_stats" in shapes:
        out["batch_stats"] = jax.tree_util.tree_map_with_path(
            lambda pth, v: jnp.full(v.shape, 1.0 if pth[-1].key == "var"
                                    else 0.0, v.dtype), shapes["batch_stats"])
    return out


@functools.lru_cache(maxsize=None)
def _features_fn(model, cut):
    head, _ = models_base.split_at(model, cut)
    names = _head_names(model, cut)

    @jax.jit
    def f(variables, x):
        vh = models_base.split_variables(variables, names)
        return head.apply(vh, x).astype(jnp.float32)

    return f


def _features(model, cut, variables, x, batch_size=512):
    f = _features_fn(model, cut)
    n = x.shape[0]
    out = [f(variables, predict_lib.pad(np.asarray(x[i:i + batch_size]),
                                        batch_size))[:min(batch_size, n - i)]
           for i in range(0, n, batch_size)]
    return jnp.concatenate(out)


def train_probes(key, probes, feats, y, *, epochs, lr, batch_size):
    """Trains the probes on fixed features (``feats[i]`` for ``probes[i]``;
    Adam, shuffled batches shared by all probes as ``probe_train``).
    Returns (per-probe variables, per-probe training accuracy)."""
    probes = tuple(probes)
    k_init, k_order = jax.random.split(key)
    variables: dict = {"params": {}}
    for i, (probe, f) in enumerate(zip(probes, feats)):
        v = probe_init(probe, jax.random.fold_in(k_init, i), f.shape[1:])
        for c in v:
            variables.setdefault(c, {})[str(i)] = v[c]
    tx = loop.optimizer("adam", lr)
    n = y.shape[0]
    bs = min(batch_size, n)
    steps_per = math.ceil(n / bs)

    def batches():
        for e in range(epochs):
            for idx in epoch_indices(jax.random.fold_in(k_order, e), n, bs):
                yield tuple(f[idx] for f in feats), y[idx]

    res = loop.fit(k_order, variables, batches(),
                   step_fn=loop.make_step(_probes_loss(probes), tx), tx=tx,
                   num_steps=epochs * steps_per, check_every=100,
                   desc="INNER probes")
    out, accs = [], []
    for i, probe in enumerate(probes):
        pv = {c: res.variables[c][str(i)] for c in res.variables
              if str(i) in res.variables[c]}
        out.append(pv)
        accs.append(float(jnp.mean(jnp.argmax(
            _probe_apply_jit(probe, pv, feats[i]), -1) == y)))
    return out, accs


# ---------------------------------------------------------------------------
# Layer selection (anomaly_select).


def anomaly_scores(probe_outputs_clean, probe_outputs_bad) -> np.ndarray:
    """``−Σ b̄ log(c̄ + 1e-7)`` per probe from lists of (n, C) logits."""
    out = []
    for c, b in zip(probe_outputs_clean, probe_outputs_bad):
        cm = np.mean(np.asarray(jax.nn.softmax(c, -1), np.float64), 0)
        bm = np.mean(np.asarray(jax.nn.softmax(b, -1), np.float64), 0)
        out.append(float(-np.sum(np.abs(bm) * np.log(np.abs(cm) + 1e-7))))
    return np.asarray(out)


# ---------------------------------------------------------------------------
# Routing (single_img_optim, get_weight_mask).


def _route_one(model, site, probe, steps, variables, pv, x, lr, alpha):
    """The routing ``R`` of one input ``x`` (no batch axis) after ``steps``
    steps of ``single_img_optim``."""
    head, _ = models_base.split_at(model, site.cut)
    vh = models_base.split_variables(variables, _head_names(model, site.cut))
    lp = models_base.get_layer_params(vh["params"], site.layer)
    w = lp["kernel"]

    def probe_logits(kernel):
        p = models_base.set_layer_params(vh["params"], site.layer,
                                         dict(lp, kernel=kernel))
        h = head.apply(dict(vh, params=p), x[None])
        return _probe_apply(probe, pv, h)

    label = jnp.argmax(probe_logits(w), -1)

    def loss(wm):
        return loop.cross_entropy(probe_logits(wm), label)[0]

    def step(_, r):
        g = jax.grad(loss)(w * r)   # d loss / d (W * R), not d / dR
        return jnp.clip(r - lr * g - alpha * jnp.sign(r), 0.0, 1.0)

    return jax.lax.fori_loop(0, steps, step, jnp.ones_like(w))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def route(model, site, probe, steps, variables, pv, x, lr, alpha):
    """Jitted :func:`_route_one` (``site``: a :class:`Site`)."""
    return _route_one(model, site, probe, steps, variables, pv, x, lr, alpha)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _routing_counts(model, site, probe, steps, variables, pv, xs, valid,
                    lr, alpha):
    """Per kernel entry, the number of samples whose routing ended above
    that sample's mean routing. ``xs`` is (chunks, chunk, ...) and
    ``valid`` (chunks, chunk) marks real samples."""
    w = models_base.get_layer_params(variables["params"], site.layer)["kernel"]

    def one(x):
        r = _route_one(model, site, probe, steps, variables, pv, x, lr, alpha)
        return r > jnp.mean(r)

    def chunk(counts, args):
        xc, vc = args
        above = jax.vmap(one)(xc)
        return counts + jnp.sum(above * vc.reshape((-1,) + (1,) * w.ndim),
                                0, dtype=jnp.int32), None

    counts, _ = jax.lax.scan(chunk, jnp.zeros(w.shape, jnp.int32),
                             (xs, valid))
    return counts


def routing_mask(model, site, probe, variables, pv, xs, *, steps, lr, alpha,
                 chunk, top_k) -> np.ndarray:
    """The kernel-shaped bool mask of ``get_weight_mask`` for ``xs``."""
    n = xs.shape[0]
    cs = max(1, min(chunk, n))
    nc = -(-n // cs)
    pad = nc * cs - n
    xp = jnp.concatenate([xs, jnp.zeros((pad,) + xs.shape[1:], xs.dtype)])
    valid = jnp.arange(nc * cs) < n
    counts = np.asarray(_routing_counts(
        model, site, probe, int(steps), variables, pv,
        xp.reshape((nc, cs) + xs.shape[1:]), valid.reshape(nc, cs),
        jnp.float32(lr), jnp.float32(alpha)))
    m = counts > 0
    if top_k and int(m.sum()) > top_k:
        flat = counts.reshape(-1)
        order = np.lexsort((np.arange(flat.size), -flat))[:top_k]
        m = np.zeros(flat.size, bool)
        m[order] = True
        m = m.reshape(counts.shape)
    return m


# ---------------------------------------------------------------------------
# Repair losses (layer_rep).


@functools.lru_cache(maxsize=None)
def _distill_loss(model, site, probe, ce_weight, temperature):
    """``layer_rep``'s probe loss: batch = (x_bad, y_bad, x_clean, w, pv)."""
    head, _ = models_base.split_at(model, site.cut)
    names = _head_names(model, site.cut)

    def loss_fn(variables, batch, key):
        xb, yb, xc, w, pv = batch
        vh = models_base.split_variables(variables, names)
        kb, kc = jax.random.split(key)
        hb = dropout_logits(head, vh, xb, kb)
        hc = jax.lax.stop_gradient(dropout_logits(head, vh, xc, kc))
        pb = _probe_apply(probe, pv, hb)
        pc = jax.lax.stop_gradient(_probe_apply(probe, pv, hc))
        ce = loop.cross_entropy(pb, yb)
        soft = -jnp.sum(jax.nn.softmax(pc / temperature, -1)
                        * jax.nn.log_softmax(pb / temperature, -1), -1)
        per = ce_weight * ce + (1.0 - ce_weight) * soft
        loss = jnp.sum(w * per) / jnp.maximum(jnp.sum(w), 1.0)
        state = {k: v for k, v in variables.items() if k != "params"}
        return loss, (state, {"loss": loss})

    return loss_fn


def augment_batch(key, x, max_deg: float, flip: bool):
    """Rotation by U(−max_deg, max_deg) (zero fill, in the inputs' own
    normalised space as the original) and, with ``flip``, a horizontal flip
    with probability 0.5, per input."""
    n = x.shape[0]
    kr, kf = jax.random.split(key)
    deg = jax.random.uniform(kr, (n,), minval=-max_deg, maxval=max_deg)
    shape = x.shape[1:]
    x = jax.vmap(lambda img, d: augment.affine(
        img, augment.rotation_matrix(d, shape)))(x, deg)
    if flip:
        f = jax.random.bernoulli(kf, 0.5, (n,))
        x = jnp.where(f[:, None, None, None], x[:, :, ::-1, :], x)
    return x


@functools.lru_cache(maxsize=None)
def _aug_loss(model, max_deg, flip):
    """``layer_rep(clean=True)``: CE of the model on augmented bad inputs;
    batch = (x, y, w)."""

    def loss_fn(variables, batch, key):
        x, y, w = batch
        ka, kd = jax.random.split(key)
        if x.ndim == 4:   # images (every model here); other inputs as given
            x = augment_batch(ka, x, max_deg, flip)
        logits = dropout_logits(model, variables, x, kd)
        ce = loop.cross_entropy(logits, y)
        loss = jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1.0)
        state = {k: v for k, v in variables.items() if k != "params"}
        return loss, (state, {"loss": loss})

    return loss_fn


def _pair_batches(n_bad: int, n_clean: int, bs: int):
    """(steps, bs) indices into the bad and clean sets and weights: zipped
    in-order batches, both cut to the smaller of each pair, padded."""
    steps = min(-(-n_bad // bs), -(-n_clean // bs))
    ib = np.zeros((steps, bs), np.int32)
    ic = np.zeros((steps, bs), np.int32)
    w = np.zeros((steps, bs), np.float32)
    for s in range(steps):
        k = min(bs, n_bad - s * bs, n_clean - s * bs)
        ib[s, :k] = np.arange(s * bs, s * bs + k)
        ic[s, :k] = np.arange(s * bs, s * bs + k)
        w[s, :k] = 1.0
    return ib, ic, w


def _plain_batches(n: int, bs: int):
    steps = -(-n // bs)
    idx = np.zeros((steps, bs), np.int32)
    w = np.zeros((steps, bs), np.float32)
    for s in range(steps):
        k = min(bs, n - s * bs)
        idx[s, :k] = np.arange(s * bs, s * bs + k)
        w[s, :k] = 1.0
    return idx, w


# ---------------------------------------------------------------------------
# The fixer.


def _first(source, n: int):
    """The first ``n`` inputs of a split (host arrays), streamed or not."""
    xs, ys, got = [], [], 0
    for b in source.ordered(min(n, 1024)):
        xs.append(np.asarray(b.x, np.float32))
        ys.append(np.asarray(b.y, np.int32))
        got += len(b)
        if got >= n:
            break
    return np.concatenate(xs)[:n], np.concatenate(ys)[:n]


def _acc(model, variables, x, y) -> float:
    if len(y) == 0:
        return float("nan")
    return float(np.mean(predict_lib.predict(model, variables, x) == y))


@base.register("inner", level="neuron", abbrev="IN", paper=PAPER,
               default_config=default_config, applicable=applicable,
               check_config=check_config, vmappable=False,
               codes={"stop_reason": STOP_REASONS, "stop_set": STOP_SETS})
def fix(key: jax.Array, problem: base.Problem,
        config: ml_collections.ConfigDict) -> base.FixResult:
    """INNER; see the module docstring."""
    model = problem.model
    reason = applicable(problem.info)
    if reason:
        raise ValueError(f"INNER is not applicable: {reason}")
    variables = problem.variables
    base.check_finite(variables, "the original model's variables")
    params = variables["params"]
    n_fail = len(problem.failing)
    info: dict = {"num_failing": n_fail}
    if n_fail == 0:
        info.update(stop_reason=NOTHING, epochs=0, mask_size=0)
        return base.FixResult(variables, masks.empty_mask(params), info)
    if len(problem.passing) == 0:
        raise ValueError("INNER needs at least one correctly classified "
                         "repair input (its clean set)")
    base.check_finite({"failing": problem.failing.x,
                       "passing": problem.passing.x}, "the repair inputs")
    k_data, k_probe, k_route, k_rep = jax.random.split(key, 4)
    nc = problem.num_classes
    sites = probe_sites(model)
    info["probe_layers"] = np.asarray([s.kernel_index for s in sites],
                                      np.int32)

    # 1. Probes on probe_num clean training inputs (backbone frozen).
    batch = next(iter(problem.train.take_steps(
        k_data, min(int(config.probe_num), len(problem.train)), 1)))
    xt, yt = jnp.asarray(batch[0]), jnp.asarray(batch[1], jnp.int32)
    probes = [make_probe(s.feature_shape, nc) for s in sites]
    feats = [_features(model, s.cut, variables, xt) for s in sites]
    pvs, paccs = train_probes(k_probe, probes, feats, yt,
                              epochs=int(config.probe_epochs),
                              lr=float(config.probe_lr),
                              batch_size=int(config.probe_batch_size))
    del feats
    info["probe_acc"] = np.asarray(paccs, np.float32)

    # 2. Layer selection.
    xb_all, yb_all = problem.failing.x, problem.failing.y
    xc_all = problem.passing.x
    ns = int(config.num_select)
    outs_c, outs_b = [], []
    for s, probe, pv in zip(sites, probes, pvs):
        outs_c.append(_probe_apply_jit(probe, pv, _features(
            model, s.cut, variables, xc_all[:ns])))
        outs_b.append(_probe_apply_jit(probe, pv, _features(
            model, s.cut, variables, xb_all[:ns])))
    scores = anomaly_scores(outs_c, outs_b)
    order = np.argsort(-scores, kind="stable")
    selected = order[:min(int(config.rep_layer_num), len(sites))]
    info["layer_scores"] = scores.astype(np.float32)
    info["selected"] = selected.astype(np.int32)

    # 3-4. Routing masks from the original model.
    perm = jax.random.permutation(k_route, n_fail)
    xr = xb_all[perm[:min(int(config.routing_samples), n_fail)]]
    bias_free = bool(config.bias_unmasked)
    mask = masks.empty_mask(params)
    block_masks, sizes = [], []
    for b in selected:
        s = sites[b]
        km = routing_mask(model, s, probes[b], variables, pvs[b], xr,
                          steps=int(config.routing_steps),
                          lr=float(config.routing_lr),
                          alpha=float(config.routing_alpha),
                          chunk=int(config.routing_chunk),
                          top_k=int(config.top_k))
        lp = models_base.get_layer_params(mask, s.layer)
        new = {k: (km if k == "kernel" else np.full(np.shape(v), bias_free))
               for k, v in lp.items()}
        bm = models_base.set_layer_params(masks.empty_mask(params), s.layer,
                                          new)
        block_masks.append(bm)
        mask = masks.mask_or(mask, bm)
        sizes.append(int(km.sum()))
    info["mask_sizes"] = np.asarray(sizes, np.int32)

    # Stop-rule sets.
    xv, yv = _first(problem.valid, len(problem.valid))
    pred_v = predict_lib.predict(model, variables, xv)
    nv = int(config.num_valid)
    xvc, yvc = xv[:nv], yv[:nv]
    wrong = np.nonzero(pred_v != yv)[0][:nv]
    if wrong.size:
        xvb, yvb, stop_set = xv[wrong], yv[wrong], 0
    else:
        xvb, yvb, stop_set = np.asarray(xb_all), np.asarray(yb_all), 1
    info["stop_set"] = stop_set

    def evaluate(v):
        return (_acc(model, v, xvc, yvc), 1.0 - _acc(model, v, xvb, yvb))

    acc0, asr0 = evaluate(variables)
    info["clean_acc_before"], info["asr_before"] = acc0, asr0

    def satisfied(acc, asr):
        return acc >= acc0 - float(config.clean_drop) and asr < float(
            config.asr_threshold)

    # 5. Repair.
    tx = loop.optimizer("sgd", float(config.lr))
    bs = int(config.batch_size)
    ib, ic, wp = _pair_batches(n_fail, len(problem.passing), bs)
    ia, wa = _plain_batches(n_fail, bs)
    aug_step = loop.make_step(
        _aug_loss(model, float(config.aug_rotation), bool(config.aug_flip)),
        tx, masked=True)
    cur = variables
    stop, epochs_run, last_loss = MAX_EPOCHS, 0, float("nan")

    def run(step, bm, batches, k):
        nonlocal cur
        state = loop.init_state(cur, tx)
        losses = []
        for bt in batches:
            state, met = step(state, bt, k, bm)
            losses.append(met["loss"])
        cur = state.variables
        return float(np.mean(jax.device_get(losses)))

    for e in range(int(config.epochs)):
        ke = jax.random.fold_in(k_rep, e)
        pass_losses = []
        for j, b in enumerate(selected):
            s = sites[b]
            step = loop.make_step(
                _distill_loss(model, s, probes[b], float(config.ce_weight),
                              float(config.temperature)), tx, masked=True)
            batches = [(xb_all[ib[t]], yb_all[ib[t]], xc_all[ic[t]],
                        jnp.asarray(wp[t]), pvs[b]) for t in range(len(ib))]
            pass_losses.append(run(step, block_masks[j], batches,
                                   jax.random.fold_in(ke, j)))
        last_loss = float(np.mean(pass_losses))
        epochs_run = e + 1
        if not np.isfinite(last_loss):
            raise RuntimeError(f"INNER: non-finite repair loss in epoch {e + 1}"
                               f" (lr={config.lr}); the repair diverged")
        if satisfied(*evaluate(cur)):
            stop = SATISFIED
            break
        for e2 in range(int(config.aug_epochs)):
            for j, b in enumerate(selected):
                batches = [(xb_all[ia[t]], yb_all[ia[t]], jnp.asarray(wa[t]))
                           for t in range(len(ia))]
                la = run(aug_step, block_masks[j], batches,
                         jax.random.fold_in(ke, 1000 + 100 * e2 + j))
                if not np.isfinite(la):
                    raise RuntimeError(
                        f"INNER: non-finite augmented loss in epoch {e + 1}")
        if satisfied(*evaluate(cur)):
            stop = SATISFIED
            break

    acc1, asr1 = evaluate(cur)
    info.update(stop_reason=stop, epochs=epochs_run, clean_acc=acc1, asr=asr1,
                final_loss=last_loss, mask_size=masks.count(mask))
    return base.FixResult(cur, mask, info)
