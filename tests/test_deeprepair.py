"""DeepRepair: clustering and style pool, the WCT2 substitute (wavelet
auto-encoder + whitening-colouring), the JSD loss, and the fixer on the tiny
MLP with a tiny budget."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlfix_jax import data as data_lib
from dlfix_jax import fixers
from dlfix_jax.data.source import Source
from dlfix_jax.fixers import _wct
from dlfix_jax.fixers import deeprepair
from dlfix_jax.metrics import classification
from dlfix_jax.training import loop
from tests import fixtures

TINY = dict(style_steps=30, style_width=8, epochs=2, transfer_batch_size=256)


def test_registered_with_the_original_defaults():
    s = fixers.get("deeprepair")
    assert (s.level, s.abbrev, s.vmappable) == ("model", "DR", False)
    c = s.default_config()
    assert (c.sample_per_class, c.clusters, c.width, c.depth, c.severity,
            c.alpha, c.jsd_lambda, c.lr, c.momentum, c.weight_decay,
            c.batch_size, c.cosine_epochs, c.wct_alpha, c.wct_eps) == (
                100, 5, 3, -1, 3.0, 1.0, 12.0, 0.1, 0.9, 5e-4, 64, 100,
                1.0, 1.0)
    assert c.base_images == "stylised" and c.style_op
    assert isinstance(s.applicable(fixtures.info_of(
        fixtures.tiny_mlp(), streaming=True)), str)
    with pytest.raises(ValueError, match="base_images"):
        s.config({"base_images": "both"})


def test_clusters_per_class_and_one_style_per_cluster():
    rng = np.random.default_rng(0)
    # Class 0: two well separated blobs of 6; class 1: 3 images; class 2: 0.
    a = rng.normal(0.2, 0.01, (6, 4, 4, 1))
    b = rng.normal(0.8, 0.01, (6, 4, 4, 1))
    c = rng.uniform(0, 1, (3, 4, 4, 1))
    px = np.concatenate([a, b, c]).astype(np.float32)
    y = np.array([0] * 12 + [1] * 3)
    labels, per_class = deeprepair.cluster_failures(
        jax.random.key(0), px, y, 3, k=2, n_init=10)
    assert list(per_class) == [2, 2, 0]
    assert len(set(labels[:6])) == 1 and len(set(labels[6:12])) == 1
    assert labels[0] != labels[6] and set(labels[12:]) <= {2, 3}
    pool = deeprepair.style_pool(jax.random.key(1), labels)
    assert len(pool) == 4
    for j, i in enumerate(pool):
        assert labels[i] == j
    used = deeprepair.sample_failures(jax.random.key(2), y, 3, per_class=4)
    assert np.bincount(y[used], minlength=3).tolist() == [4, 3, 0]


def test_haar_is_orthonormal_and_inverted_exactly():
    x = jax.random.normal(jax.random.key(0), (2, 8, 6, 3))
    ll, skips = _wct.haar(x)
    np.testing.assert_allclose(_wct.unhaar(ll, skips), x, atol=1e-6)
    energy = sum(float(jnp.sum(s ** 2)) for s in (ll,) + skips)
    np.testing.assert_allclose(energy, float(jnp.sum(x ** 2)), rtol=1e-5)


def test_wct_gives_the_style_mean_and_covariance():
    kc, ks = jax.random.split(jax.random.key(3))
    content = 3.0 * jax.random.normal(kc, (40, 40, 4))
    mix = jnp.array([[0.5, 0.2, 0.0, 0.1], [0.0, 0.4, 0.1, 0.0],
                     [0.0, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 0.6]])
    style = 0.5 + jax.random.normal(ks, (30, 30, 4)) @ mix
    out = _wct.wct(content, _wct.style_stats(style, eps=1e-6), eps=1e-6)
    f, s = out.reshape(-1, 4), style.reshape(-1, 4)
    np.testing.assert_allclose(f.mean(0), s.mean(0), atol=1e-3)
    np.testing.assert_allclose(jnp.cov(f.T), jnp.cov(s.T), atol=2e-3)
    # alpha = 0 keeps the content.
    np.testing.assert_allclose(
        _wct.wct(content, _wct.style_stats(style), alpha=0.0), content,
        atol=1e-6)


@functools.lru_cache(maxsize=None)
def _trained_ae():
    ds = data_lib.load("digits", seed=0)
    ae, mse = _wct.train(jax.random.key(0), Source(ds.train), 1, (0.0,),
                         (1.0,), width=8, steps=100)
    return ds, ae, mse


def test_style_transfer_moves_content_features_toward_the_style():
    ds, ae, mse = _trained_ae()
    assert mse < 0.01
    content = jnp.asarray(ds.train.x[:16])
    style = jnp.asarray(ds.valid.x[:4])
    ix = jnp.arange(16) % 4
    out = _wct.transfer(ae, content, _wct.styles(ae, style), ix)
    assert out.shape == content.shape
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    for level in ("enc1", "enc2", "enc3"):
        m0, c0 = _wct.feature_moments(ae, content, level)
        m1, c1 = _wct.feature_moments(ae, out, level)
        ms, cs = _wct.feature_moments(ae, style, level)

        def dist(a, b):
            return np.asarray(jnp.linalg.norm(a - b[ix], axis=(1, 2)))

        def second(m, c):  # uncentred second moment: mean and covariance
            return c + m[:, :, None] * m[:, None, :]

        cov_before, cov_after = dist(c0, cs), dist(c1, cs)
        mom_before = dist(second(m0, c0), second(ms, cs))
        mom_after = dist(second(m1, c1), second(ms, cs))
        # Measured ratios 0.2-0.6 over AE seeds; the mean alone moves less
        # reliably (0.6-1.04 at enc1), so it is not asserted on its own.
        assert cov_after.mean() < 0.7 * cov_before.mean(), level
        assert mom_after.mean() < 0.7 * mom_before.mean(), level
        assert np.mean(cov_after < cov_before) >= 0.75, level
    # With alpha = 0 the transfer is the plain reconstruction.
    same = _wct.transfer(ae, content, _wct.styles(ae, style), ix, alpha=0.0)
    np.testing.assert_allclose(
        same, jnp.clip(_wct.forward(ae, content), 0, 1), atol=1e-5)


def test_jsd_loss_is_cross_entropy_plus_a_nonnegative_consistency_term():
    model, variables, ds, problem = fixtures.tiny_mlp_problem()
    px = jnp.asarray(ds.train.x[:32])
    y = jnp.asarray(ds.train.y[:32], jnp.int32)
    args = (model, (0.0,), (1.0,))
    rest = (1, 1, 3.0, 1.0, ("rotate",), True)   # small, quick to compile
    key = jax.random.key(0)
    l0, (_, m0) = deeprepair.jsd_loss(*args, 0.0, *rest)(
        variables, (px, y, px), key)
    l12, (_, m12) = deeprepair.jsd_loss(*args, 12.0, *rest)(
        variables, (px, y, px), key)
    ce = jnp.mean(loop.cross_entropy(model.logits(variables, px), y))
    np.testing.assert_allclose(l0, ce, rtol=1e-5)
    assert float(m12["jsd"]) > 0
    np.testing.assert_allclose(l12, ce + 12.0 * m12["jsd"], rtol=1e-5)


def test_fix_repairs_is_finite_and_deterministic():
    model, variables, ds, problem = fixtures.tiny_mlp_problem()
    cfg = fixers.get("deeprepair").config(TINY)
    a = deeprepair.fix(jax.random.key(1), problem, cfg)
    b = deeprepair.fix(jax.random.key(1), problem, cfg)
    for x, z in zip(jax.tree_util.tree_leaves(a.variables),
                    jax.tree_util.tree_leaves(b.variables)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(z))
        assert np.isfinite(np.asarray(x)).all()
    assert a.mask is None
    info = a.info
    assert info["n_styles"] == sum(info["clusters_per_class"]) > 0
    assert info["n_failures_used"] == len(problem.failing)
    assert info["epochs"] == len(info["valid_acc_trace"]) == 2
    assert info["best_valid_acc"] == max(info["valid_acc_trace"])
    p0 = model.predict(variables, problem.repair.x)
    p1 = model.predict(a.variables, problem.repair.x)
    assert float(classification.flips(p0, p1, problem.repair.y)["rr"]) > 0
