"""HUDD (model level): heatmap-based root causes, unsafe set, retraining.

Source: H. Fahmy, F. Pastore, M. Bagherzadeh, L. Briand, "Supporting Deep
Neural Network Safety Analysis and Retraining Through Heatmap-Based
Unsupervised Learning", IEEE Trans. Reliability 2021 (tool: ICSE'22 demo).
Semantics read from ``SNTSVV/HUDD-Toolset@f87ae46`` (``HeatmapModule.py``,
``clusterModule.py``, ``assignModule.py``, ``dataSupplier.py``,
``retrainModule.py``, ``Helper.py``); nothing was copied.

Algorithm
---------
1. **Heatmaps.** LRP relevance (:mod:`dlfix_jax.fixers._lrp`: z+ rule for
   Dense, z rule with stabiliser 1e-9 for Conv and pooling, as custom VJPs)
   of every *error-inducing* input — the failing repair inputs — at the
   input of every layer, one per distinct relevance tensor, the pixel
   heatmap left out (``Helper.selectLayer`` gives layer 0 the score 1e9).
2. **Root-cause clusters, per layer** (``clusterModule.HACluster``): the
   pairwise Euclidean distance matrix ``D`` of the heatmaps; each row
   divided by its maximum (``sklearn.preprocessing.normalize(norm="max")``);
   Ward linkage of the **rows as feature vectors** (``scipy`` ``linkage(
   pdist(rows), "ward", optimal_ordering=True)``); for ``k = 2..kmax`` the
   cut ``fcluster(maxclust=k)`` is scored by WICD on the normalised rows::

       WICD = (1 / #clusters) * sum_{|c| > 1} (|c| / N) * mean_{i<j in c} d_ij

   and ``k`` is the **knee of the gradient** of the WICD curve
   (``gradientO4`` fourth-order differences, then ``kneed.KneeLocator(k,
   grad, curve="concave", direction="increasing")``, the "KG" selection).
   The layer's score is the WICD of the chosen cut on the raw distances
   (``doClustering``; 1e9 when every cluster is a singleton); the layer
   with the lowest score is selected.
3. **Assignment, "ClosestU"** (``assignModule.assign``): heatmaps of the
   improvement set (the whole repair set) at the selected layer; the
   distance of an image to a non-singleton cluster is the minimum over the
   cluster's members; clusters are ranked per image. Cluster ``c`` has the
   quota ``ceil(2 |c|)`` (``getUCs(caseFile, 2)``); for rank ``o = 0, 1,
   ...`` images are taken in increasing distance to their ``o``-th cluster
   and assigned while it has room, until every quota is filled.
4. **Unsafe set, smart bagging** (``dataSupplier.generateSmartBaggingHM``
   with ``getUCs(caseFile, 1)``): for every cluster with more than one
   assigned image, the ``|c|`` images closest to it (by its rank for the
   image, then distance) are taken and over-sampled to ``U_b = max_c |c|``:
   each draw ``u ~ U(0, 1)`` appends every image ``z`` with ``u < 1 -
   d_z / sum(d)``; the bag is cut to ``U_b * #clusters`` images. The unsafe
   images keep their **true labels** (the original copies them into their
   class folders).
5. **Retraining** (``retrainModule.alexTrain``) from the current weights
   on the training set plus the unsafe set, SGD lr 1e-3, momentum 0.9,
   weight decay 5e-4 (torch semantics), batch 128, ``epochs`` epochs, with
   the shared training loop; the epoch with the best running training
   accuracy is kept (the original saves that one; ``select="valid"`` keeps
   the best validation accuracy instead).

Defaults and their sources: ``max_clusters`` 150 (``Helper.maxClust``), cut
to half the number of error-inducing inputs (``clusterModule.run``'s
``len(heatmapsDistance) / 2``, commented out there; with 150 > N every cut
past N is all singletons); quota factor 2 and bag factor 1 (``getUCs``
calls); lr 1e-3, momentum 0.9, weight decay 5e-4 (``retrainModule``);
batch 128 (``Helper.batchSize``); ``epochs`` 10 (``Helper``: 10-20 per
case study, the smallest); ``select="train_acc"`` (``alexTrain`` with no
validation set).

Deviations
----------
* Error-inducing inputs are the failing **repair** inputs and the
  improvement set is the whole repair set (HUDD uses test-set errors and a
  separate unlabelled improvement set; the study gives fixers no test data).
* The original adds a random 1/20 of a second training split to the
  retraining data; we have one training split and use it whole.
* When ``KneeLocator`` finds no knee (the original then fails with a
  TypeError) the cut with the lowest WICD is used (``knee`` code 1); when
  only ``k = 2`` is possible that cut is used (code 2, as the original).
* A bag whose distances are all zero (its images are the cluster's own
  members) draws with ``p = 1`` (the original divides by zero). The
  original's sentinel that never assigns distances >= 1000 is not kept.
* ``random.shuffle`` of the improvement list (tie order) is a keyed
  permutation; bag draws use a numpy generator seeded from the key.
* Training data are shuffled by the shared loop (epochs of one
  permutation, the last partial batch filled from its start).
* With no root-cause cluster (too few failing inputs, or only singleton
  clusters) the unsafe set is empty and the retraining runs on the
  training set alone: plain fine-tuning with HUDD's optimiser, selected by
  its rule (the original would crash or stop there). ``info`` shows it:
  ``n_unsafe = 0`` and ``knee`` code 3 when there were too few inputs.

Applicability: sequential models whose layer kinds have an LRP rule
(:func:`dlfix_jax.fixers._lrp.supports`); ResNet18 and DenseNet121 are
refused (the study has HUDD numbers for them, so its authors adapted the
rules somehow; that adaptation is not known). Streamed training data are
refused (the training set is concatenated with the unsafe set in memory).

``info``: ``n_failing``, ``layer_index`` (selected layer, index into
``model.layers``; -1: none), ``layer_scores`` (per candidate layer),
``candidate_layers`` (their indices), ``n_clusters`` (the cut's k),
``n_root_causes`` (non-singleton clusters), ``knee`` (code into
:data:`KNEE_CODES`), ``n_assigned``, ``n_unsafe``, ``n_unsafe_unique``,
``unsafe_failing`` (unsafe images that the original misclassifies),
``epoch_scores``, ``best_epoch`` (1-based), ``time_heatmaps_s``,
``time_cluster_s``, ``time_retrain_s``.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import kneed
import ml_collections
import numpy as np
from scipy.cluster import hierarchy
from scipy.spatial import distance
from sklearn import preprocessing

from dlfix_jax import predict as predict_lib
from dlfix_jax import progress as progress_lib
from dlfix_jax.data import base as data_base
from dlfix_jax.data.source import Source
from dlfix_jax.fixers import _lrp
from dlfix_jax.fixers import base
from dlfix_jax.training import loop

KNEE_CODES = ("knee of the WICD gradient", "no knee: lowest WICD",
              "single cut (k = 2)", "too few error-inducing inputs")
SELECT = ("train_acc", "valid")
_NO_CLUSTER = 1e9  # the original's score of a layer without a real cluster
# Sub-streams of the fixer key.
_K_ASSIGN, _K_BAG, _K_TRAIN = 0, 1, 2


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.max_clusters = 150        # Helper.maxClust
    c.assign_factor = 2.0       # getUCs(caseFile, 2) in ClosestU
    c.bag_factor = 1.0          # getUCs(caseFile, 1) in smart bagging
    c.epochs = 10               # Helper: 10-20 epochs per case study
    c.batch_size = 128          # Helper.batchSize
    c.lr = 1e-3                 # retrainModule.learning_rate
    c.momentum = 0.9            # retrainModule.momentum
    c.weight_decay = 5e-4       # alexTrain's SGD
    c.select = "train_acc"      # alexTrain without a validation set
    c.heatmap_batch_size = 256  # ours (speed only)
    c.eval_batch_size = 1000    # ours (speed only)
    return c


def check_config(cfg) -> None:
    base.check_ranges(
        cfg, max_clusters=(2, None), assign_factor=(0.0, None),
        bag_factor=(0.0, None), epochs=(0, None), batch_size=(1, None),
        lr=(0.0, 10.0), momentum=(0.0, 1.0), weight_decay=(0.0, None),
        select=set(SELECT), heatmap_batch_size=(1, None),
        eval_batch_size=(1, None))


def applicable(info: base.ProblemInfo) -> str | None:
    if info.streaming:
        return ("HUDD retrains on the training set plus its unsafe set, "
                "which needs the training set in memory (this one is "
                "streamed)")
    reason = _lrp.supports(info.model)
    if reason:
        return f"HUDD needs LRP heatmaps at every layer: {reason}"
    return None


# ---------------------------------------------------------------------------
# Step 2: clustering (host, numpy / scipy / scikit-learn / kneed)


def wicd(dist: np.ndarray, labels: np.ndarray) -> float:
    """Weighted intra-cluster distance (``getAvgLayer_WICD``): labels are
    1..K; singletons count in K but add nothing."""
    n, k = len(labels), int(labels.max())
    total = 0.0
    for c in range(1, k + 1):
        idx = np.nonzero(labels == c)[0]
        if len(idx) > 1:
            sub = dist[np.ix_(idx, idx)]
            pairs = len(idx) * (len(idx) - 1) / 2
            total += (np.triu(sub, 1).sum() / pairs) * len(idx) / n
    return total / k


def gradient_o4(f: np.ndarray, dx: float = 4.0) -> np.ndarray:
    """``clusterModule.gradientO4`` in 1-D: fourth-order central differences
    inside, first differences on the two first and two last points."""
    f = np.asarray(f, np.float64)
    n = len(f)
    if n < 3:
        return np.full(n, (f[-1] - f[0]) / dx if n > 1 else 0.0)
    out = np.empty(n)
    if n > 4:
        out[2:-2] = (f[:-4] - 8 * f[1:-3] + 8 * f[3:-1] - f[4:]) / 12.0
    out[:2] = f[1:3] - f[:2]
    out[-2:] = f[-2:] - f[-3:-1]
    return out / dx


def cluster_layer(h: np.ndarray, max_clusters: int):
    """Clusters the heatmaps ``h`` (N, D) of one layer (module docstring,
    step 2).

    Returns:
      ``(labels (N,) 1..K, score, knee code, raw distances (N, N))``.
    """
    n = len(h)
    dist = distance.squareform(distance.pdist(h.astype(np.float64)))
    if n < 3:
        labels = np.arange(1, n + 1)
        return labels, _NO_CLUSTER, KNEE_CODES.index(
            "too few error-inducing inputs"), dist
    rows = preprocessing.normalize(dist, norm="max")
    tree = hierarchy.linkage(distance.pdist(rows), method="ward",
                             optimal_ordering=True)
    kmax = int(min(max_clusters, max(2, n // 2)))
    ks = list(range(2, kmax + 1))
    cuts = [hierarchy.fcluster(tree, t=k, criterion="maxclust") for k in ks]
    scores = [wicd(rows, c) for c in cuts]
    if len(ks) == 1:
        pick, code = 0, KNEE_CODES.index("single cut (k = 2)")
    else:
        knee = kneed.KneeLocator(ks, gradient_o4(np.asarray(scores)),
                                 curve="concave",
                                 direction="increasing").knee
        if knee is None:
            pick = int(np.argmin(scores))
            code = KNEE_CODES.index("no knee: lowest WICD")
        else:
            pick = ks.index(int(knee))
            code = KNEE_CODES.index("knee of the WICD gradient")
    labels = cuts[pick]
    has_cluster = np.any(np.bincount(labels) > 1)
    score = wicd(dist, labels) if has_cluster else _NO_CLUSTER
    return labels, score, code, dist


# ---------------------------------------------------------------------------
# Steps 3-4: ClosestU assignment and smart bagging (host)


def cluster_distances(h_improve: np.ndarray, h_err: np.ndarray,
                      labels: np.ndarray):
    """``(ids, d)``: the non-singleton cluster ids and ``d[i, j]``, the
    distance of improvement image ``i`` to cluster ``ids[j]`` (minimum over
    its members)."""
    ids = [c for c in range(1, int(labels.max()) + 1)
           if np.sum(labels == c) > 1]
    d = np.zeros((len(h_improve), len(ids)))
    for j, c in enumerate(ids):
        members = h_err[labels == c].astype(np.float64)
        d[:, j] = distance.cdist(h_improve.astype(np.float64),
                                 members).min(axis=1)
    return ids, d


def closest_u(d: np.ndarray, quotas: np.ndarray, perm: np.ndarray
              ) -> np.ndarray:
    """ClosestU assignment: ``(N,)`` index into the clusters of ``d``'s
    columns, -1 when unassigned (module docstring, step 3). ``perm`` is the
    shuffled image order that breaks ties."""
    n, k = d.shape
    order = np.argsort(d, axis=1, kind="stable")            # clusters by rank
    dist_at = np.take_along_axis(d, order, axis=1)
    assigned = -np.ones(n, np.int64)
    counts = np.zeros(k, np.int64)
    total = int(quotas.sum())
    done = 0
    for o in range(k):
        if done >= total:
            break
        seq = perm[np.argsort(dist_at[perm, o], kind="stable")]
        for i in seq:
            c = order[i, o]
            if assigned[i] < 0 and counts[c] < quotas[c]:
                assigned[i] = c
                counts[c] += 1
                done += 1
                if done >= total:
                    break
    return assigned


def smart_bag(d: np.ndarray, sizes: np.ndarray, assigned: np.ndarray,
              bag_factor: float, rng: np.random.Generator) -> np.ndarray:
    """The bagged unsafe set (indices into the improvement set, with
    repeats; module docstring, step 4)."""
    k = d.shape[1]
    uc = np.ceil(bag_factor * sizes).astype(np.int64)
    ub = int(uc.max()) if k else 0
    rank = np.argsort(np.argsort(d, axis=1, kind="stable"), axis=1)
    out: list[int] = []
    for c in range(k):
        mine = np.nonzero(assigned == c)[0]
        if len(mine) <= 1:
            continue
        cand = np.lexsort((d[:, c], rank[:, c]))[:uc[c]]
        bag = list(cand)
        if len(cand) > 1:
            dz = d[cand, c]
            s = dz.sum()
            p = 1.0 - dz / s if s > 0 else np.ones_like(dz)
            while len(bag) < ub:
                u = rng.uniform()
                bag.extend(int(z) for z, pz in zip(cand, p) if u < pz)
        else:
            bag.extend([int(mine[0])] * max(0, ub - len(bag)))
        out.extend(int(i) for i in bag)
    return np.asarray(out[:math.ceil(ub * k)], np.int64)


def _np_rng(key) -> np.random.Generator:
    return np.random.default_rng(np.asarray(jax.random.key_data(key)))


# ---------------------------------------------------------------------------
# The fixer


def _retrain(key, problem, unsafe_x, unsafe_y, config):
    """Step 5; returns ``(variables, epoch scores, best epoch)``."""
    model = problem.model
    train = problem.train.split()
    data = data_base.Split(
        np.concatenate([np.asarray(train.x, np.float32), unsafe_x]),
        np.concatenate([np.asarray(train.y, np.int32), unsafe_y]))
    src = Source(data, "train+unsafe")
    bs = min(int(config.batch_size), len(src))
    spe = src.steps_per_epoch(bs)
    epochs = int(config.epochs)
    tx = loop.optimizer("sgd", float(config.lr),
                        momentum=float(config.momentum),
                        weight_decay=float(config.weight_decay))
    step_fn = loop.make_step(loop.xent(model), tx)
    batches = src.take_steps(loop.order_key(key), bs, spe * epochs)
    state = loop.init_state(problem.variables, tx)
    best, best_score, best_epoch, scores = problem.variables, -1.0, 0, []
    prog = progress_lib.Progress(epochs, "HUDD retraining epochs")
    for e in range(epochs):
        res = loop.fit(loop.step_key(key), None, batches, step_fn=step_fn,
                       state=state, num_steps=spe, desc="HUDD retraining")
        state = res.state
        if config.select == "train_acc":
            score = res.totals.get("correct", 0.0) / (spe * bs)
        else:
            score = predict_lib.accuracy(model, state.variables,
                                         problem.valid,
                                         int(config.eval_batch_size))
        scores.append(float(score))
        if score > best_score:
            best, best_score, best_epoch = state.variables, score, e + 1
        prog.step(extra=f"{config.select} {score:.4f}")
    prog.done()
    return best, np.asarray(scores, np.float32), best_epoch


@base.register("hudd", level="model", abbrev="HUDD", vmappable=False,
               paper="Fahmy, Pastore, Bagherzadeh, Briand, 'Supporting Deep "
                     "Neural Network Safety Analysis and Retraining Through "
                     "Heatmap-Based Unsupervised Learning', IEEE Trans. "
                     "Reliability 2021",
               default_config=default_config, applicable=applicable,
               check_config=check_config, codes={"knee": KNEE_CODES})
def fix(key: jax.Array, problem: base.Problem,
        config: ml_collections.ConfigDict) -> base.FixResult:
    """HUDD; see the module docstring for the algorithm and deviations."""
    check_config(config)
    reason = applicable(problem.info)
    if reason:
        raise ValueError(reason)
    model, variables = problem.model, problem.variables
    hbs = int(config.heatmap_batch_size)
    t0 = time.perf_counter()
    cand = _lrp.distinct_layers(model)
    fail_x = np.asarray(problem.failing.x)
    h_err = _lrp.heatmaps(model, variables, fail_x, cand, hbs)
    t1 = time.perf_counter()
    results = [cluster_layer(h, int(config.max_clusters)) for h in h_err]
    scores = np.asarray([r[1] for r in results], np.float64)
    t2 = time.perf_counter()
    info = {"n_failing": len(fail_x), "candidate_layers": np.asarray(cand),
            "layer_scores": scores, "time_heatmaps_s": t1 - t0,
            "time_cluster_s": t2 - t1}

    best_j = int(np.argmin(scores)) if len(scores) else -1
    unsafe = np.zeros((0,), np.int64)
    n_assigned = n_clusters = n_roots = 0
    knee = KNEE_CODES.index("too few error-inducing inputs")
    if best_j >= 0 and scores[best_j] < _NO_CLUSTER:
        labels, _, knee, _ = results[best_j]
        n_clusters = int(labels.max())
        h_imp = _lrp.heatmaps(model, variables, np.asarray(problem.repair.x),
                              [cand[best_j]], hbs)[0]
        ids, d = cluster_distances(h_imp, h_err[best_j], labels)
        sizes = np.asarray([np.sum(labels == c) for c in ids])
        n_roots = len(ids)
        quotas = np.ceil(float(config.assign_factor) * sizes).astype(np.int64)
        perm = np.asarray(jax.random.permutation(
            jax.random.fold_in(key, _K_ASSIGN), len(h_imp)))
        assigned = closest_u(d, quotas, perm)
        n_assigned = int(np.sum(assigned >= 0))
        unsafe = smart_bag(d, sizes, assigned, float(config.bag_factor),
                           _np_rng(jax.random.fold_in(key, _K_BAG)))
    elif best_j >= 0:
        knee = results[best_j][2]
    rx = np.asarray(problem.repair.x, np.float32)[unsafe]
    ry = np.asarray(problem.repair.y, np.int32)[unsafe]
    orig_pred = predict_lib.predict(model, variables, rx,
                                    int(config.eval_batch_size))
    t3 = time.perf_counter()
    fixed, epoch_scores, best_epoch = _retrain(
        jax.random.fold_in(key, _K_TRAIN), problem, rx, ry, config)
    info.update(
        layer_index=cand[best_j] if best_j >= 0 else -1,
        n_clusters=n_clusters, n_root_causes=n_roots, knee=int(knee),
        n_assigned=n_assigned, n_unsafe=len(unsafe),
        n_unsafe_unique=len(np.unique(unsafe)),
        unsafe_failing=int(np.sum(orig_pred != ry)),
        epoch_scores=epoch_scores, best_epoch=best_epoch,
        time_retrain_s=time.perf_counter() - t3)
    return base.FixResult(fixed, None, info)
