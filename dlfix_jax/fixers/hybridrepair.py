"""HybridRepair (model level): cluster-propagated labels plus semi-supervised
fine-tuning on the field data.

Source: Y. Li, M. Chen, Q. Xu, "HybridRepair: Towards Annotation-Efficient
Repair for Deep Learning Models", ISSTA 2022. Semantics read from
``cure-lab/HybridRepair@9ae3088`` (``repair.sh``; ``selection.py``:
``main``, ``get_tta_values``, ``cluster_latents``,
``unsth_region_plabeling``, ``estimate_tau``, ``retrain_model_under_test``,
``aug``); nothing was copied. The "field data" pool is the repair set.

Algorithm
---------
1. **Unsmoothness.** Each pool input gets ``tta_views`` (8) AugMix views
   (:func:`dlfix_jax.data.augment.augmix` in pixel space: width 1, depth
   1-3, severity 3, alpha 1, as ``aug``) plus the clean one; ``u = H_2(mean
   of the 9 softmax outputs)``, divided by its maximum over the pool.
2. **Features**: the model's own penultimate features (the input of its
   last Dense layer; ``--fe model2test``, the argparse default).
   ``repair.sh`` uses ``--fe mocov3``, a self-supervised MoCo-v3 ResNet
   whose checkpoint is stored with Git LFS and is not available here.
3. **Hybrid clustering** (``--cluster hybrid``): L2-normalised features;
   scikit-learn ``HDBSCAN(min_samples=3)`` (``min_cluster_size`` 5, the
   ``hdbscan`` package default the original ran with) marks noise; KMeans
   on the non-noise points with ``K = max(n // avg_clustersize, min(budget,
   n))`` (``avg_clustersize`` 10, ``n_init`` 10); each cluster's centre is
   the pool input nearest to its k-means centre (noise included) that
   no earlier centre took (the original can pick one input for two
   clusters and then reads fewer labels than its budget).
4. **Labelling** (``unsth_region_plabeling``): ``budget = int(1% * |pool|)``
   (``p_budget`` 1); clusters are ranked by the summed unsmoothness of
   their members; for the top ``budget`` clusters only the **centre's true
   label** is queried and given to every member. When the clusters hold
   fewer points than the budget, every clustered point and ``budget -
   clustered`` random others are labelled with their true labels instead
   (the original's ``budget > sizes`` branch). Either way exactly
   ``min(budget, |pool|)`` true labels are read (:class:`LabelOracle`).
5. **Unlabelled selection**: ``tau`` (``--auto_tao``, ``estimate_tau``) is
   the mean unsmoothness of the 1,000 hold-out (validation) inputs whose
   training density — mean cosine distance of their logits to the 100
   nearest training logits — is closest to the mean density; inputs with
   ``u <= tau`` are selected. Sampling weights ``1 - u`` (0 when not
   selected, 1 for the propagated ones), refreshed after every epoch from
   the retrained model (``--u_weight``).
6. **Retraining**, one SGD optimiser throughout (lr 1e-3, momentum 0.9,
   weight decay 5e-4; batches 64 labelled + 64 unlabelled), every pass on
   the shared training loop:

   * ``finetune_epochs`` (10 = ``retrain_epoch``) passes of CE on the
     *replay set* (training inputs the current model classifies right,
     recomputed before each pass);
   * then per epoch (``epochs`` 10): (a) label-smoothed CE (0.1) on replay
     ∪ propagated set; (b) a MixMatch-style pass: targets of an unlabelled
     input are ``sharpen(mean softmax of its 9 views, T = 0.5)`` (training
     mode, no gradient; propagated inputs use a 0.1-smoothed one-hot of
     their label); the 64 replay inputs and the 9 x 64 views are mixed with
     one ``lam ~ Beta(0.75, 0.75)``, ``lam = max(lam, 1 - lam)``, and a
     permutation; ``L = CE(mixed labelled part, its labels) + 100 *
     mean((softmax(mixed unlabelled part) - mixed targets)^2)``. A pass
     runs ``int(len / 64)`` batches ((b): the larger of replay and pool).
   * After each epoch the pool's TTA entropy is recomputed; the epoch with
     the **minimum summed (max-normalised) entropy** is returned (the
     original's reported epoch when ``--u_weight`` is on; it only logs
     it). ``select="valid"`` / ``"last"`` are our alternatives.

Deviations: pool = repair set and hold-out = validation split (the
original carves both from CIFAR's train+test); own features instead of
MoCo-v3 (above); AugMix ops from ``dlfix_jax.data.augment`` (float pixels,
dm-pix geometry; its documented differences from PIL), translations scaled
to the image side (the original's ``IMAGE_SIZE`` is 32); no training-time
augmentation of replay data (the original's CIFAR pipeline flips and
crops; MNIST-like data have none there); the target pass's BatchNorm
running-statistics update is dropped (only the loss pass updates them);
``0 * log 0`` counts 0 in the entropy (torch gives NaN); KMeans' and the
samplers' seeds derive from the key (the original fixes ``random_state=0``
and ``manualSeed``); unlabelled batches are 64 independent weighted draws
with replacement (``WeightedRandomSampler`` in expectation); labelled
batches follow the shared loop's epochs; a pass (b) with zero total weight
is skipped (``WeightedRandomSampler`` would raise). If HDBSCAN marks every
point as noise, KMeans runs on all points (the original would fail).
``pass_fraction`` (1.0) scales the batches per pass, ``finetune_epochs``
and ``epochs`` the passes: size knobs for small budgets.

Applicability: any classifier with a Dense last layer whose input serves
as features; streamed training data are refused (the replay set is
predicted and sampled from the whole training set in memory). The study
marks HR CORRUPTED on ImageNet, which is streamed here, so it is refused
there.

``info``: ``budget``, ``n_true_labels``, ``n_propagated``,
``propagation_acc`` (fraction of propagated labels that are right),
``n_noise``, ``n_clusters``, ``tau``, ``n_selected_u``, ``entropy_sums``
(per epoch), ``best_epoch`` (1-based; 0: the fine-tuned start under
``select="last"`` with no epoch), ``skipped_u_passes``, ``time_tta_s``,
``time_cluster_s``, ``time_train_s``.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from sklearn import cluster as sk_cluster
from sklearn import neighbors
from sklearn.metrics import pairwise_distances

from dlfix_jax import predict as predict_lib
from dlfix_jax import progress as progress_lib
from dlfix_jax.data import augment
from dlfix_jax.data import base as data_base
from dlfix_jax.data.source import Source
from dlfix_jax.fixers import base
from dlfix_jax.models import base as models_base
from dlfix_jax.training import loop

SELECT = ("entropy", "valid", "last")
# Sub-streams of the fixer key.
_K_TTA, _K_CLUSTER, _K_TAU, _K_TRAIN = 0, 1, 2, 3


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.budget_percent = 1.0     # repair.sh p_budget
    c.tta_views = 8            # selection.py main: n_iters = 8
    c.aug_width = 1            # aug(): mixture_width
    c.aug_depth = -1           # aug(): depth 1..3
    c.aug_severity = 3.0       # aug(): aug_severity
    c.aug_alpha = 1.0          # aug(): Dirichlet / Beta(1, 1)
    c.min_samples = 3          # repair.sh min_samples
    c.min_cluster_size = 5     # hdbscan package default
    c.avg_clustersize = 10     # repair.sh avg_clustersize
    c.kmeans_n_init = 10       # scikit-learn's default when the code was written
    c.auto_tau = True          # repair.sh --auto_tao
    c.tau = 0.1                # repair.sh tao (used without auto_tau)
    c.tau_samples = 1000       # estimate_tau
    c.density_k = 100          # main: k_neihgbors
    c.u_weight = True          # repair.sh --u_weight
    c.finetune_epochs = 10     # retrain_epoch (initial fine-tune)
    c.epochs = 10              # repair.sh epochs
    c.pass_fraction = 1.0      # ours: 1.0 = the original's batches per pass
    c.lr = 1e-3                # repair.sh lr
    c.momentum = 0.9           # selection.py SGD
    c.weight_decay = 5e-4      # repair.sh weight_decay
    c.l_batch_size = 64        # retrain_model_under_test
    c.u_batch_size = 64        # retrain_model_under_test
    c.label_smoothing = 0.1    # LabelSmoothingLoss / smooth_one_hot
    c.temperature = 0.5        # sharpening T
    c.mixup_alpha = 0.75       # Beta(0.75, 0.75)
    c.lam_u = 100.0            # repair.sh lam
    c.select = "entropy"       # minimum summed pool entropy
    c.eval_batch_size = 256    # ours (speed only)
    return c


def check_config(cfg) -> None:
    base.check_ranges(
        cfg, budget_percent=(0.0, 100.0), tta_views=(1, None),
        aug_width=(1, None), aug_depth=(-1, 10), aug_severity=(0.1, 10.0),
        aug_alpha=(1e-6, None), min_samples=(1, None),
        min_cluster_size=(2, None), avg_clustersize=(1, None),
        kmeans_n_init=(1, None), tau=(0.0, 1.0), tau_samples=(1, None),
        density_k=(1, None), finetune_epochs=(0, None), epochs=(0, None),
        pass_fraction=(0.0, None), lr=(0.0, 10.0), momentum=(0.0, 1.0),
        weight_decay=(0.0, None), l_batch_size=(1, None),
        u_batch_size=(1, None), label_smoothing=(0.0, 0.999),
        temperature=(1e-3, None), mixup_alpha=(1e-6, None),
        lam_u=(0.0, None), select=set(SELECT), eval_batch_size=(1, None))
    if cfg.aug_depth == 0:
        raise ValueError("config aug_depth=0 must be -1 or >= 1")


def feature_layer(model) -> str | None:
    """The last Dense layer (its input is the penultimate features)."""
    params = model.abstract_variables()["params"]
    dense = [n for n in models_base.param_layers(params)
             if len(models_base.get_layer_params(params, n)["kernel"].shape)
             == 2]
    if not dense:
        return None
    if model.is_sequential:
        names = [s.name for s in model.layers if s.name in dense]
        return names[-1] if names else None
    order = model.all_layer_names(model.abstract_variables())
    return [n for n in order if n in dense][-1]


def applicable(info: base.ProblemInfo) -> str | None:
    if info.streaming:
        return ("HybridRepair replays and samples the whole training set, "
                "which needs it in memory (this one is streamed)")
    if feature_layer(info.model) is None:
        return (f"model {info.model.name!r} has no Dense layer whose input "
                "could serve as HybridRepair's features")
    return None


# ---------------------------------------------------------------------------
# TTA unsmoothness and features (cached jitted kernels)


def _views(key, pix, n_views, aug, mean, std):
    """``[clean] + n_views`` AugMix views of a pixel batch, normalised."""
    m, s = jnp.asarray(mean), jnp.asarray(std)
    out = [(pix - m) / s]
    for i in range(n_views):
        a = augment.augmix(jax.random.fold_in(key, i), pix, width=aug[0],
                           depth=aug[1], severity=aug[2], alpha=aug[3])
        out.append((a - m) / s)
    return out


def _entropy2(p):
    return -jnp.sum(jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1.0)),
                              0.0), axis=-1)


@functools.lru_cache(maxsize=None)
def _tta_kernel(model, n_views: int, aug: tuple, mean: tuple, std: tuple):
    """jit ``(variables, x, key) -> (mean-view entropy (B,), mean probs)``."""

    def fn(variables, x, key):
        pix = x * jnp.asarray(std) + jnp.asarray(mean)
        views = _views(key, pix, n_views, aug, mean, std)
        b = x.shape[0]
        logits = model.apply(variables, jnp.concatenate(views))
        p = jax.nn.softmax(logits.astype(jnp.float32), -1)
        p = p.reshape((n_views + 1, b, -1)).mean(0)
        return _entropy2(p), p

    return jax.jit(fn)


def tta_entropy(key, model, variables, x, n_views, aug, mean, std,
                batch_size: int = 256) -> np.ndarray:
    """Max-normalised TTA mean entropy of ``x`` (host array, (N,))."""
    fn = _tta_kernel(model, int(n_views), tuple(aug), tuple(mean), tuple(std))
    n = len(x)
    bs = max(1, min(int(batch_size), n))
    out = []
    for b, start in enumerate(range(0, n, bs)):
        xb = np.asarray(x[start:start + bs], np.float32)
        e, _ = fn(variables, jnp.asarray(predict_lib.pad(xb, bs)),
                  jax.random.fold_in(key, b))
        out.append(np.asarray(e)[:len(xb)])
    e = np.concatenate(out) if out else np.zeros((0,), np.float32)
    top = float(e.max()) if len(e) else 0.0
    return e / top if top > 0 else np.zeros_like(e)


@functools.lru_cache(maxsize=None)
def _feature_kernel(model, layer: str):
    apply = models_base.jitted_apply(model, (layer,))

    def fn(variables, x):
        _, acts = apply(variables, x)
        return acts[layer]["input"].reshape(x.shape[0], -1)

    return jax.jit(fn)


def features(model, variables, x, batch_size: int = 256) -> np.ndarray:
    """The penultimate features (input of the last Dense layer), (N, D)."""
    fn = _feature_kernel(model, feature_layer(model))
    n = len(x)
    bs = max(1, min(int(batch_size), n))
    out = []
    for start in range(0, n, bs):
        xb = np.asarray(x[start:start + bs], np.float32)
        out.append(np.asarray(fn(variables, jnp.asarray(
            predict_lib.pad(xb, bs))))[:len(xb)])
    return np.concatenate(out)


# ---------------------------------------------------------------------------
# Clustering and label propagation (host)


def hybrid_clusters(feats: np.ndarray, budget: int, min_samples: int,
                    min_cluster_size: int, avg_clustersize: int,
                    n_init: int, seed: int):
    """``cluster_latents(..., 'hybrid')``: ``(clusters, centres, n_noise)``,
    clusters a list of index arrays, centres one pool index per cluster."""
    z = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True),
                           1e-12)
    n = len(z)
    if n < 2:
        return [np.arange(n)], np.zeros((n,), np.int64)[:1], 0
    hd = sk_cluster.HDBSCAN(min_samples=min(min_samples, n),
                            min_cluster_size=min(min_cluster_size, n)
                            ).fit(z)
    keep = np.nonzero(hd.labels_ != -1)[0]
    n_noise = n - len(keep)
    if len(keep) == 0:
        keep = np.arange(n)
    k = max(len(keep) // avg_clustersize, min(budget, len(keep)), 1)
    km = sk_cluster.KMeans(n_clusters=k, n_init=n_init,
                           random_state=seed).fit(z[keep])
    clusters = [keep[km.labels_ == c] for c in range(k)]
    return clusters, distinct_centres(km.cluster_centers_, z), n_noise


def distinct_centres(centers: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Per k-means centre, the nearest pool input not already taken by an
    earlier centre (each labelled centre is a distinct input, so the label
    budget is spent exactly). Distances are (clusters x pool), never the
    (pool x clusters x width) differences (GBs at the study's sizes)."""
    d = pairwise_distances(centers, z)
    out = np.empty((len(centers),), np.int64)
    used = np.zeros((len(z),), bool)
    for c in range(len(centers)):
        row = np.where(used, np.inf, d[c])
        out[c] = int(np.argmin(row))
        used[out[c]] = True
    return out


class LabelOracle:
    """Reveals true labels of pool inputs and counts how many it revealed."""

    def __init__(self, y):
        self._y = np.asarray(y)
        self.queried: set[int] = set()

    def __call__(self, idx) -> np.ndarray:
        idx = np.atleast_1d(np.asarray(idx, np.int64))
        self.queried.update(int(i) for i in idx)
        return self._y[idx]


def propagate_labels(clusters, centres, unsmooth, budget: int, oracle,
                     rng: np.random.Generator):
    """``unsth_region_plabeling`` (module docstring, step 4).

    Returns:
      ``(idx, labels)``: pool indices given a label and those labels.
    """
    n = len(unsmooth)
    budget = int(min(budget, n))
    if budget <= 0:
        return np.zeros((0,), np.int64), np.zeros((0,), np.int64)
    sizes = sum(len(c) for c in clusters)
    if budget > sizes:
        inside = np.concatenate([np.asarray(c, np.int64) for c in clusters])
        rest = np.setdiff1d(np.arange(n), inside)
        extra = rng.permutation(rest)[:budget - sizes]
        idx = np.concatenate([inside, extra])
        return idx, oracle(idx)
    score = np.asarray([unsmooth[c].sum() for c in clusters])
    order = np.argsort(score, kind="stable")[::-1][:budget]
    idx, lab = [], []
    for c in order:
        members = np.asarray(clusters[c], np.int64)
        label = oracle(centres[c])[0]
        idx.append(members)
        lab.append(np.full(len(members), label, np.int64))
    return np.concatenate(idx), np.concatenate(lab)


def estimate_tau(unsmooth_holdout, holdout_logits, train_logits, k: int,
                 n_samples: int) -> float:
    """``estimate_tau``: mean unsmoothness of the hold-out inputs whose
    training density is closest to the average density."""
    k = int(min(k, len(train_logits)))
    nn = neighbors.NearestNeighbors(n_neighbors=k, metric="cosine",
                                    algorithm="brute").fit(train_logits)
    dist, _ = nn.kneighbors(holdout_logits)
    density = dist.mean(1)
    near = np.argsort(np.abs(density - density.mean()), kind="stable")
    return float(np.mean(unsmooth_holdout[near[:n_samples]]))


# ---------------------------------------------------------------------------
# Losses (cached factories: one compilation per model and hyper-parameters)


@functools.lru_cache(maxsize=None)
def smoothed_xent(model, smoothing: float):
    """Label-smoothed CE (``LabelSmoothingLoss``: off-target mass spread
    over the C - 1 other classes) on ``(x, y)`` batches."""
    c = model.num_classes

    def loss_fn(variables, batch, key):
        x, y = batch[0], batch[1]
        logits, new_state = model.apply_train(variables, x, key)
        t = _smooth_one_hot(y, c, smoothing)
        loss = jnp.mean(optax.softmax_cross_entropy(logits, t))
        correct = jnp.sum(jnp.argmax(logits, -1) == y)
        return loss, (new_state, {"loss": loss, "correct": correct})

    return loss_fn


def _smooth_one_hot(y, c, smoothing):
    off = smoothing / (c - 1) if c > 1 else 0.0
    oh = jax.nn.one_hot(y, c)
    return oh * (1.0 - smoothing) + (1.0 - oh) * off


@functools.lru_cache(maxsize=None)
def mixmatch_loss(model, n_views: int, aug: tuple, mean: tuple, std: tuple,
                  temperature: float, smoothing: float, mixup_alpha: float,
                  lam_u: float):
    """The MixMatch-style loss of pass (b) (module docstring, step 6) on
    batches ``(x_l, y_l, pixels_u, plabel_u, pmask_u)``."""
    c = model.num_classes

    def loss_fn(variables, batch, key):
        x_l, y_l, pix_u, plabel, pmask = batch
        k_aug, k_t, k_lam, k_perm, k_drop = jax.random.split(key, 5)
        views = _views(k_aug, pix_u, n_views, aug, mean, std)
        b_l, b_u = x_l.shape[0], pix_u.shape[0]
        logits_t, _ = model.apply_train(jax.lax.stop_gradient(variables),
                                        jnp.concatenate(views), k_t)
        p = jax.nn.softmax(logits_t.astype(jnp.float32), -1)
        p = p.reshape((n_views + 1, b_u, c)).mean(0)
        sharp = p ** (1.0 / temperature)
        sharp = sharp / jnp.sum(sharp, -1, keepdims=True)
        sharp = jnp.where(pmask[:, None],
                          _smooth_one_hot(plabel, c, smoothing), sharp)
        sharp = jax.lax.stop_gradient(sharp)
        inputs = jnp.concatenate([x_l] + views)
        targets = jnp.concatenate([jax.nn.one_hot(y_l, c)]
                                  + [sharp] * (n_views + 1))
        lam = jax.random.beta(k_lam, mixup_alpha, mixup_alpha)
        lam = jnp.maximum(lam, 1.0 - lam)
        perm = jax.random.permutation(k_perm, inputs.shape[0])
        mixed_x = lam * inputs + (1.0 - lam) * inputs[perm]
        mixed_t = lam * targets + (1.0 - lam) * targets[perm]
        logits, new_state = model.apply_train(variables, mixed_x, k_drop)
        l_loss = jnp.mean(loop.cross_entropy(logits[:b_l], y_l))
        probs = jax.nn.softmax(logits[b_l:].astype(jnp.float32), -1)
        u_loss = jnp.mean((probs - mixed_t[b_l:]) ** 2)
        loss = l_loss + lam_u * u_loss
        correct = jnp.sum(jnp.argmax(logits[:b_l], -1) == y_l)
        return loss, (new_state, {"loss": loss, "l_loss": l_loss,
                                  "u_loss": u_loss, "correct": correct})

    return loss_fn


# ---------------------------------------------------------------------------
# The fixer


class _Trainer:
    """One optimiser state over all passes (``retrain_model_under_test``)."""

    def __init__(self, key, problem, config, tx):
        self.problem, self.config, self.tx = problem, config, tx
        self.state = loop.init_state(problem.variables, tx)
        self.key = key
        self.calls = 0
        train = problem.train.split()
        self.train_x = np.asarray(train.x, np.float32)
        self.train_y = np.asarray(train.y, np.int32)

    @property
    def variables(self):
        return self.state.variables

    def _replay(self):
        pred = predict_lib.predict(self.problem.model, self.variables,
                                   self.train_x,
                                   int(self.config.eval_batch_size))
        return np.nonzero(pred == self.train_y)[0]

    def _run(self, step_fn, batches, steps, desc):
        if steps <= 0:
            return
        k = jax.random.fold_in(self.key, self.calls)
        res = loop.fit(loop.step_key(k), None, batches, step_fn=step_fn,
                       state=self.state, num_steps=steps, desc=desc)
        self.state = res.state

    def labelled_pass(self, loss, extra_x=None, extra_y=None, desc=""):
        """CE-type pass on replay (∪ extra labelled inputs)."""
        self.calls += 1
        keep = self._replay()
        x, y = self.train_x[keep], self.train_y[keep]
        if extra_x is not None and len(extra_x):
            x = np.concatenate([x, extra_x])
            y = np.concatenate([y, extra_y])
        bs = int(self.config.l_batch_size)
        if len(y) < bs:
            return
        steps = int(int(len(y) / bs) * float(self.config.pass_fraction))
        src = Source(data_base.Split(x, y), "replay")
        k = loop.order_key(jax.random.fold_in(self.key, self.calls))
        self._run(loop.make_step(loss, self.tx),
                  src.take_steps(k, bs, steps), steps, desc)

    def mixmatch_pass(self, loss, pool_pix, plabel, pmask, weights, rng,
                      desc=""):
        """Pass (b): replay batches with weighted unlabelled draws."""
        self.calls += 1
        keep = self._replay()
        bl, bu = int(self.config.l_batch_size), int(self.config.u_batch_size)
        if len(keep) < bl or weights.sum() <= 0:
            return False
        steps = int(max(int(len(keep) / bl), int(len(weights) / bu))
                    * float(self.config.pass_fraction))
        src = Source(data_base.Split(self.train_x[keep], self.train_y[keep]),
                     "replay")
        k = loop.order_key(jax.random.fold_in(self.key, self.calls))
        p = weights / weights.sum()

        def batches():
            for x_l, y_l in src.take_steps(k, bl, steps):
                iu = rng.choice(len(p), size=bu, replace=True, p=p)
                yield x_l, y_l, pool_pix[iu], plabel[iu], pmask[iu]

        self._run(loop.make_step(loss, self.tx), batches(), steps, desc)
        return True


@base.register("hybridrepair", level="model", abbrev="HR", vmappable=False,
               paper="Li, Chen, Xu, 'HybridRepair: Towards Annotation-"
                     "Efficient Repair for Deep Learning Models', ISSTA 2022",
               default_config=default_config, applicable=applicable,
               check_config=check_config)
def fix(key: jax.Array, problem: base.Problem,
        config: ml_collections.ConfigDict) -> base.FixResult:
    """HybridRepair; see the module docstring for the algorithm and
    deviations."""
    check_config(config)
    reason = applicable(problem.info)
    if reason:
        raise ValueError(reason)
    model, v0 = problem.model, problem.variables
    ebs = int(config.eval_batch_size)
    aug = (int(config.aug_width), int(config.aug_depth),
           float(config.aug_severity), float(config.aug_alpha))
    views = int(config.tta_views)
    mean, std = tuple(problem.mean), tuple(problem.std)
    k_tta = jax.random.fold_in(key, _K_TTA)
    pool_x = np.asarray(problem.repair.x, np.float32)
    pool_y = np.asarray(problem.repair.y)
    n_pool = len(pool_x)

    def pool_entropy(v, epoch):
        return tta_entropy(jax.random.fold_in(k_tta, epoch), model, v,
                           pool_x, views, aug, mean, std, ebs)

    t0 = time.perf_counter()
    unsmooth = pool_entropy(v0, 0)
    t1 = time.perf_counter()
    budget = int(float(config.budget_percent) * n_pool / 100)
    seed = int(jax.random.randint(jax.random.fold_in(key, _K_CLUSTER), (),
                                  0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    clusters, centres, n_noise = hybrid_clusters(
        features(model, v0, pool_x, ebs), budget, int(config.min_samples),
        int(config.min_cluster_size), int(config.avg_clustersize),
        int(config.kmeans_n_init), seed)
    oracle = LabelOracle(pool_y)
    lab_idx, lab_y = propagate_labels(clusters, centres, unsmooth, budget,
                                      oracle, rng)
    if config.auto_tau:
        valid = problem.valid.split()
        u_hold = tta_entropy(jax.random.fold_in(key, _K_TAU), model, v0,
                             valid.x, views, aug, mean, std, ebs)
        tau = estimate_tau(
            u_hold, predict_lib.logits(model, v0, valid.x, ebs),
            predict_lib.logits(model, v0, problem.train.split().x, ebs),
            int(config.density_k), int(config.tau_samples))
    else:
        tau = float(config.tau)
    selected = unsmooth <= tau
    plabel = np.zeros((n_pool,), np.int32)
    plabel[lab_idx] = lab_y
    pmask = np.zeros((n_pool,), bool)
    pmask[lab_idx] = True

    def weights_from(u):
        w = (1.0 - u) if config.u_weight else np.ones_like(u)
        w = np.where(selected, w, 0.0)
        w[lab_idx] = 1.0
        return w.astype(np.float64)

    weights = weights_from(unsmooth)
    t2 = time.perf_counter()

    tx = loop.optimizer("sgd", float(config.lr),
                        momentum=float(config.momentum),
                        weight_decay=float(config.weight_decay))
    trainer = _Trainer(jax.random.fold_in(key, _K_TRAIN), problem, config,
                       tx)
    for _ in range(int(config.finetune_epochs)):
        trainer.labelled_pass(loop.xent(model), desc="HybridRepair fine-tune")
    mm = mixmatch_loss(model, views, aug, mean, std,
                       float(config.temperature),
                       float(config.label_smoothing),
                       float(config.mixup_alpha), float(config.lam_u))
    ls = smoothed_xent(model, float(config.label_smoothing))
    pool_pix = np.asarray(problem.to_pixels(jnp.asarray(pool_x)), np.float32)
    best, best_score, best_epoch = trainer.variables, np.inf, 0
    sums, skipped = [], 0
    prog = progress_lib.Progress(int(config.epochs), "HybridRepair epochs")
    for e in range(int(config.epochs)):
        trainer.labelled_pass(ls, pool_x[lab_idx], lab_y.astype(np.int32),
                              desc="HybridRepair labelled pass")
        ran = trainer.mixmatch_pass(mm, pool_pix, plabel, pmask, weights,
                                    rng, desc="HybridRepair MixMatch pass")
        skipped += not ran
        ent = pool_entropy(trainer.variables, e + 1)
        sums.append(float(ent.sum()))
        if config.u_weight:
            weights = weights_from(ent)
        if config.select == "entropy":
            score = sums[-1]
        elif config.select == "valid":
            score = -predict_lib.accuracy(model, trainer.variables,
                                          problem.valid, ebs)
        else:
            score = -e
        if score < best_score:
            best, best_score, best_epoch = trainer.variables, score, e + 1
        prog.step(extra=f"entropy sum {sums[-1]:.2f}")
    prog.done()
    right = (np.mean(lab_y == pool_y[lab_idx]) if len(lab_idx)
             else float("nan"))
    info = {"budget": budget, "n_true_labels": len(oracle.queried),
            "n_propagated": len(lab_idx),
            "propagation_acc": float(right) if len(lab_idx) else 0.0,
            "n_noise": int(n_noise), "n_clusters": len(clusters),
            "tau": float(tau), "n_selected_u": int(selected.sum()),
            "entropy_sums": np.asarray(sums, np.float32),
            "best_epoch": best_epoch, "skipped_u_passes": skipped,
            "time_tta_s": t1 - t0, "time_cluster_s": t2 - t1,
            "time_train_s": time.perf_counter() - t2}
    return base.FixResult(best, None, info)
