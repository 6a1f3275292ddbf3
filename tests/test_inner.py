"""INNER (dlfix_jax.fixers.inner) on the tiny models and small hand cases."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dlfix_jax.fixers as fixers
from dlfix_jax.fixers import inner
from dlfix_jax.models import base as models_base
from dlfix_jax.models import zoo
from dlfix_jax.training import loop
from tests import fixtures

SPEC = fixers.get("inner")
# Small budget: the algorithm unchanged, fewer probe / repair epochs.
SMALL = {"probe_epochs": 5, "epochs": 3, "routing_samples": 20}


def test_registered_defaults_and_config_checks():
    assert SPEC.level == "neuron" and SPEC.abbrev == "IN"
    cfg = SPEC.default_config()
    assert (cfg.probe_num, cfg.probe_epochs, cfg.probe_lr) == (1000, 50, 0.01)
    assert (cfg.num_select, cfg.rep_layer_num) == (30, 3)
    assert (cfg.routing_samples, cfg.routing_steps, cfg.routing_lr,
            cfg.routing_alpha) == (100, 40, 0.009, 0.005)
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.ce_weight,
            cfg.temperature) == (20, 7e-4, 64, 0.8, 3.0)
    assert (cfg.aug_epochs, cfg.clean_drop, cfg.asr_threshold) == (2, 0.1,
                                                                    0.15)
    assert cfg.top_k == 0 and cfg.bias_unmasked
    with pytest.raises(ValueError, match="lr"):
        SPEC.config({"lr": 0.0})
    with pytest.raises(ValueError, match="ce_weight"):
        SPEC.config({"ce_weight": 1.5})


def test_probe_sites_follow_the_original_blocks():
    sites = inner.probe_sites(zoo.get("lenet5"))
    assert [(s.layer, s.cut, s.feature_shape) for s in sites] == [
        ("conv1", "pool1", (8, 8, 6)), ("conv2", "flatten", (144,)),
        ("dense1", "relu3", (120,)), ("dense2", "relu4", (84,))]
    assert [s.kernel_index for s in sites] == [0, 1, 2, 3]
    # VGG16: one probe per stage (its last conv) and per hidden Dense; the
    # probe after the hidden Dense skips the dropout layer.
    vgg = inner.probe_sites(zoo.get("vgg16"))
    assert [s.layer for s in vgg] == ["conv2", "conv4", "conv7", "conv10",
                                      "conv13", "dense1"]
    assert vgg[-1].cut == "relu_dense1"
    assert isinstance(inner.make_probe((8, 8, 6), 10), inner.ConvProbe)
    assert inner.make_probe((8, 8, 6), 10).depth == 2
    assert inner.make_probe((4, 4, 6), 10).depth == 1
    assert isinstance(inner.make_probe((64,), 10), inner.LinearProbe)
    assert SPEC.applicable(fixtures.info_of(zoo.get("resnet18")))
    assert SPEC.applicable(fixtures.info_of(zoo.get("lenet5"), n_train=100,
                                            n_valid=10, n_repair=5,
                                            n_failing=5))
    assert SPEC.applicable(fixtures.info_of(zoo.get("lenet5"), n_train=100))
    assert SPEC.applicable(fixtures.info_of(zoo.get("lenet5"), n_train=100,
                                            n_valid=10)) is None


def test_anomaly_scores_by_hand():
    c = [jnp.log(jnp.array([[0.5, 0.5], [0.9, 0.1]]))]
    b = [jnp.log(jnp.array([[0.2, 0.8], [0.2, 0.8]]))]
    cm, bm = np.array([0.7, 0.3]), np.array([0.2, 0.8])
    want = -np.sum(bm * np.log(cm + 1e-7))
    np.testing.assert_allclose(inner.anomaly_scores(c, b), [want], rtol=1e-5)


def test_pair_batches_cut_each_pair_to_the_smaller():
    ib, ic, w = inner._pair_batches(70, 100, 64)
    assert ib.shape == (2, 64) and w[0].sum() == 64 and w[1].sum() == 6
    np.testing.assert_array_equal(ib[1, :6], np.arange(64, 70))
    ib, ic, w = inner._pair_batches(100, 70, 64)
    assert w[1].sum() == 6
    ib, ic, w = inner._pair_batches(10, 500, 64)
    assert ib.shape == (1, 64) and w.sum() == 10


@functools.lru_cache(maxsize=None)
def _tiny_probe():
    model, variables, _, problem = fixtures.tiny_conv_problem()
    site = inner.probe_sites(model)[1]          # dense1 (kernel 144 x 32)
    probe = inner.make_probe(site.feature_shape, 10)
    feats = inner._features(model, site.cut, variables, problem.passing.x)
    (pv,), (acc,) = inner.train_probes(jax.random.key(0), [probe], [feats],
                                       problem.passing.y, epochs=10, lr=0.01,
                                       batch_size=64)
    assert acc > 0.5
    return model, variables, problem, site, probe, pv


def test_routing_differentiates_the_masked_weight():
    model, variables, problem, site, probe, pv = _tiny_probe()
    x = problem.failing.x[0]
    lr, alpha = 0.5, 0.005   # large lr: the two gradients differ visibly
    head, _ = models_base.split_at(model, site.cut)
    vh = models_base.split_variables(variables,
                                     inner._head_names(model, site.cut))
    lp = vh["params"][site.layer]
    w = lp["kernel"]

    def logits(kernel):
        p = dict(vh["params"], **{site.layer: dict(lp, kernel=kernel)})
        return inner._probe_apply(probe, pv, head.apply(dict(vh, params=p),
                                                        x[None]))

    label = jnp.argmax(logits(w), -1)

    def loss_w(wm):
        return loop.cross_entropy(logits(wm), label)[0]

    r_w = r_r = jnp.ones_like(w)
    for _ in range(3):
        g = jax.grad(loss_w)(w * r_w)                       # the original
        r_w = jnp.clip(r_w - lr * g - alpha * jnp.sign(r_w), 0, 1)
        g_r = jax.grad(lambda r: loss_w(w * r))(r_r)        # d/dR = g * W
        r_r = jnp.clip(r_r - lr * g_r - alpha * jnp.sign(r_r), 0, 1)
    got = inner.route(model, site, probe, 3, variables, pv, x,
                      jnp.float32(lr), jnp.float32(alpha))
    np.testing.assert_allclose(np.asarray(got), np.asarray(r_w), atol=1e-5)
    assert float(jnp.max(jnp.abs(r_w - r_r))) > 1e-3
    assert got.shape == w.shape


def test_routing_mask_counts_entries_above_each_samples_mean():
    model, variables, problem, site, probe, pv = _tiny_probe()
    xs = problem.failing.x[:5]
    kw = dict(steps=4, lr=0.009, alpha=0.005, top_k=0)
    m1 = inner.routing_mask(model, site, probe, variables, pv, xs, chunk=2,
                            **kw)
    m5 = inner.routing_mask(model, site, probe, variables, pv, xs, chunk=5,
                            **kw)
    want = np.zeros(m1.shape, bool)
    for x in xs:
        r = np.asarray(inner.route(model, site, probe, 4, variables, pv, x,
                                   jnp.float32(0.009), jnp.float32(0.005)))
        want |= r > r.mean()
    np.testing.assert_array_equal(m1, want)
    np.testing.assert_array_equal(m5, want)
    top = inner.routing_mask(model, site, probe, variables, pv, xs, chunk=5,
                             steps=4, lr=0.009, alpha=0.005, top_k=7)
    assert top.sum() == 7 and not np.any(top & ~want)


def _params_equal(a, b) -> bool:
    return np.array_equal(np.asarray(a).view(np.uint32),
                          np.asarray(b).view(np.uint32))


def test_mask_shapes_exact_outside_deterministic_and_repairs():
    model, variables, _, problem = fixtures.tiny_conv_problem()
    cfg = SPEC.config(SMALL)
    res = fixtures.assert_deterministic_and_repairs(SPEC.fix, problem, cfg,
                                                    key=2)
    p0, p1 = variables["params"], res.variables["params"]
    assert fixtures.changed_outside(res.mask, p0, p1) == 0
    sites = inner.probe_sites(model)
    sel = [sites[i].layer for i in np.asarray(res.info["selected"])]
    assert sorted(sel) == ["conv1", "dense1"]       # rep_layer_num 3 > 2
    for name in p0:
        m = res.mask[name]
        for leaf in p0[name]:
            assert m[leaf].shape == p0[name][leaf].shape
            assert m[leaf].dtype == bool
        if name not in sel:
            assert not any(np.any(v) for v in m.values())
        else:
            assert np.all(m["bias"])          # biases update unmasked
            assert np.any(m["kernel"])
    sizes = [int(np.asarray(res.mask[n]["kernel"]).sum()) for n in sel]
    assert sizes == list(np.asarray(res.info["mask_sizes"]))
    assert int(res.info["mask_size"]) == fixers.base.mask_count(res.mask)
    assert int(res.info["epochs"]) >= 1
    # Masked biases: nothing but masked kernel entries moves.
    res_b = SPEC.fix(jax.random.key(2), problem,
                     SPEC.config(dict(SMALL, bias_unmasked=False)))
    q1 = res_b.variables["params"]
    assert fixtures.changed_outside(res_b.mask, p0, q1) == 0
    for name in p0:
        assert _params_equal(p0[name]["bias"], q1[name]["bias"])
        assert not np.any(res_b.mask[name]["bias"])
    moved = sum(int(np.sum(np.asarray(p0[n]["kernel"]).view(np.uint32)
                           != np.asarray(q1[n]["kernel"]).view(np.uint32)))
                for n in sel)
    assert moved > 0


def test_another_key_gives_another_repair_and_nothing_to_repair():
    _, variables, _, problem = fixtures.tiny_conv_problem()
    cfg = SPEC.config(SMALL)
    a = SPEC.fix(jax.random.key(2), problem, cfg)
    b = SPEC.fix(jax.random.key(3), problem, cfg)
    assert not all(_params_equal(x, y) for x, y in zip(
        jax.tree_util.tree_leaves(a.variables),
        jax.tree_util.tree_leaves(b.variables)))
    empty = problem.replace(failing=problem.failing.take(np.arange(0)))
    res = SPEC.fix(jax.random.key(0), empty, cfg)
    assert int(res.info["stop_reason"]) == inner.NOTHING
    assert fixers.base.mask_count(res.mask) == 0
    with pytest.raises(ValueError, match="correctly classified"):
        SPEC.fix(jax.random.key(0), problem.replace(
            passing=problem.passing.take(np.arange(0))), cfg)
