"""PGD / ASR: hand-computed pieces, agreement with foolbox 3.3.4's JAX
backend (random start off), determinism per key, seed strategies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlfix_jax.metrics import pgd
from dlfix_jax.models import zoo
from dlfix_jax.models.layers import spec
from dlfix_jax import seed_axis as seeds


def _mlp():
    return zoo.sequential("mlp", [spec("flatten", "f"),
                                  spec("dense", "d1", features=32),
                                  spec("relu", "r"),
                                  spec("dense", "d2", features=5)],
                          (6, 6, 1), 5)


def _conv():
    return zoo.sequential("conv", [spec("conv", "c1", features=4,
                                        kernel=(3, 3)),
                                   spec("relu", "r1"),
                                   spec("maxpool", "p1", window=(2, 2)),
                                   spec("flatten", "f"),
                                   spec("dense", "d1", features=4)],
                          (6, 6, 1), 4)


def _linear_1d():
    """logits = [x, −x]: class 0 iff x > 0 (hand-computable PGD)."""
    m = zoo.sequential("lin", [spec("flatten", "f"),
                               spec("dense", "d", features=2)], (1, 1, 1), 2)
    v = {"params": {"d": {"kernel": jnp.array([[1.0, -1.0]]),
                          "bias": jnp.zeros(2)}}}
    return m, v


def test_foolbox_crossentropy_hand():
    z = jnp.array([[0.0, jnp.log(3.0)]])
    # softmax = (1/4, 3/4): CE(label 0) = log 4, CE(label 1) = log 4/3
    np.testing.assert_allclose(pgd.foolbox_crossentropy(z, jnp.array([0])),
                               [np.log(4.0)], rtol=1e-6)
    np.testing.assert_allclose(pgd.foolbox_crossentropy(z, jnp.array([1])),
                               [np.log(4.0 / 3.0)], rtol=1e-6)


def test_pgd_linear_hand_case():
    m, v = _linear_1d()
    eps = 0.3
    # Label 0, the loss grows as x falls: every step moves x down by ε/30;
    # 40 steps exceed ε, so the final iterate is max(x0 − ε, lo).
    x0 = np.array([0.1, 0.29, 0.31, 0.5, 0.2], np.float32).reshape(-1, 1, 1, 1)
    y = np.zeros(5, np.int32)
    succ, xa = pgd.linf_pgd(m, v, x0, y, eps=eps, bounds=(-1.0, 1.0))
    np.testing.assert_allclose(xa.ravel(), x0.ravel() - eps, atol=1e-6)
    np.testing.assert_array_equal(succ, [True, True, False, False, True])
    # Bounds clip: with lo = 0 no input can cross 0 (x = 0 gives a tie,
    # argmax picks class 0, which is not a success).
    succ, xa = pgd.linf_pgd(m, v, x0, y, eps=eps, bounds=(0.0, 1.0))
    np.testing.assert_allclose(xa.ravel(), np.maximum(x0.ravel() - eps, 0),
                               atol=1e-6)
    assert not succ.any()
    # Fewer steps: 10 steps of ε/30 move only ε/3 = 0.1.
    succ, xa = pgd.linf_pgd(m, v, x0, y, eps=eps, bounds=(-1.0, 1.0),
                            steps=10)
    np.testing.assert_allclose(xa.ravel(), x0.ravel() - 0.1, atol=1e-6)


def test_random_start_in_ball_and_bounds():
    x0 = np.linspace(0, 1, 50, dtype=np.float32).reshape(50, 1, 1, 1)
    s = np.asarray(pgd.random_start_points(jax.random.key(0), x0, 0.2,
                                           (0.0, 1.0)))
    assert np.all(np.abs(s - x0) <= 0.2 + 1e-7)
    assert s.min() >= 0.0 and s.max() <= 1.0
    s2 = pgd.random_start_points(jax.random.key(0), x0, 0.2, (0.0, 1.0))
    np.testing.assert_array_equal(s, s2)


@pytest.mark.parametrize("make,softmax", [(_mlp, False), (_conv, True)])
def test_agrees_with_foolbox_jax_backend(make, softmax):
    fb = pytest.importorskip("foolbox")
    m = make()
    v = m.init(jax.random.key(0))
    x = np.asarray(jax.random.uniform(jax.random.key(1), (64, 6, 6, 1)))
    y = np.asarray(m.predict(v, x))        # all correctly classified
    bounds = (float(x.min()), float(x.max()))
    eps = 0.08

    def f(a):
        z = m.apply(v, a)
        return jax.nn.softmax(z) if softmax else z

    attack = fb.attacks.LinfPGD(random_start=False, steps=40,
                                rel_stepsize=0.01 / 0.3)
    _, x_fb, succ_fb = attack(fb.JAXModel(f, bounds=bounds), jnp.asarray(x),
                              jnp.asarray(y), epsilons=eps)
    succ, xa = pgd.linf_pgd(m, v, x, y, eps=eps, bounds=bounds,
                            softmax=softmax)
    succ_fb = np.asarray(succ_fb)
    assert 0 < succ_fb.sum() < len(y), "test needs a mix of outcomes"
    np.testing.assert_array_equal(succ, succ_fb)
    np.testing.assert_allclose(xa, np.asarray(x_fb), atol=1e-5)


def test_select_samples():
    correct = np.array([True, False, True, True, False, True])
    a = pgd.select_samples(jax.random.key(3), correct, 3)
    assert len(a) == 3 and np.all(correct[a]) and len(set(a)) == 3
    np.testing.assert_array_equal(
        a, pgd.select_samples(jax.random.key(3), correct, 3))
    b = pgd.select_samples(jax.random.key(3), correct, 500)
    np.testing.assert_array_equal(b, [0, 2, 3, 5])      # fewer exist: all


def test_asr_end_to_end_deterministic_and_strategies():
    m = _mlp()
    vo = m.init(jax.random.key(0))
    fixed = [jax.tree_util.tree_map(
        lambda a, k=k: a + 0.05 * jax.random.normal(
            jax.random.key(k), a.shape), vo) for k in (11, 12, 13)]
    x = np.asarray(jax.random.uniform(jax.random.key(1), (120, 6, 6, 1)))
    y = np.asarray(m.predict(vo, x))
    st = seeds.stack_variables(fixed)
    kw = dict(eps=0.05, n_samples=40)
    r = pgd.asr(jax.random.key(7), m, vo, (m, st), x, y,
                strategy="sequential", **kw)
    assert r["n_samples"] == 40 and len(r["indices"]) == 40
    # samples: correct for the original and every fixed model
    for v in [vo] + fixed:
        assert np.all(np.asarray(m.predict(v, x[r["indices"]]))
                      == y[r["indices"]])
    assert r["asr_fixed"].shape == (3,)
    np.testing.assert_allclose(
        r["d_asr"], (r["asr_orig"] - r["asr_fixed"]) / r["asr_orig"] * 100)
    # ASR values are multiples of 100/40 (a mean of success flags)
    np.testing.assert_allclose((r["asr_fixed"] * 40 / 100) % 1, 0, atol=1e-9)
    # same key, same result, under another strategy and given as a list
    # (lax_map's equivalence is tested on predictions in test_metrics)
    r2 = pgd.asr(jax.random.key(7), m, vo, [(m, v) for v in fixed], x, y,
                 strategy="vmap", **kw)
    np.testing.assert_array_equal(r2["indices"], r["indices"])
    np.testing.assert_allclose(r2["asr_fixed"], r["asr_fixed"])
    assert r2["asr_orig"] == r["asr_orig"]
    # the original model attacked as a "fixed" one gives ASR_o and ⇑ASR 0
    r4 = pgd.asr(jax.random.key(7), m, vo, [(m, vo)], x, y, **kw)
    assert r4["asr_fixed"][0] == r4["asr_orig"] and r4["d_asr"][0] == 0


def test_epsilons():
    assert pgd.EPSILONS["mnist"] == 0.15 and pgd.EPSILONS["cifar10"] == 0.031
    assert pgd.EPSILONS["utkface"] == 0.07 and pgd.EPSILONS["cifar10s"] == 0.035
    assert pgd.epsilon_for("imagenet2012") == 0.007
    with pytest.raises(KeyError, match="known"):
        pgd.epsilon_for("svhn")


def test_cpu_layer_paths_keep_pgd_decisions(monkeypatch):
    """The XLA:CPU layer paths (one-channel conv, tiled max pool) leave the
    attack unchanged: same decisions and adversarial inputs (within the
    float32 round-off of a sign step) as plain flax layers, on a LeNet5
    (one-channel 28x28 input) at an ε where some attacks fail."""
    from dlfix_jax import models
    from dlfix_jax.models import layers
    m = models.get("lenet5")
    v = m.init(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (48, 28, 28, 1))
    y = jnp.asarray(m.predict(v, x), jnp.int32)
    args = (v, x, y, x, jnp.float32(0.01), jnp.float32(0.0), jnp.float32(1.0))

    def attack():  # a fresh (uncached) compilation per layer setting
        fn = pgd._attack_fn.__wrapped__(m, 10, pgd.REL_STEPSIZE, False)
        return jax.jit(fn)(*args)

    fast = attack()
    assert "one_channel_conv" in str(jax.make_jaxpr(
        lambda a: m.apply(v, a))(x))
    monkeypatch.setattr(layers, "on_cpu", lambda: False)
    ref = attack()
    assert 0 < float(jnp.mean(ref[0])) < 1
    np.testing.assert_array_equal(np.asarray(fast[0]), np.asarray(ref[0]))
    # A sign flip of a near-zero gradient entry moves a pixel by at most
    # 2 step sizes; allow a handful of such pixels.
    diff = np.abs(np.asarray(fast[1]) - np.asarray(ref[1]))
    assert np.mean(diff > 1e-6) < 1e-3
