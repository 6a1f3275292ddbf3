"""Model-level fixer pieces that the contract test does not reach: HUDD's
LRP conservation (z+ rule) and HybridRepair's exact label budget."""

import jax
import numpy as np

from dlfix_jax import fixers
from dlfix_jax.fixers import _lrp, hybridrepair
from tests import fixtures


def test_lrp_z_plus_conserves_relevance_on_a_dense_relu_net():
    """With non-negative inputs (pixels, ReLU outputs) and positive top
    logits, the z+ rule keeps the total relevance at every layer equal to
    the top logit (the bias takes none)."""
    model, variables, ds, _ = fixtures.tiny_mlp_problem()
    x = np.asarray(ds.test.x[:32], np.float32)
    assert (x >= 0).all()
    rel, logits = jax.jit(lambda v, a: _lrp.relevances(model, v, a))(
        variables, x)
    top = np.max(np.asarray(logits), -1)
    keep = top > 0.5
    assert keep.sum() >= 16
    names = [s.kind for s in model.layers]
    assert names == ["flatten", "dense", "relu", "dense"]
    for i, r in enumerate(rel):
        total = np.asarray(r).reshape(len(x), -1).sum(-1)
        np.testing.assert_allclose(total[keep], top[keep], rtol=2e-4,
                                   err_msg=f"layer {i} ({names[i]})")


def test_hybrid_clusters_spend_exactly_the_label_budget():
    """Centres are distinct pool inputs, so the top-``budget`` clusters read
    exactly ``budget`` true labels, even when two k-means centres share
    their nearest input."""
    rng = np.random.default_rng(0)
    # Tight blobs plus a far point nearest to several centres' neighbours.
    z = np.concatenate([rng.normal(c, 0.05, (40, 4)) for c in range(6)]
                       + [np.full((1, 4), 2.5)])
    y = rng.integers(0, 10, len(z))
    for budget in (1, 3, 6, 12, 30):
        clusters, centres, _ = hybridrepair.hybrid_clusters(
            z, budget, 3, 5, 10, 2, seed=1)
        assert len(set(centres.tolist())) == len(centres)
        oracle = hybridrepair.LabelOracle(y)
        idx, lab = hybridrepair.propagate_labels(
            clusters, centres, rng.random(len(z)), budget, oracle,
            np.random.default_rng(1))
        assert len(oracle.queried) == budget, budget
        assert len(idx) == len(lab) and len(set(idx.tolist())) == len(idx)


def test_two_centres_sharing_a_nearest_input_get_distinct_ones():
    """The case the original gets wrong: two k-means centres whose nearest
    pool input is the same would read one label for two clusters."""
    z = np.array([[0.0, 0.0], [5.0, 5.0], [0.0, 1.0], [9.0, 0.0]])
    centers = np.array([[0.0, 0.1], [0.0, 0.2]])
    assert hybridrepair.distinct_centres(centers, z).tolist() == [0, 2]
    oracle = hybridrepair.LabelOracle(np.arange(4))
    idx, lab = hybridrepair.propagate_labels(
        [np.array([0, 1]), np.array([2, 3])],
        hybridrepair.distinct_centres(centers, z), np.ones(4), 2, oracle,
        np.random.default_rng(0))
    assert len(oracle.queried) == 2
    assert dict(zip(idx.tolist(), lab.tolist())) == {0: 0, 1: 0, 2: 2, 3: 2}


def test_hybridrepair_fix_reads_exactly_its_budget():
    model, variables, ds, problem = fixtures.tiny_mlp_problem()
    spec = fixers.get("hybridrepair")
    cfg = fixers.fixer_config(spec, {"tta_views": 2, "finetune_epochs": 0,
                                     "epochs": 1, "tau_samples": 100,
                                     "density_k": 10, "budget_percent": 5.0})
    res = spec.fix(jax.random.key(0), problem, cfg)
    assert int(res.info["budget"]) == int(0.05 * len(problem.repair.y))
    assert int(res.info["n_true_labels"]) == int(res.info["budget"])
