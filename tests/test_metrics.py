"""Hand-computed cases for ACC, ⇑ACC, RR, NFR, AAOD, ⇑AAOD/⇑ASR, timing,
the seed strategies and evaluate_models."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlfix_jax.data import Split
from dlfix_jax.metrics import classification, evaluate, fairness, timing
from dlfix_jax.models import zoo
from dlfix_jax.models.layers import spec
from dlfix_jax import seed_axis as seeds


# --------------------------------------------------------------- ACC/RR/NFR

def test_accuracy_and_relative_change():
    y = np.array([0, 1, 1, 1])
    assert classification.accuracy(np.array([0, 1, 2, 1]), y) == 75.0
    stacked = np.array([[0, 1, 2, 1], [0, 1, 1, 1], [2, 2, 2, 2]])
    np.testing.assert_array_equal(classification.accuracy(stacked, y),
                                  [75.0, 100.0, 0.0])
    # ⇑ACC = (new − orig)/orig·100: (100 − 75)/75 = 33.33..., (0−75)/75 = −100
    np.testing.assert_allclose(
        classification.relative_change([75.0, 100.0, 0.0], 75.0),
        [0.0, 100.0 / 3, -100.0])
    assert classification.relative_change(0.0, 0.0) == 0.0
    assert classification.relative_change(5.0, 0.0) == np.inf
    # exact ratios of counts in NumPy: 15/200 → 7.5, not 7.4999995
    assert classification.accuracy(np.r_[np.zeros(15), np.ones(185)],
                                   np.zeros(200)) == 7.5


def test_accuracy_jits():
    f = jax.jit(classification.accuracy)
    assert float(f(jnp.array([0, 1]), jnp.array([0, 0]))) == 50.0


def test_flips_hand_case():
    y = np.array([0, 1, 1, 1, 1])
    po = np.array([0, 1, 2, 0, 1])        # wrong at 2, 3
    pf = np.array([[0, 2, 1, 1, 1],       # repairs 2, 3; breaks 1
                   [0, 1, 2, 1, 0]])      # repairs 3; breaks 4
    r = classification.flips(po, pf, y)
    assert int(r["wrong_orig"]) == 2
    np.testing.assert_array_equal(r["repaired"], [2, 1])
    np.testing.assert_array_equal(r["broken"], [1, 1])
    np.testing.assert_allclose(r["rr"], [100.0, 50.0])
    # NFR denominator is ALL inputs (5), not the 3 originally correct ones.
    np.testing.assert_allclose(r["nfr"], [20.0, 20.0])
    # No original mistakes: RR is 0 by convention.
    r = classification.flips(y, y, y)
    assert float(r["rr"]) == 0.0 and float(r["nfr"]) == 0.0


def test_relative_gain_hand():
    # ⇑ASR: (80 − 20)/80 = 75 %; getting worse is negative.
    np.testing.assert_allclose(classification.relative_gain(80.0, [20.0, 100.0]),
                               [75.0, -25.0])
    # ⇑AAOD: (0.02 − 0.01)/0.02 = 50 %
    np.testing.assert_allclose(classification.relative_gain(0.02, 0.01), 50.0)


# --------------------------------------------------------------------- AAOD

def _binary_aif360(pred, y, group, unpriv=0):
    """AIF360's average_abs_odds_difference, written out independently:
    ½(|FPR_unpriv − FPR_priv| + |TPR_unpriv − TPR_priv|), class 1 positive."""
    def rates(g):
        m = group == g
        tp = np.sum((pred == 1) & (y == 1) & m)
        fp = np.sum((pred == 1) & (y == 0) & m)
        return tp / np.sum((y == 1) & m), fp / np.sum((y == 0) & m)
    tpr_u, fpr_u = rates(unpriv)
    tpr_p, fpr_p = rates(1 - unpriv)
    return 0.5 * (abs(fpr_u - fpr_p) + abs(tpr_u - tpr_p))


def test_aaod_binary_hand_case():
    # group 0: y = 1 1 0 0, pred = 1 0 1 0 -> TPR 1/2, FPR 1/2
    # group 1: y = 1 1 0 0, pred = 1 1 0 0 -> TPR 1,   FPR 0
    y = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    pred = np.array([1, 0, 1, 0, 1, 1, 0, 0])
    g = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    # class 1: |ΔTPR| = 1/2, |ΔFPR| = 1/2; class 0: TPR0 = 1/2 vs 1,
    # FPR0 = 1/2 vs 0 -> means 1/2 and 1/2 -> AAOD = 1/2.
    assert float(fairness.aaod(pred, y, g, 2)) == pytest.approx(0.5)
    assert _binary_aif360(pred, y, g) == pytest.approx(0.5)


def test_aaod_equals_aif360_binary_formula():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = 60
        y = rng.integers(0, 2, n)
        g = rng.integers(0, 2, n)
        pred = np.where(rng.random(n) < 0.7, y, 1 - y)
        # every denominator non-zero (otherwise the formulas' 0/0 differ)
        ok = all(np.sum((y == c) & (g == k)) > 0
                 for c, k in itertools.product((0, 1), (0, 1)))
        if not ok:
            continue
        assert float(fairness.aaod(pred, y, g, 2)) == pytest.approx(
            _binary_aif360(pred, y, g), abs=1e-6)


def test_aaod_multiclass_and_zero_denominator():
    # 3 classes. group 0: y = 0 1 2, pred = 0 1 1; group 1: y = 0 0, pred 0 2
    y = np.array([0, 1, 2, 0, 0])
    pred = np.array([0, 1, 1, 0, 2])
    g = np.array([0, 0, 0, 1, 1])
    # TPR g0: c0 1, c1 1, c2 0 ; g1: c0 1/2, c1 0 (no positives), c2 0 (none)
    # FPR g0: c0 0/2, c1 1/2 (y=2 predicted 1), c2 0/2
    # FPR g1: c0 0 (no negatives), c1 0/2, c2 1/2
    # mean|ΔTPR| = (1/2 + 1 + 0)/3 = 1/2 ; mean|ΔFPR| = (0 + 1/2 + 1/2)/3 = 1/3
    want = 0.5 * (0.5 + 1.0 / 3.0)
    assert float(fairness.aaod(pred, y, g, 3)) == pytest.approx(want)
    # Stacked (S, N) predictions give one value per seed. Perfect
    # predictions still differ: group 1 has no positives of classes 1, 2, so
    # its TPR there is 0 by convention while group 0's is 1:
    # mean|ΔTPR| = 2/3, mean|ΔFPR| = 0 -> AAOD = 1/3.
    st = np.stack([pred, y])
    np.testing.assert_allclose(fairness.aaod(st, y, g, 3),
                               [want, 1.0 / 3.0], atol=1e-7)


def test_aaod_errors():
    with pytest.raises(ValueError, match="group"):
        fairness.aaod(np.zeros(3), np.zeros(3), None, 2)
    with pytest.raises(ValueError, match="0/1"):
        fairness.aaod(np.zeros(3), np.zeros(3), np.array([0, 1, 2]), 2)


# ------------------------------------------------------------------- timing

def test_timer_splits_compile_and_execute():
    @jax.jit
    def f(x):
        return jnp.sin(x) @ jnp.cos(x).T

    x = jnp.ones((64, 64)) * 0.123   # a new shape for this process
    out, c1, e1 = timing.timed(f, x)
    assert c1 > 0 and e1 >= 0
    with timing.Timer() as t:
        jax.block_until_ready(f(x))
    assert t.n_compiles == 0 and t.compile_s == 0.0
    assert t.total_s == pytest.approx(t.execute_s)
    np.testing.assert_allclose(out, f(x))


# ------------------------------------------------------------------- seeds

def _tiny_conv(num_classes=3):
    layers = [spec("conv", "c1", features=4, kernel=(3, 3)),
              spec("relu", "r1"), spec("maxpool", "p1", window=(2, 2)),
              spec("flatten", "f"), spec("dense", "d1", features=num_classes)]
    return zoo.sequential("tinyconv", layers, (8, 8, 1), num_classes)


def test_stack_unstack_roundtrip_and_errors():
    m = _tiny_conv()
    vs = [m.init(jax.random.key(i)) for i in range(3)]
    st = seeds.stack_variables(vs)
    assert seeds.num_seeds(st) == 3
    back = seeds.unstack_variables(st)
    for a, b in zip(vs, back):
        jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    other = _tiny_conv(num_classes=4).init(jax.random.key(0))
    with pytest.raises(ValueError, match="shapes"):
        seeds.stack_variables([vs[0], other])
    with pytest.raises(ValueError, match="unknown seed strategy"):
        seeds.resolve_strategy("threads")


def test_strategies_agree():
    m = _tiny_conv()
    st = seeds.stack_variables([m.init(jax.random.key(i)) for i in range(3)])
    x = np.asarray(jax.random.normal(jax.random.key(9), (37, 8, 8, 1)))
    out = {s: seeds.predict_logits_stack(m, st, x, batch_size=16, strategy=s)
           for s in ("sequential", "vmap", "lax_map", "auto")}
    for s, o in out.items():
        assert o.shape == (3, 37, 3)
        np.testing.assert_allclose(o, out["sequential"], rtol=1e-5, atol=1e-5)
    # per-model reference
    for i, v in enumerate(seeds.unstack_variables(st)):
        np.testing.assert_allclose(out["sequential"][i], m.apply(v, x),
                                   rtol=1e-5, atol=1e-5)
    labels = seeds.predict_stack(m, st, x, batch_size=16, strategy="vmap")
    np.testing.assert_array_equal(labels, out["sequential"].argmax(-1))


def test_auto_strategy_per_backend():
    assert seeds.resolve_strategy("auto", "cpu", "predict") == "lax_map"
    assert seeds.resolve_strategy("auto", "cpu", "pgd") == "sequential"
    assert seeds.resolve_strategy("auto", "cpu", "other") == "sequential"
    assert seeds.resolve_strategy("auto", "gpu", "pgd") == "vmap"
    assert seeds.resolve_strategy("auto", "tpu") == "vmap"
    assert seeds.resolve_strategy("lax_map", "cpu") == "lax_map"


def test_group_models_mixed_architectures():
    a, b = _tiny_conv(3), _tiny_conv(3)       # distinct objects, same arch
    c = zoo.sequential("mlp", [spec("flatten", "f"),
                               spec("dense", "d", features=3)], (8, 8, 1), 3)
    va, vb, vc = (a.init(jax.random.key(0)), b.init(jax.random.key(1)),
                  c.init(jax.random.key(2)))
    groups = seeds.group_models([(a, va), (b, vb), (c, vc)])
    assert [g[2] for g in groups] == [[0, 1], [2]]
    assert seeds.group_models(groups) is groups


# ------------------------------------------------------- evaluate_models

def test_evaluate_models_matches_direct_computation():
    m = _tiny_conv(2)
    vo = m.init(jax.random.key(0))
    fixed = [m.init(jax.random.key(i)) for i in (1, 2)]
    x = np.asarray(jax.random.normal(jax.random.key(5), (50, 8, 8, 1)))
    y = np.asarray(jax.random.bernoulli(jax.random.key(6), 0.5, (50,)),
                   np.int32)
    g = np.arange(50) % 2
    split = Split(x, y, g)
    r = evaluate.evaluate_models(jax.random.key(0), m, vo,
                                 [(m, v) for v in fixed], split, aaod=True,
                                 strategy="vmap")
    po = np.asarray(m.predict(vo, x))
    pf = np.stack([np.asarray(m.predict(v, x)) for v in fixed])
    assert r["acc_orig"] == pytest.approx(100 * np.mean(po == y))
    np.testing.assert_allclose(r["acc"], 100 * np.mean(pf == y, axis=1))
    repaired = np.sum((po != y) & (pf == y), axis=1)
    broken = np.sum((po == y) & (pf != y), axis=1)
    assert r["repaired"] == repaired.tolist()
    assert r["broken"] == broken.tolist()
    np.testing.assert_allclose(r["nfr"], 100 * broken / 50)
    np.testing.assert_allclose(r["rr"], 100 * repaired / np.sum(po != y))
    np.testing.assert_allclose(
        r["aaod"], [_binary_aif360(p, y, g) for p in pf], atol=1e-6)
    assert r["aaod_orig"] == pytest.approx(_binary_aif360(po, y, g), abs=1e-6)
    np.testing.assert_allclose(
        r["d_aaod"], (r["aaod_orig"] - np.array(r["aaod"])) / r["aaod_orig"]
        * 100, rtol=1e-5)
    # the same models given as a stack give the same numbers
    r2 = evaluate.evaluate_models(jax.random.key(0), m, vo,
                                  seeds.stack_variables(fixed), split,
                                  aaod=True, strategy="sequential")
    assert r2["acc"] == r["acc"] and r2["repaired"] == r["repaired"]
    # AAOD on a split without groups is a clear error
    with pytest.raises(ValueError, match="groups"):
        evaluate.evaluate_models(jax.random.key(0), m, vo, [(m, fixed[0])],
                                 Split(x, y), aaod=True)
    with pytest.raises(ValueError, match="eps"):
        evaluate.evaluate_models(jax.random.key(0), m, vo, [(m, fixed[0])],
                                 Split(x, y), asr=True)


class _Stream:
    """A streamed split: Split batches of ``bs`` rows, counting passes."""

    def __init__(self, split, bs):
        self.split, self.bs, self.passes = split, bs, 0

    def __len__(self):
        return len(self.split)

    def __iter__(self):
        self.passes += 1
        for i in range(0, len(self.split), self.bs):
            yield self.split.take(slice(i, i + self.bs))


def test_streamed_test_split_gives_the_in_memory_numbers():
    """A streamed test split (ImageNet's kind) is evaluated batch by batch:
    the same numbers as in memory, ASR included, in two passes (predict,
    then gather only the attacked inputs)."""
    import types
    from tests import fixtures
    m, v, ds, _ = fixtures.tiny_mlp_problem()
    fixed = [jax.tree_util.tree_map(
        lambda a, i=i: a + 0.05 * jax.random.normal(
            jax.random.key(i), a.shape), v) for i in (1, 2)]
    kw = dict(asr=True, n_samples=40, batch_size=64, pgd_batch_size=40,
              strategy="vmap")
    ref = evaluate.evaluate_models(jax.random.key(3), m, v,
                                   [(m, f) for f in fixed], ds, **kw)
    stream = _Stream(ds.test, 37)
    streamed = types.SimpleNamespace(test=stream, name=ds.name,
                                     num_classes=ds.num_classes)
    got = evaluate.evaluate_models(jax.random.key(3), m, v,
                                   [(m, f) for f in fixed], streamed, **kw)
    assert ref["asr_samples"] > 0
    assert got == ref
    assert stream.passes == 2
    from dlfix_jax.study import runner
    bad = jax.tree_util.tree_map(lambda a: a * np.nan, v)
    assert runner.check_corrupted(m, fixed + [bad], streamed, 5.0, 64) == \
        runner.check_corrupted(m, fixed + [bad], ds, 5.0, 64)
    xs = evaluate.StreamedInputs(_Stream(ds.test, 37), len(ds.test))
    idx = np.array([150, 3, 37, 36, 199, 3])
    np.testing.assert_array_equal(xs[idx], ds.test.x[idx])
    with pytest.raises(IndexError, match="index array"):
        xs[np.array([200])]
    assert xs[np.array([], int)].shape == (0, 28, 28, 1)
    with pytest.raises(TypeError, match="cannot be read whole"):
        np.asarray(xs)
