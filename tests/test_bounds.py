"""Interval and CROWN bound propagation (fixers/_bounds.py): soundness by
sampling, tightness against IBP, exactness where the network is affine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlfix_jax.fixers import _bounds
from dlfix_jax.models import zoo
from dlfix_jax.models.layers import spec

N_SAMPLES = 2000

# One compilation per (layers, shapes): eager tracing of the flax layers op
# by op is what would make these tests slow.
CROWN = jax.jit(_bounds.crown, static_argnums=(0,),
                static_argnames=("lower_slope",))
IBP = jax.jit(_bounds.interval_bounds, static_argnums=(0,))


@jax.jit
def _eval_lin(a, bias, pts):
    return jax.vmap(lambda p: _bounds.evaluate(a, bias, p))(pts)


def _outputs(model, v, pts):
    return jax.jit(jax.vmap(lambda p: model.apply(v, p)))(pts)


def _mlp(widths, bn=False, d_in=5, classes=3):
    layers = []
    for i, w in enumerate(widths):
        layers.append(spec("dense", f"d{i}", features=w))
        if bn:
            layers.append(spec("bn", f"bn{i}"))
        layers.append(spec("relu", f"r{i}"))
    layers.append(spec("dense", "out", features=classes))
    return zoo.sequential("mlp", layers, (d_in,), classes)


def _random_vars(model, key):
    """Variables with random BatchNorm statistics (not the init's 0/1), so
    the BN fold is exercised."""
    v = model.init(key)
    if "batch_stats" in v:
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, 7), 3)
        v = dict(v)
        v["batch_stats"] = dict(v["batch_stats"])
        for name, st in v["batch_stats"].items():
            n = st["mean"].shape
            v["batch_stats"][name] = {
                "mean": jax.random.normal(k1, n) * 0.3,
                "var": jax.random.uniform(k2, n, minval=0.2, maxval=2.0)}
            p = dict(v["params"][name])
            p["scale"] = jax.random.normal(k3, n)
            v["params"] = dict(v["params"], **{name: p})
    return v


def _boxes(key, b, shape, width):
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, (b,) + shape)
    r = jax.random.uniform(k2, (b,) + shape) * width
    return x - r, x + r


def _samples(key, lo, hi, n=N_SAMPLES):
    u = jax.random.uniform(key, (n,) + lo.shape)
    # include the corners' extremes: a tenth of the samples on vertices
    corner = (u[: n // 10] > 0.5).astype(lo.dtype)
    u = jnp.concatenate([corner, u[n // 10:]])
    return lo + u * (hi - lo)


CASES = [
    ("1 hidden", dict(widths=(8,))),
    ("2 hidden", dict(widths=(7, 6))),
    ("3 hidden + bn", dict(widths=(6, 6, 5), bn=True)),
]


@pytest.mark.parametrize("name,kw,slope", [
    (name, kw, "adaptive") for name, kw in CASES] + [
    ("2 hidden", dict(widths=(7, 6)), "zero"),
    ("2 hidden", dict(widths=(7, 6)), "one")])
def test_bounds_contain_every_sampled_output(name, kw, slope):
    """Random tiny nets over random boxes: every sampled output lies within
    the IBP and CROWN bounds, and CROWN's linear bounds hold pointwise."""
    for seed in range(3):
        key = jax.random.key(100 * seed + len(name))
        model = _mlp(**kw)
        v = _random_vars(model, key)
        lo, hi = _boxes(jax.random.fold_in(key, 1), 4, (5,), 1.0)
        c = jax.random.normal(jax.random.fold_in(key, 2), (4, 2, 3))
        pts = _samples(jax.random.fold_in(key, 3), lo, hi)   # (N, 4, 5)
        out = _outputs(model, v, pts)      # (N, 4, 3)
        spec_out = jnp.einsum("bsc,nbc->nbs", c, out)
        il, ih = IBP(model.layers, v, lo, hi)
        b = CROWN(model.layers, v, lo, hi, c, lower_slope=slope)
        tol = 1e-4
        assert bool(jnp.all(out >= il - tol) and jnp.all(out <= ih + tol))
        assert bool(jnp.all(spec_out >= b.lower - tol))
        assert bool(jnp.all(spec_out <= b.upper + tol))
        lin_lo = _eval_lin(b.lA, b.lbias, pts)
        lin_hi = _eval_lin(b.uA, b.ubias, pts)
        assert bool(jnp.all(spec_out >= lin_lo - tol))
        assert bool(jnp.all(spec_out <= lin_hi + tol))
        # the concretised bounds are the linear bounds' extremes on the box
        assert bool(jnp.all(lin_lo >= b.lower - tol))
        assert bool(jnp.all(lin_hi <= b.upper + tol))


def test_conv_pool_tail_is_sound():
    """Conv / BN / avgpool / GAP / flatten layers go through the generic
    affine path."""
    model = zoo.sequential("c", [
        spec("conv", "c1", features=3, kernel=(3, 3), padding="SAME"),
        spec("bn", "b1"), spec("relu", "r1"),
        spec("avgpool", "p1", window=(2, 2)),
        spec("conv", "c2", features=4, kernel=(2, 2)), spec("relu", "r2"),
        spec("gap", "g"), spec("dense", "d", features=3)], (6, 6, 2), 3)
    v = _random_vars(model, jax.random.key(5))
    lo, hi = _boxes(jax.random.key(6), 2, (6, 6, 2), 0.3)
    pts = _samples(jax.random.key(7), lo, hi, 1000)
    out = _outputs(model, v, pts)
    il, ih = IBP(model.layers, v, lo, hi)
    b = CROWN(model.layers, v, lo, hi)
    assert bool(jnp.all(out >= il - 1e-4) and jnp.all(out <= ih + 1e-4))
    assert bool(jnp.all(out >= b.lower - 1e-4)
                and jnp.all(out <= b.upper + 1e-4))
    assert float(jnp.mean(b.upper - b.lower)) < float(jnp.mean(ih - il))


def test_crown_at_least_as_tight_as_ibp_one_hidden_layer():
    """One hidden layer, ReLU lower slope 0: CROWN's bound is at least as
    tight as IBP's, elementwise (a theorem: every term of the backward
    relaxation attains IBP's per-neuron minimum on the same pre-activation
    interval, and the minimum of a sum is at least the sum of minima)."""
    for seed in range(20):
        key = jax.random.key(seed)
        model = _mlp((10,))
        v = model.init(key)
        lo, hi = _boxes(jax.random.fold_in(key, 1), 8, (5,), 1.5)
        il, ih = IBP(model.layers, v, lo, hi)
        b = CROWN(model.layers, v, lo, hi, lower_slope="zero")
        assert bool(jnp.all(b.lower >= il - 1e-5))
        assert bool(jnp.all(b.upper <= ih + 1e-5))


def test_crown_tighter_than_ibp_on_deeper_nets():
    """Deeper nets (adaptive slope, as VeRe uses): CROWN is not provably
    tighter elementwise, but over random nets and boxes its bounds are
    tighter than IBP's on average, and on most outputs."""
    wc, wi, better = [], [], []
    for seed in range(10):
        key = jax.random.key(1000 + seed)
        model = _mlp((8, 8, 8))
        v = model.init(key)
        lo, hi = _boxes(jax.random.fold_in(key, 1), 8, (5,), 0.5)
        il, ih = IBP(model.layers, v, lo, hi)
        b = CROWN(model.layers, v, lo, hi)
        wc.append(np.asarray(b.upper - b.lower))
        wi.append(np.asarray(ih - il))
        better.append(np.asarray(b.upper - b.lower) <= np.asarray(ih - il)
                      + 1e-5)
    assert np.mean(np.concatenate(wc)) < 0.8 * np.mean(np.concatenate(wi))
    assert np.mean(np.concatenate(better)) > 0.9


def test_affine_and_stable_networks_are_exact():
    """No unstable ReLU (a degenerate box): CROWN's lower and upper bounds
    meet at the network's value; an affine net has lA = uA = its matrix."""
    model = _mlp((6, 4))
    v = model.init(jax.random.key(3))
    x = jax.random.normal(jax.random.key(4), (5, 5))
    b = CROWN(model.layers, v, x, x)
    z = model.apply(v, x)
    np.testing.assert_allclose(b.lower, z, atol=1e-5)
    np.testing.assert_allclose(b.upper, z, atol=1e-5)
    lin = zoo.sequential("lin", [spec("dense", "a", features=4),
                                 spec("dense", "b", features=3)], (5,), 3)
    vl = lin.init(jax.random.key(5))
    lo, hi = _boxes(jax.random.key(6), 2, (5,), 1.0)
    b = CROWN(lin.layers, vl, lo, hi)
    w = vl["params"]["a"]["kernel"] @ vl["params"]["b"]["kernel"]
    np.testing.assert_allclose(b.lA[0], w.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.uA[1], w.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.lbias, b.ubias, atol=1e-6)


def test_unsupported_layers_and_options_are_refused():
    model = zoo.sequential("m", [spec("maxpool", "p", window=(2, 2)),
                                 spec("flatten", "f"),
                                 spec("dense", "d", features=2)], (4, 4, 1), 2)
    v = model.init(jax.random.key(0))
    lo = jnp.zeros((1, 4, 4, 1))
    il, ih = IBP(model.layers, v, lo, lo + 1)  # IBP ok
    assert il.shape == (1, 2)
    with pytest.raises(ValueError, match="crown does not support.*maxpool"):
        CROWN(model.layers, v, lo, lo + 1)
    with pytest.raises(ValueError, match="lower_slope"):
        CROWN(model.layers[1:], v, lo.reshape(1, 16),
                      lo.reshape(1, 16), lower_slope="half")
