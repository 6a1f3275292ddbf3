"""Apricot on a tiny conv net and digits, with tiny budgets (K=4 rDLMs of a
few epochs; the paper's K=20 x 60 epochs would take far too long here)."""

import jax
import numpy as np

from dlfix_jax import fixers
from dlfix_jax.fixers import apricot
from dlfix_jax.metrics.classification import flips
from dlfix_jax import predict
from tests.test_ra import tiny_problem


def _cfg(**kw):
    c = apricot.default_config()
    c.update(num_rdlms=4, rdlm_per_class=60, rdlm_epochs=6, rdlm_lr=3e-3,
             rdlm_batch_size=64, batch_size=10, eta=0.05, retrain_epochs=0.1,
             retrain_lr=1e-3, max_passes=3)
    c.update(kw)
    return c


def test_registered():
    s = fixers.get("apricot")
    assert (s.level, s.abbrev, s.vmappable) == ("model", "AP", False)
    c = s.default_config()
    assert (c.num_rdlms, c.rdlm_per_class, c.rdlm_epochs, c.rdlm_batch_size,
            c.batch_size, c.eta, c.strategy, c.patience) == (
                20, 1000, 60, 128, 20, 1e-3, "both", 100)


def test_update_sign_follows_the_paper():
    w, wc, wi = np.float32(0.0), np.float32(1.0), np.float32(-1.0)
    both = apricot._adapt_update(w, wc, wi, 0.5, 0.5, 0.1, "both")
    corr = apricot._adapt_update(w, wc, wi, 0.5, 0.5, 0.1, "correct_only")
    inc = apricot._adapt_update(w, wc, wi, 0.5, 0.5, 0.1, "incorrect_only")
    # Toward W_C (= +1) and away from W_I (= -1): all move up.
    np.testing.assert_allclose([both, corr, inc], [0.1, 0.05, 0.05], rtol=1e-6)


def test_rdlms_are_trained_together_with_a_leading_k_axis():
    ds, model, v, prob = tiny_problem()
    cfg = _cfg()
    rdlms, subsets = apricot.train_rdlms(jax.random.key(0), model, prob.train,
                                         10, cfg)
    assert subsets.shape == (4, 600)
    sub = np.asarray(subsets)
    assert len(set(map(tuple, np.sort(sub, 1)))) == 4  # distinct subsets
    for row in sub:  # 60 distinct images of every class
        assert len(set(row)) == 600
        np.testing.assert_array_equal(np.bincount(np.asarray(ds.train.y)[row]),
                                      np.full(10, 60))
    for a, b in zip(jax.tree_util.tree_leaves(rdlms),
                    jax.tree_util.tree_leaves(v)):
        assert a.shape == (4,) + b.shape
    valid = prob.valid.device()
    acc = jax.vmap(lambda r: predict.device_accuracy(model, r, valid.x,
                                                     valid.y))(rdlms)
    assert np.all(np.asarray(acc) > 0.3)  # trained, not chance (0.1)


def test_fix_repairs_is_finite_and_deterministic():
    ds, model, v, prob = tiny_problem()
    a = apricot.fix(jax.random.key(5), prob, _cfg())
    b = apricot.fix(jax.random.key(5), prob, _cfg())
    for x, y in zip(jax.tree_util.tree_leaves(a.variables),
                    jax.tree_util.tree_leaves(b.variables)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert np.isfinite(np.asarray(x)).all()
    info = a.info
    assert info["batches"] > 0 and info["adjusted"] > 0
    assert info["accepted"] >= 1
    assert info["best_valid_acc"] > info["orig_valid_acc"]
    assert len(info["valid_acc_trace"]) == info["batches"]
    po = model.predict(v, prob.repair.x)
    pf = model.predict(a.variables, prob.repair.x)
    assert float(flips(po, pf, prob.repair.y)["rr"]) > 0
