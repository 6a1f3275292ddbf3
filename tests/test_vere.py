"""VeRe: the block it accepts, CROWN margin gains, targets, the mini-net
fit, the exact write-back, and a tiny end-to-end fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dlfix_jax.fixers as fixers
from dlfix_jax.fixers import vere
from dlfix_jax.models import zoo
from dlfix_jax.models.layers import spec
from tests import fixtures


def _bn_mlp():
    return zoo.sequential("bn_mlp", [
        spec("flatten", "flatten"), spec("dense", "dense1", features=12),
        spec("bn", "bn1"), spec("relu", "relu1"),
        spec("dropout", "drop", rate=0.5),
        spec("dense", "dense2", features=9), spec("relu", "relu2"),
        spec("dense", "dense3", features=10)], (28, 28, 1), 10)


def _bn_vars(model, key):
    v = model.init(key)
    k1, k2, k3, k4 = jax.random.split(jax.random.fold_in(key, 1), 4)
    v = {"params": dict(v["params"]), "batch_stats": {"bn1": {
        "mean": jax.random.normal(k1, (12,)) * 0.2,
        "var": jax.random.uniform(k2, (12,), minval=0.3, maxval=2.0)}}}
    v["params"]["bn1"] = {"scale": jax.random.normal(k3, (12,)),
                          "bias": jax.random.normal(k4, (12,)) * 0.1}
    return v


def test_resolve_and_applicability():
    model, _, _, _ = fixtures.tiny_mlp_problem()
    b = vere.resolve(model)
    assert (b.relu, b.dense_in, b.bn, b.dense_out) == (
        "relu1", "dense1", None, "dense2")
    b = vere.resolve(zoo.get("lenet5"))          # the first hidden Dense
    assert (b.relu, b.dense_in, b.dense_out) == ("relu3", "dense1", "dense2")
    assert [s.name for s in b.tail] == ["dense2", "relu4", "dense3"]
    b = vere.resolve(zoo.get("lenet5"), "relu4")
    assert (b.dense_in, b.dense_out) == ("dense2", "dense3")
    b = vere.resolve(zoo.get("vgg16"))
    assert (b.relu, b.dense_in, b.bn, b.dense_out) == (
        "relu_dense1", "dense1", "bn_dense1", "dense2")
    with pytest.raises(ValueError, match="does not follow a Dense"):
        vere.resolve(zoo.get("lenet5"), "relu1")
    with pytest.raises(ValueError, match="not a ReLU"):
        vere.resolve(zoo.get("lenet5"), "dense1")
    with pytest.raises(ValueError, match="no layer"):
        vere.resolve(zoo.get("lenet5"), "nope")
    for name in ("resnet18", "densenet121"):
        reason = vere.applicable(fixtures.info_of(zoo.get(name)))
        assert isinstance(reason, str) and "not sequential" in reason
    pool_tail = zoo.sequential("pt", [
        spec("flatten", "f"), spec("dense", "d1", features=4),
        spec("relu", "r"), spec("dense", "d2", features=4),
        spec("maxpool", "p", window=(1, 1))], (2, 2, 1), 4)
    assert "CROWN" in vere.applicable(fixtures.info_of(pool_tail))
    s = fixers.get("vere")
    assert (s.level, s.abbrev, s.vmappable) == ("neuron", "VERE", False)


def test_interval_grid_lies_below_the_minimum():
    h = np.array([[1.0, 0.0], [3.0, 2.0], [2.0, 1.0]], np.float32)
    g = vere.interval_grid(h, 4, 1.0)
    np.testing.assert_allclose(g[0, :, 0], [-1.0, -0.5, 0.0, 0.5])
    np.testing.assert_allclose(g[0, :, 1], [-0.5, 0.0, 0.5, 1.0])
    assert np.all(g[:, -1, 1] <= h.min(0) + 1e-6)
    g2 = vere.interval_grid(h, 4, 2.0)           # [2m - M, M]
    np.testing.assert_allclose(g2[:, -1, 1], h.max(0))


def _true_margin_change(model, v, relu, x, n, values, yt, yp, z0):
    """Margin change with ``h_n`` set to each value (one jitted apply)."""
    z0, yt, yp = jnp.asarray(z0), jnp.asarray(yt), jnp.asarray(yp)

    @jax.jit
    def margin(v, x, n, val):
        z = model.apply(v, x, intervene={relu: lambda o: o.at[:, n].set(val)})
        r = jnp.arange(len(x))
        return z[r, yt] - z[r, yp] - (z0[r, yt] - z0[r, yp])

    return np.stack([np.asarray(margin(v, x, n, jnp.float32(val)))
                     for val in values], -1)            # (S, len(values))


@pytest.mark.parametrize("which", ["linear tail", "dense-relu-dense tail"])
def test_margin_gains_bound_the_true_margin(which):
    """The gains are lower bounds of the margin change when the neuron is
    set to an interval end (exact for a linear tail; sound with a ReLU)."""
    if which == "linear tail":
        model, v, _, problem = fixtures.tiny_mlp_problem()
    else:
        _, _, _, problem = fixtures.tiny_mlp_problem()
        model = _bn_mlp()
        v = _bn_vars(model, jax.random.key(0))
    block = vere.resolve(model)
    x = problem.failing.x[:6]
    z, h, _ = vere._forward(model, v, block, x, 64)
    yt = np.asarray(problem.failing.y[:6])
    yp = np.where(z.argmax(1) == yt, (yt + 1) % 10, z.argmax(1))
    c = np.zeros((6, 10), np.float32)
    c[np.arange(6), yt] += 1
    c[np.arange(6), yp] -= 1
    ori = z[np.arange(6), yt] - z[np.arange(6), yp]
    eps = vere.interval_grid(h, 3, 2.0)
    tail_vars = {col: {s.name: t[s.name] for s in block.tail if s.name in t}
                 for col, t in v.items()}
    tail_vars = {k: t for k, t in tail_vars.items() if t}
    g = np.asarray(vere._gains(tail_vars, jnp.asarray(h), jnp.asarray(c),
                               jnp.asarray(ori), jnp.asarray(eps),
                               tail=block.tail, lower_slope="adaptive",
                               chunk=5))
    assert g.shape == (h.shape[1], 6, 3, 2)
    for n in (0, 3, h.shape[1] - 1):
        true = _true_margin_change(model, v, block.relu, x, n,
                                   eps[n].reshape(-1), yt, yp, z)
        got = g[n].reshape(6, -1)
        assert np.all(got <= true + 1e-4)
        if which == "linear tail":
            np.testing.assert_allclose(got, true, atol=1e-4)


def test_significance_and_targets():
    # two neurons, two failing inputs (+ one padded slot), two intervals
    gains = np.zeros((2, 3, 2, 2), np.float32)
    gains[0, 0] = [[1.0, 2.0], [0.5, 0.5]]
    gains[1, 0] = [[0.0, 0.5], [0.0, 0.0]]
    gains[0, 1] = [[-1.0, -1.0], [-1.0, -1.0]]
    gains[1, 1] = [[3.0, 3.0], [0.2, 0.1]]
    gains[:, 2] = 99.0                                 # padded: ignored
    valid = np.array([True, True, False])
    np.testing.assert_allclose(vere.significance(gains, valid), [1.0, 1.0])
    eps_n = np.array([[-2.0, -1.0], [-1.0, 0.0]], np.float32)
    cur = np.array([0.5, 0.7, 0.3], np.float32)
    ori = np.array([-1.5, -0.5, -1.0], np.float32)
    lo, hi = vere.targets(gains[0], eps_n, cur, ori)
    # input 0: no interval has both ends > 0 (1 - 1.5 < 0) -> point target
    # at the largest gain: interval 0, end 1 (value -1.0)
    assert (lo[0], hi[0]) == (-1.0, -1.0)
    # input 1: no positive gain -> its current value
    assert (lo[1], hi[1]) == (0.7, 0.7)
    lo, hi = vere.targets(gains[1], eps_n, cur, ori)
    # input 1 of neuron 1: interval 0 certified (3 - 0.5 > 0 at both ends)
    assert (lo[1], hi[1]) == (-2.0, -1.0)


def test_fit_reaches_targets_and_zero_loss_takes_no_step():
    key = jax.random.key(0)
    x = jax.random.normal(key, (40, 6))
    w1 = jax.random.normal(jax.random.key(1), (6,))
    b1 = jnp.float32(0.5)
    cur = np.asarray(vere.mini_net({"w1": w1, "b1": b1, "w2": 1.0,
                                    "b2": 0.0}, x))
    valid = jnp.ones(40, bool)
    # every target already met: no batch has a loss, nothing moves
    p, losses = vere.fit_mini_net(key, x, jnp.asarray(cur) - 1,
                                  jnp.asarray(cur) + 1, valid, w1, b1,
                                  epochs=200, batch_size=16, lr=0.01)
    assert float(jnp.max(losses)) == 0.0
    np.testing.assert_array_equal(np.asarray(p["w1"]), np.asarray(w1))
    assert float(p["w2"]) == 1.0 and float(p["b2"]) == 0.0
    # shift every target down by 2: the loss falls and the outputs follow
    tgt = jnp.asarray(cur) - 2.0
    p, losses = vere.fit_mini_net(key, x, tgt, tgt, valid, w1, b1,
                                  epochs=200, batch_size=16, lr=0.01)
    assert float(losses[-1].mean()) < 0.05 * float(losses[0].mean())
    # padded rows (valid False) are never used
    p2, _ = vere.fit_mini_net(
        key, jnp.concatenate([x, 100 * jnp.ones((8, 6))]),
        jnp.concatenate([tgt, jnp.full(8, 1e3)]),
        jnp.concatenate([tgt, jnp.full(8, 1e3)]),
        jnp.concatenate([valid, jnp.zeros(8, bool)]), w1, b1,
        epochs=200, batch_size=16, lr=0.01)
    np.testing.assert_allclose(vere.mini_net(p2, x), vere.mini_net(p, x),
                               atol=1e-4)


@pytest.mark.parametrize("bn", [False, True])
def test_write_back_is_the_mini_net_in_place_of_the_neuron(bn):
    """After the write-back the network equals the original with neuron n
    replaced by the mini-net's output on every input (so it is unchanged
    wherever that output equals the old activation); the original mini-net
    leaves the function unchanged; nothing outside the mask moves."""
    _, _, _, problem = fixtures.tiny_mlp_problem()
    if bn:
        model = _bn_mlp()
        v = _bn_vars(model, jax.random.key(3))
    else:
        model, v, _, _ = fixtures.tiny_mlp_problem()
    block = vere.resolve(model)
    a, c = vere.bn_affine(model, v, block)
    x = problem.repair.x
    z0, h0, xin = vere._forward(model, v, block, x, 256)
    n = 5
    pin = v["params"][block.dense_in]
    same = {"w1": jnp.asarray(pin["kernel"])[:, n] * a[n],
            "b1": jnp.asarray(pin["bias"])[n] * a[n] + c[n],
            "w2": jnp.float32(1.0), "b2": jnp.float32(0.0)}
    np.testing.assert_allclose(vere.mini_net(same, jnp.asarray(xin)),
                               h0[:, n], rtol=1e-5, atol=1e-5)
    v_same = vere.write_back(v, block, n, same, a, c)
    np.testing.assert_allclose(model.apply(v_same, x), z0, rtol=1e-5,
                               atol=1e-5)
    k = jax.random.split(jax.random.key(4), 3)
    mini = {"w1": same["w1"] + 0.3 * jax.random.normal(k[0], same["w1"].shape),
            "b1": same["b1"] - 0.2, "w2": jnp.float32(-1.7),
            "b2": jnp.float32(0.4)}
    v_new = vere.write_back(v, block, n, mini, a, c)
    m = np.asarray(vere.mini_net(mini, jnp.asarray(xin)))
    want = model.apply(v, x, intervene={
        block.relu: lambda o: o.at[:, n].set(jnp.asarray(m))})
    got = model.apply(v_new, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # inputs whose activation the mini-net leaves unchanged (both zero
    # after the ReLU, with b2 = 0 and any w2) keep their logits
    mini0 = dict(mini, b1=jnp.float32(-1e4), b2=jnp.float32(0.0))
    v0 = vere.write_back(v, block, n, mini0, a, c)
    untouched = h0[:, n] == 0
    assert untouched.any()
    np.testing.assert_allclose(np.asarray(model.apply(v0, x))[untouched],
                               z0[untouched], rtol=1e-5, atol=1e-5)
    mask = vere.neuron_mask(v["params"], block, [n])
    assert fixtures.changed_outside(mask, v["params"], v_new["params"]) == 0


def test_fix_repairs_deterministically_and_stays_in_its_mask():
    model, variables, _, problem = fixtures.tiny_mlp_problem()
    cfg = fixers.get("vere").config({"rounds": 10})
    res = fixtures.assert_deterministic_and_repairs(vere.fix, problem, cfg,
                                                    key=1)
    assert fixtures.changed_outside(res.mask, variables["params"],
                                    res.variables["params"]) == 0
    best = int(res.info["best_round"])
    assert best > 0
    trace = np.asarray(res.info["score_trace"])
    assert trace[best] == np.nanmax(trace) > trace[0]
    neurons = np.asarray(res.info["neurons"])
    assert set(np.unique(neurons[:best])) <= set(range(32))
    # the mask covers exactly the neurons repaired up to the best round
    sel = np.asarray(res.mask["dense1"]["bias"])
    assert set(np.nonzero(sel)[0]) == set(neurons[:best].tolist())


def test_bad_inputs_are_refused():
    model, variables, _, problem = fixtures.tiny_mlp_problem()
    with pytest.raises(ValueError, match="lower_slope"):
        fixers.get("vere").config({"lower_slope": "half"})
    with pytest.raises(ValueError, match="I_neg is empty"):
        vere.fix(jax.random.key(0), problem.replace(
            failing=problem.failing.take(np.arange(0))),
                 fixers.get("vere").config())
    with pytest.raises(ValueError, match="not a ReLU"):
        vere.fix(jax.random.key(0), problem,
                 fixers.get("vere").config({"layer": "dense1"}))


def test_fix_with_a_batch_norm_block_stays_in_its_mask():
    """The BN-folded path end to end (a random BN model: most repair inputs
    fail; the write-back divides by the BN scale)."""
    _, _, ds, _ = fixtures.tiny_mlp_problem()
    model = _bn_mlp()
    v = _bn_vars(model, jax.random.key(8))
    problem = fixers.make_problem(model, v, ds)
    cfg = fixers.get("vere").config({"rounds": 3, "max_failing": 16})
    res = vere.fix(jax.random.key(0), problem, cfg)
    assert int(res.info["rounds_run"]) == 3
    assert np.all(np.asarray(res.info["neurons"]) >= 0)
    assert fixtures.changed_outside(res.mask, v["params"],
                                    res.variables["params"]) == 0
    np.testing.assert_array_equal(res.variables["batch_stats"]["bn1"]["var"],
                                  v["batch_stats"]["bn1"]["var"])
