"""3M (minimal single-layer modification, LP / MILP) on tiny MLPs."""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlfix_jax import data, fixers
from dlfix_jax.fixers import _linear
from dlfix_jax.fixers import minimal_modification as mm
from dlfix_jax.metrics import classification
from dlfix_jax.models import base as models_base
from dlfix_jax.models import zoo
from dlfix_jax.models.layers import spec
from tests import fixtures


@functools.lru_cache(maxsize=None)
def mlp3_problem():
    """Flatten -> Dense 32 -> ReLU -> Dense 16 -> ReLU -> Dense 10, briefly
    trained: its middle Dense layer (fan-in 32) keeps the MILP small."""
    ds = data.load("digits", seed=0)
    model = zoo.sequential("mlp3", [
        spec("flatten", "flatten"), spec("dense", "dense1", features=32),
        spec("relu", "relu1"), spec("dense", "dense2", features=16),
        spec("relu", "relu2"), spec("dense", "dense3", features=10)],
        (28, 28, 1), 10)
    v = fixtures.train(model, ds, 60, 3e-3, batch_size=128)
    return model, v, ds, fixers.make_problem(model, v, ds)


def _cfg(**kw):
    c = mm.default_config()
    c.update(kw)
    return c


def _margins64(model, variables, name, x, y):
    """float64 logit_y − logit_j of the real network from layer ``name``'s
    inputs (the float32 network's, unchanged by the fix)."""
    li = [s.name for s in model.layers].index(name)
    in_fn = _linear.delta_jacobian_fns(model, li)[0]
    a = np.asarray(in_fn(variables, x), np.float64).reshape(len(y), -1)
    lp = models_base.get_layer_params(variables["params"], name)
    z = mm._forward64(a, np.asarray(lp["kernel"], np.float64),
                      np.asarray(lp["bias"], np.float64),
                      mm._tail(model, variables["params"], li))
    y = np.asarray(y)
    m = z[np.arange(len(y)), y][:, None] - z
    m[np.arange(len(y)), y] = np.inf
    return m


def test_registered_and_applicability():
    s = fixers.get("minimal_modification")
    assert (s.level, s.abbrev, s.vmappable) == ("layer", "3M", False)
    assert s.applicable(fixtures.info_of(zoo.get("lenet5"))) is None
    assert "not sequential" in s.applicable(
        fixtures.info_of(zoo.get("resnet18")))


@pytest.mark.parametrize("kw", [{}, {"bias": "fixed"}, {"norm": "l1"}])
def test_last_layer_lp_constraints_hold_exactly(kw):
    model, v, ds, prob = fixtures.tiny_mlp_problem()
    r = mm.fix(jax.random.key(1), prob, _cfg(**kw))
    assert r.info["status"] == 0 and r.info["mode"] == 0
    assert r.info["num_points"] == len(prob.repair)  # all passing kept
    margin = r.info["margin"]
    # float64 margins of the written-back (float32) layer, all points.
    m = _margins64(model, r.variables, "dense2", prob.repair.x, prob.repair.y)
    assert m.min() >= margin - 1e-5
    # The float32 network classifies every constrained point correctly.
    pred = np.asarray(model.predict(r.variables, prob.repair.x))
    assert np.all(pred == np.asarray(prob.repair.y))
    assert r.info["max_violation"] <= 1e-5
    # Minimality: the objective is the returned change's linf norm.
    d = (np.asarray(r.variables["params"]["dense2"]["kernel"], np.float64)
         - np.asarray(v["params"]["dense2"]["kernel"], np.float64))
    if kw.get("norm", "linf") == "linf":
        assert abs(np.abs(d).max() - r.info["objective"]) < 1e-6
    if kw.get("bias") == "fixed":
        np.testing.assert_array_equal(
            np.asarray(r.variables["params"]["dense2"]["bias"]),
            np.asarray(v["params"]["dense2"]["bias"]))


def test_rr_positive_and_unmasked_layers_bit_for_bit():
    model, v, ds, prob = fixtures.tiny_mlp_problem()
    r = mm.fix(jax.random.key(1), prob, _cfg(num_passing=50))
    pred0 = model.predict(v, prob.repair.x)
    pred1 = model.predict(r.variables, prob.repair.x)
    assert float(classification.flips(pred0, pred1, prob.repair.y)["rr"]) > 0
    for k in ("kernel", "bias"):
        np.testing.assert_array_equal(
            np.asarray(r.variables["params"]["dense1"][k]),
            np.asarray(v["params"]["dense1"][k]))
    assert fixtures.changed_outside(r.mask, v["params"],
                                    r.variables["params"]) == 0
    assert not bool(np.any(r.mask["dense1"]["kernel"]))
    assert bool(np.all(r.mask["dense2"]["kernel"]))


def test_deterministic_for_a_key():
    model, v, ds, prob = fixtures.tiny_mlp_problem()
    a = mm.fix(jax.random.key(3), prob, _cfg(num_passing=30))
    b = mm.fix(jax.random.key(3), prob, _cfg(num_passing=30))
    for x, y in zip(jax.tree_util.tree_leaves(a.variables),
                    jax.tree_util.tree_leaves(b.variables)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.info == b.info | {"time_build_s": a.info["time_build_s"],
                               "time_solve_s": a.info["time_solve_s"]}


def test_tiny_time_limit_returns_the_original_with_the_reason():
    model, v, ds, prob = fixtures.tiny_mlp_problem()
    r = mm.fix(jax.random.key(1), prob, _cfg(time_limit_s=0.0))
    assert mm.STATUS[r.info["status"]] == "time limit"
    for x, y in zip(jax.tree_util.tree_leaves(r.variables),
                    jax.tree_util.tree_leaves(v)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    s = fixers.summarize_info(fixers.get("minimal_modification"), r.info)
    assert s["status_name"] == "time limit"


def test_infeasible_point_set_is_reduced_not_given_up():
    model, v, ds, prob = fixtures.tiny_mlp_problem()
    # A tiny epsilon_max makes the full point set infeasible.
    r = mm.fix(jax.random.key(1), prob, _cfg(epsilon_max=0.05))
    assert mm.STATUS[r.info["status"]] == "optimal"
    dropped = r.info["num_dropped_failing"] + r.info["num_dropped_passing"]
    assert dropped > 0 and r.info["num_points"] == len(prob.repair) - dropped
    assert r.info["epsilon"] <= 0.05 + 1e-6
    assert r.info["max_violation"] <= 1e-5  # on the kept points
    g = mm.fix(jax.random.key(1), prob, _cfg(epsilon_max=0.05,
                                             reduce="none"))
    assert mm.STATUS[g.info["status"]] == "infeasible"
    np.testing.assert_array_equal(
        np.asarray(g.variables["params"]["dense2"]["kernel"]),
        np.asarray(v["params"]["dense2"]["kernel"]))


def test_hidden_layer_milp_agrees_with_the_real_network():
    model, v, ds, prob = mlp3_problem()
    t = time.perf_counter()
    r = mm.fix(jax.random.key(1), prob,
               _cfg(layer="dense2", num_passing=0, time_limit_s=4.0))
    assert time.perf_counter() - t < 20  # HiGHS may overshoot its limit
    assert r.info["mode"] == 1
    assert mm.STATUS[r.info["status"]] in ("optimal", "feasible")
    assert r.info["incumbent_from_lp"] == 1
    assert r.info["max_encoding_error"] <= 1e-6
    # Certified points: correct with the margin on the real network.
    m = _margins64(model, r.variables, "dense2", prob.failing.x,
                   prob.failing.y)
    assert m.min() >= r.info["margin"] - 1e-5
    pred = np.asarray(model.predict(r.variables, prob.failing.x))
    assert np.all(pred == np.asarray(prob.failing.y))
    for layer in ("dense1", "dense3"):
        np.testing.assert_array_equal(
            np.asarray(r.variables["params"][layer]["kernel"]),
            np.asarray(v["params"][layer]["kernel"]))


def test_milp_encoding_exact_with_free_binaries():
    """The full MILP (free binaries, big-M from intervals) solved to
    optimality on 3 points: its logits equal the real network's."""
    model, v, ds, prob = mlp3_problem()
    li = 3
    in_fn, _, unravel, nv = _linear.delta_jacobian_fns(model, li)
    idx = unravel(jnp.arange(nv, dtype=jnp.float32))
    iw = np.asarray(idx["kernel"]).astype(np.int64)
    ib = np.asarray(idx["bias"]).astype(np.int64)
    x, y = prob.failing.x[:3], np.asarray(prob.failing.y[:3])
    a = np.asarray(in_fn(v, x), np.float64)
    lp = v["params"]["dense2"]
    w = np.asarray(lp["kernel"], np.float64)
    b = np.asarray(lp["bias"], np.float64)
    tail = mm._tail(model, v["params"], li)
    milp = mm._build_milp(a, a @ w + b, y, tail, iw, ib, nv, 0.5, True, 1e-3,
                          10, False)
    assert milp["n_bin"] > 0
    res = mm._solve_milp(milp, time.perf_counter() + 20)
    assert res.x is not None and res.status in (0, 1)
    dl = res.x[:nv]
    real = mm._forward64(a, w + dl[iw], b + dl[ib], tail)
    enc = np.array([mm._expr_values(e, res.x) for e in milp["logit_exprs"]])
    np.testing.assert_allclose(enc, real, atol=1e-6)
    mg = real[np.arange(3), y][:, None] - real
    mg[np.arange(3), y] = np.inf
    assert mg.min() >= 1e-3 - 1e-6


def test_wrong_layer_and_norm_raise():
    model, v, ds, prob = fixtures.tiny_mlp_problem()
    with pytest.raises(ValueError, match="only Dense"):
        mm.fix(jax.random.key(0), prob, _cfg(layer="relu1"))
    with pytest.raises(ValueError, match="linf"):
        mm.fix(jax.random.key(0), prob, _cfg(layer="dense1", norm="l1"))


def test_hidden_layer_infeasible_points_reduced():
    model, v, ds, prob = mlp3_problem()
    r = mm.fix(jax.random.key(1), prob, _cfg(layer="dense2", num_passing=0,
                                             epsilon_max=0.01,
                                             time_limit_s=6.0))
    assert mm.STATUS[r.info["status"]] in ("optimal", "feasible")
    assert 0 < r.info["num_dropped_failing"] < len(prob.failing)
    assert r.info["epsilon"] <= 0.01 + 1e-6
    assert r.info["max_encoding_error"] <= 1e-6
    pred0 = model.predict(v, prob.repair.x)
    pred1 = model.predict(r.variables, prob.repair.x)
    rr = float(classification.flips(pred0, pred1, prob.repair.y)["rr"])
    assert rr > 0
