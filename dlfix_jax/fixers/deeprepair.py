"""DeepRepair (model level): style-guided repair by failure-style augmentation.

Source: B. Yu, H. Qi, Q. Guo, F. Juefei-Xu, X. Xie, L. Ma, J. Zhao,
"DeepRepair: Style-Guided Repairing for Deep Neural Networks in the
Real-World Operational Environment", IEEE Transactions on Reliability 2021
(arXiv 2011.09884). Semantics and defaults from the original code
``SaikaQH/DeepRepair@4361cbb`` (``config.py``, ``preprocess_repair_data.py``,
``style_transfer.py``, ``WCT2/transfer.py``, ``augmentation_with_WCT2.py``,
``repairing.py``); reference ``fixer_specs.md`` §DR. No code was copied.

Algorithm:

1. **Failure sampling** (``divide_train_test_data``): per class, up to
   ``sample_per_class`` (100, ``FailureCaseConfig.sample_num_per_class``)
   failing inputs drawn at random without replacement. Ours come from the
   repair set's failing inputs (``problem.failing``); the original splits
   corrupted CIFAR-10-C test images into 100 per class for clustering and
   the rest for model selection.
2. **Clustering** (``cluster_data``): per class, KMeans with ``clusters``
   (5, ``total_cluster_num``) clusters, k-means++ init, on the failures'
   raw pixels flattened and standardised per pixel
   (``sklearn.preprocessing.scale``), scikit-learn's ``KMeans``. A class
   with fewer failures than clusters gets one cluster per failure.
3. **Style pool** (``sampling_ref_img``): one failure drawn at random from
   each (class, cluster): up to 5 x classes style images.
4. **Style transfer** (``style_transfer.py`` / WCT2 ``whole_dir_transfer``,
   ``sample_type = 'random'``): every training image is stylised toward a
   style image drawn uniformly from the pool. **WCT2 is replaced** by
   :mod:`dlfix_jax.fixers._wct`: the same whitening-colouring transform at
   the same five encoder/decoder places (``transfer_at = {encoder,
   decoder}``, ``alpha`` = ``wct_alpha`` 1, ``+ eps I`` = ``wct_eps`` 1),
   but in the features of a small Haar-wavelet auto-encoder (widths 16 /
   32 / 64 = ``style_width`` x 1, 2, 4) trained here on the training images
   for pixel reconstruction (``style_steps`` 1,000 Adam steps, lr
   ``style_lr`` 1e-3, batch ``style_batch_size`` 64; our choices) instead of
   WCT2's pretrained VGG-19 wavelet encoder/decoder, whose weights cannot be
   obtained here (see that module for exactly what differs). Stylised
   images are stored as 8-bit pixels (the original writes JPEG files).
5. **Repair training** (``repairing.py``), from the original model:
   AugMix with the JSD consistency loss on the training set, where
   ``base_images = "stylised"`` (default; ``train_data.data =
   transfer_output`` in the original) makes the stylised training images
   the clean view and the base of the AugMix chains; ``"original"`` uses
   the original training images instead. The AugMix op list gains the
   style op (``style_op``, default on; ``WCT2_transfer``): a chain that
   draws it starts from a precomputed stylised version of the same
   training image (with ``"stylised"`` bases: a second, independent
   stylisation; the original reads a separately generated stylised set).
   AugMix: ``width`` 3 chains, ``depth`` -1 (uniform 1..3), ``severity`` 3,
   Dirichlet / Beta(``alpha`` 1), the 9 AugMix ops (``all_ops`` adds
   color / contrast / brightness / sharpness). Loss on the clean view and
   two AugMix views of each image, one forward pass over all three::

       L = CE(p_clean, y) + lambda * (KL(p_clean||M) + KL(p_1||M)
                                      + KL(p_2||M)) / 3,
       M = clip((p_clean + p_1 + p_2) / 3, 1e-7, 1),  lambda = 12

   (``jsd_lambda``; ``F.kl_div(log M, p, 'batchmean')``). Optimiser: SGD
   with Nesterov momentum ``momentum`` 0.9, lr ``lr`` 0.1, L2 weight decay
   ``weight_decay`` 5e-4 (torch semantics), batch ``batch_size`` 64, cosine
   schedule from lr to ``final_lr`` 1e-6 over ``cosine_epochs`` (100)
   epochs of steps, as ``get_lr`` with ``LambdaLR``. Trained with the
   shared loop (:func:`dlfix_jax.training.loop.fit`), evaluated on the
   validation split after every epoch; the best epoch is returned and
   training stops after ``patience`` (5) epochs without improvement or
   after ``epochs`` epochs.

Defaults (source): every number above is the original code's unless it is
marked "our choice"; ``eval_batch_size`` 1000 and ``transfer_batch_size``
512 are ours (speed only).

Deviations from the paper / original code:

* WCT2 is replaced (step 4; :mod:`dlfix_jax.fixers._wct` lists what is
  kept and what is not). Grayscale images are stylised as they are (WCT2
  needs RGB).
* Failures come from the repair set, and there is no separate failure test
  set: model selection is on validation accuracy (the original saves a
  checkpoint whenever clean test accuracy *or* failure-set accuracy
  improves and stops when the clean test *loss* has not improved for 5
  epochs; which checkpoint the study used is not known).
* ``epochs`` defaults to 100, the cosine horizon (original: 10,000,
  effectively "until early stopping"; past the horizon its ``LambdaLR``
  cosine rises again).
* CIFAR's ``RandomHorizontalFlip`` + ``RandomCrop(32, padding=4)`` on the
  base images are not applied (they are wrong for digits; the study's
  adaptation is not known); inputs keep the problem's own normalisation
  (the original uses mean = std = 0.5).
* KMeans: ``random_state`` derived from the key (original: 0) and
  ``n_init`` = ``kmeans_n_init`` 10 (scikit-learn's default when the code
  was written; today's default is 1 for k-means++).
* The AugMix ops differ from PIL in small ways listed in
  :mod:`dlfix_jax.data.augment`.

Applicability: needs the training set in memory (it is stylised as a whole);
a streamed training set is refused. Every parameter may change (model
level, ``mask`` None).

``info``: ``n_failures_used``, ``n_styles`` (pool size),
``clusters_per_class`` (C,), ``style_recon_mse`` (the auto-encoder's
pixel reconstruction MSE on 512 training images), ``style_feature_shift`` (mean over the training images of how far
the transfer moved the first-level feature covariance toward the style's:
1 = all the way, 0 = not at all), ``orig_valid_acc``, ``valid_acc_trace``
(per epoch), ``best_valid_acc``, ``best_epoch``, ``epochs`` (run),
``stop_reason`` (code into :data:`STOP_REASONS`), and the phase times
``time_style_s`` (clustering, auto-encoder, stylisation) and
``time_train_s``.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from sklearn.cluster import KMeans
from sklearn.preprocessing import scale as standardise

from dlfix_jax import predict as predict_lib
from dlfix_jax import progress as progress_lib
from dlfix_jax.data import augment
from dlfix_jax.data.source import epoch_indices
from dlfix_jax.fixers import _wct
from dlfix_jax.fixers import base
from dlfix_jax.training import loop

STOP_REASONS = ("epochs", "patience", "no failing inputs")
BASE_IMAGES = ("stylised", "original")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Failure clustering (original config.py / preprocess_repair_data.py).
    c.sample_per_class = 100
    c.clusters = 5
    c.kmeans_n_init = 10
    # Style transfer: the WCT2 substitute (_wct; sizes are our choices).
    c.style_width = 16
    c.style_steps = 1000
    c.style_lr = 1e-3
    c.style_batch_size = 64
    c.wct_eps = 1.0
    c.wct_alpha = 1.0
    c.transfer_batch_size = 512
    # Repair training (original repairing.py).
    c.base_images = "stylised"
    c.style_op = True
    c.width = 3
    c.depth = -1
    c.severity = 3.0
    c.alpha = 1.0
    c.all_ops = False
    c.jsd_lambda = 12.0
    c.lr = 0.1
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.batch_size = 64
    c.cosine_epochs = 100
    c.final_lr = 1e-6
    c.epochs = 100
    c.patience = 5
    c.eval_batch_size = 1000
    return c


def check_config(cfg) -> None:
    base.check_ranges(
        cfg, sample_per_class=(1, None), clusters=(1, None),
        kmeans_n_init=(1, None), style_width=(1, None), style_steps=(0, None),
        style_lr=(0.0, 10.0), style_batch_size=(1, None), wct_eps=(0.0, None),
        wct_alpha=(0.0, 1.0), transfer_batch_size=(1, None),
        base_images=set(BASE_IMAGES), style_op={True, False},
        width=(1, None), depth=(-1, 3), severity=(0.1, 10.0),
        alpha=(1e-6, None), all_ops={True, False}, jsd_lambda=(0.0, None),
        lr=(0.0, 10.0), momentum=(0.0, 1.0), weight_decay=(0.0, None),
        batch_size=(1, None), cosine_epochs=(1, None), final_lr=(0.0, None),
        epochs=(1, None), patience=(0, None), eval_batch_size=(1, None))
    if cfg.depth == 0:
        raise ValueError("config depth=0 is not allowed: use -1 (uniform "
                         "1..3) or 1..3")


def applicable(info: base.ProblemInfo) -> str | None:
    if info.streaming:
        return ("DeepRepair stylises the whole training set toward the "
                "failure styles and trains on it, which needs the training "
                "set in memory (this one is streamed)")
    return None


# ---------------------------------------------------------------------------
# Steps 1-3: failures, clusters, style pool


def sample_failures(key, y: np.ndarray, num_classes: int, per_class: int
                    ) -> np.ndarray:
    """Indices of up to ``per_class`` failures per class, drawn without
    replacement (sorted within a class)."""
    out = []
    for c in range(num_classes):
        idx = np.nonzero(y == c)[0]
        if len(idx) > per_class:
            perm = np.asarray(jax.random.permutation(
                jax.random.fold_in(key, c), len(idx)))
            idx = np.sort(idx[perm[:per_class]])
        out.append(idx)
    return np.concatenate(out) if out else np.zeros((0,), np.int64)


def cluster_failures(key, pixels: np.ndarray, y: np.ndarray,
                     num_classes: int, k: int, n_init: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per-class KMeans on standardised pixels: (cluster id per failure,
    clusters per class). Cluster ids are global (class-major)."""
    labels = np.full(len(y), -1, np.int64)
    per_class = np.zeros(num_classes, np.int64)
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    offset = 0
    for c in range(num_classes):
        idx = np.nonzero(y == c)[0]
        if len(idx) == 0:
            continue
        kc = min(int(k), len(idx))
        feats = standardise(pixels[idx].reshape(len(idx), -1)
                            .astype(np.float64))
        if kc == 1:
            lab = np.zeros(len(idx), np.int64)
        else:
            km = KMeans(n_clusters=kc, init="k-means++", n_init=int(n_init),
                        random_state=seed + c)
            lab = km.fit_predict(feats).astype(np.int64)
        # KMeans may leave a cluster empty on duplicate points; renumber.
        _, lab = np.unique(lab, return_inverse=True)
        labels[idx] = lab + offset
        per_class[c] = lab.max() + 1
        offset += int(per_class[c])
    return labels, per_class


def style_pool(key, labels: np.ndarray) -> np.ndarray:
    """One failure index drawn at random from each cluster."""
    out = []
    for j in range(int(labels.max()) + 1 if len(labels) else 0):
        members = np.nonzero(labels == j)[0]
        pick = int(jax.random.randint(jax.random.fold_in(key, j), (), 0,
                                      len(members)))
        out.append(members[pick])
    return np.asarray(out, np.int64)


# ---------------------------------------------------------------------------
# Step 4: stylisation of the training set


def stylise(key, ae_vars, pixels: np.ndarray, style_px: np.ndarray,
            config, desc: str = "DeepRepair style transfer"
            ) -> tuple[np.ndarray, float]:
    """Every image of ``pixels`` (N, H, W, C) stylised toward a style drawn
    uniformly from ``style_px``; returns (uint8 pixels, mean feature shift,
    see the module docstring)."""
    eps, alpha = float(config.wct_eps), float(config.wct_alpha)
    stats = _wct.styles(ae_vars, jnp.asarray(style_px), eps=eps)
    n = len(pixels)
    which = np.asarray(jax.random.randint(key, (n,), 0, len(style_px)))
    bs = int(config.transfer_batch_size)
    out = np.empty(pixels.shape, np.uint8)
    shifts = []
    _, cov_s = _wct.feature_moments(ae_vars, jnp.asarray(style_px))
    prog = progress_lib.Progress(n, desc)
    for i in range(0, n, bs):
        x = jnp.asarray(pixels[i:i + bs])
        ix = jnp.asarray(which[i:i + bs])
        y = _wct.transfer(ae_vars, x, stats, ix, eps=eps, alpha=alpha)
        shifts.append(_shift(ae_vars, x, y, cov_s[ix]))
        out[i:i + bs] = np.asarray(jnp.round(y * 255.0), np.uint8)
        prog.update(min(i + bs, n))
    prog.done()
    return out, float(np.mean(np.concatenate(shifts)))


@jax.jit
def _shift(ae_vars, x, y, cov_s):
    """Per image, 1 - |cov(y) - cov_s| / |cov(x) - cov_s| at level enc1."""
    _, cx = _wct.feature_moments(ae_vars, x)
    _, cy = _wct.feature_moments(ae_vars, y)
    before = jnp.linalg.norm(cx - cov_s, axis=(1, 2))
    after = jnp.linalg.norm(cy - cov_s, axis=(1, 2))
    return 1.0 - after / jnp.maximum(before, 1e-12)


# ---------------------------------------------------------------------------
# Step 5: AugMix + JSD training


@functools.lru_cache(maxsize=None)
def jsd_loss(model, mean: tuple, std: tuple, lam: float, width: int,
             depth: int, severity: float, alpha: float, ops: tuple,
             style_op: bool):
    """CE on the clean view + ``lam`` x the JSD of the clean and two AugMix
    views, on ``(clean pixels, y, stylised pixels)`` batches (module
    docstring); one forward pass over the three views."""
    m = jnp.asarray(mean, jnp.float32)
    s = jnp.asarray(std, jnp.float32)
    mix = functools.partial(augment.augmix, width=width, depth=depth,
                            severity=severity, alpha=alpha, ops=ops)

    def loss_fn(variables, batch, key):
        px, y, styled = batch
        k1, k2, k_drop = jax.random.split(key, 3)
        st = styled if style_op else None
        views = jnp.concatenate([px, mix(k1, px, styled=st),
                                 mix(k2, px, styled=st)])
        logits, new_state = model.apply_train(variables, (views - m) / s,
                                              k_drop)
        lc, l1, l2 = jnp.split(logits, 3)
        ce = jnp.mean(loop.cross_entropy(lc, y))
        # KL(p || M) = sum p (log p - log M) with log p from log_softmax: a
        # confident model's p underflows to 0, where xlogy's gradient is NaN.
        logs = [jax.nn.log_softmax(v, -1) for v in (lc, l1, l2)]
        ps = [jnp.exp(lp) for lp in logs]
        log_m = jnp.log(jnp.clip((ps[0] + ps[1] + ps[2]) / 3.0, 1e-7, 1.0))
        kl = [jnp.mean(jnp.sum(p * (lp - log_m), -1))
              for p, lp in zip(ps, logs)]
        jsd = (kl[0] + kl[1] + kl[2]) / 3.0
        loss = ce + lam * jsd
        correct = jnp.sum(jnp.argmax(lc, -1) == y)
        return loss, (new_state, {"loss": loss, "ce": ce, "jsd": jsd,
                                  "correct": correct})

    return loss_fn


@functools.lru_cache(maxsize=None)
def sgd_cosine(lr: float, momentum: float, weight_decay: float,
               total_steps: int, final_lr: float
               ) -> optax.GradientTransformation:
    """Torch SGD (Nesterov, L2 decay added to the gradient) with AugMix's
    cosine ``LambdaLR``: lr_t = final + (lr - final) (1 + cos(pi t / T)) / 2
    (cached: same arguments, same object)."""
    def schedule(t):
        return final_lr + (lr - final_lr) * 0.5 * (
            1.0 + jnp.cos(jnp.pi * t / total_steps))

    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(schedule, momentum=momentum or None,
                                 nesterov=True))


def _as_pixels(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.float32) / 255.0 if a.dtype == np.uint8
            else a.astype(np.float32))


def batches(key, clean: np.ndarray, y: np.ndarray, styled: np.ndarray,
            batch_size: int):
    """Endless shuffled ``(clean pixels, y, styled pixels)`` batches: epoch
    ``e`` is a permutation drawn with ``fold_in(key, e)`` (as
    :meth:`Source.epoch`)."""
    e = 0
    while True:
        for idx in epoch_indices(jax.random.fold_in(key, e), len(y),
                                 batch_size):
            yield _as_pixels(clean[idx]), y[idx], _as_pixels(styled[idx])
        e += 1


# ---------------------------------------------------------------------------
# The fixer


@base.register("deeprepair", level="model", abbrev="DR", vmappable=False,
               paper="Yu, Qi, Guo, Juefei-Xu, Xie, Ma, Zhao, 'DeepRepair: "
                     "Style-Guided Repairing for Deep Neural Networks in the "
                     "Real-World Operational Environment', IEEE Trans. "
                     "Reliability 2021",
               default_config=default_config, applicable=applicable,
               check_config=check_config,
               codes={"stop_reason": STOP_REASONS})
def fix(key: jax.Array, problem: base.Problem,
        config: ml_collections.ConfigDict) -> base.FixResult:
    """DeepRepair; see the module docstring for the algorithm and
    deviations."""
    t0 = time.perf_counter()
    model = problem.model
    if problem.info.streaming:
        raise ValueError(applicable(problem.info))
    k_fail, k_km, k_pool, k_ae, k_st1, k_st2, k_train = jax.random.split(
        key, 7)
    ebs = int(config.eval_batch_size)

    def valid_acc(v):
        return predict_lib.accuracy(model, v, problem.valid, ebs)

    orig_acc = float(valid_acc(problem.variables))
    info = {"orig_valid_acc": orig_acc}
    fail_y = np.asarray(problem.failing.y)
    if len(fail_y) == 0:
        info.update(n_failures_used=0, n_styles=0,
                    stop_reason=STOP_REASONS.index("no failing inputs"))
        return base.FixResult(problem.variables, None, info)

    # 1-3: failures -> per-class clusters -> one style image per cluster.
    fail_px = np.clip(np.asarray(problem.to_pixels(problem.failing.x)),
                      0.0, 1.0).astype(np.float32)
    used = sample_failures(k_fail, fail_y, problem.num_classes,
                           int(config.sample_per_class))
    labels, per_class = cluster_failures(
        k_km, fail_px[used], fail_y[used], problem.num_classes,
        int(config.clusters), int(config.kmeans_n_init))
    style_px = fail_px[used[style_pool(k_pool, labels)]]

    # 4: the WCT2 substitute, trained here, stylises the training set.
    train = problem.train.split()
    mean, std = tuple(problem.mean), tuple(problem.std)
    pixels = np.clip(np.asarray(train.x, np.float32) * np.asarray(
        std, np.float32) + np.asarray(mean, np.float32), 0.0, 1.0)
    ae_vars, ae_mse = _wct.train(
        k_ae, problem.train, pixels.shape[-1], mean, std,
        width=int(config.style_width), steps=int(config.style_steps),
        batch_size=int(config.style_batch_size), lr=float(config.style_lr))
    styled1, shift = stylise(k_st1, ae_vars, pixels, style_px, config)
    if config.base_images == "stylised":
        clean = styled1
        styled2, _ = (stylise(k_st2, ae_vars, pixels, style_px, config,
                              desc="DeepRepair style transfer (style op)")
                      if config.style_op else (styled1, None))
    else:
        clean, styled2 = pixels, styled1
    t_style = time.perf_counter() - t0

    # 5: AugMix + JSD fine-tuning of the original model, best on validation.
    y = np.asarray(train.y, np.int32)
    bs = min(int(config.batch_size), len(y))
    spe = -(-len(y) // bs)
    ops = augment.ALL_OPS if config.all_ops else augment.OPS
    loss_fn = jsd_loss(model, mean, std, float(config.jsd_lambda),
                       int(config.width), int(config.depth),
                       float(config.severity), float(config.alpha), ops,
                       bool(config.style_op))
    tx = sgd_cosine(float(config.lr), float(config.momentum),
                    float(config.weight_decay),
                    int(config.cosine_epochs) * spe, float(config.final_lr))
    res = loop.fit(loop.step_key(k_train), problem.variables,
                   batches(loop.order_key(k_train), clean, y, styled2, bs),
                   step_fn=loop.make_step(loss_fn, tx), tx=tx,
                   num_steps=int(config.epochs) * spe, eval_fn=valid_acc,
                   eval_every=spe, select="best",
                   patience=int(config.patience),
                   desc="DeepRepair AugMix+JSD training")
    trace = [h["score"] for h in res.history]
    info.update(
        n_failures_used=int(len(used)), n_styles=int(len(style_px)),
        clusters_per_class=per_class.astype(np.int32),
        style_recon_mse=ae_mse, style_feature_shift=shift,
        valid_acc_trace=np.asarray(trace, np.float32),
        best_valid_acc=float(res.best_score), best_epoch=int(
            res.best_step // spe), epochs=len(trace),
        stop_reason=STOP_REASONS.index(
            "patience" if res.stop_reason == "patience" else "epochs"),
        time_style_s=t_style,
        time_train_s=time.perf_counter() - t0 - t_style)
    return base.FixResult(res.variables, None, info)
