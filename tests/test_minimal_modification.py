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


def test_lazy_constraint_generation_reaches_the_full_optimum():
    """Lazy rows (default) give the optimum of the LP over every point with
    fewer rows in the LP; all points are certified."""
    model, v, ds, prob = fixtures.tiny_mlp_problem()
    lazy = mm.fix(jax.random.key(1), prob, _cfg())
    full = mm.fix(jax.random.key(1), prob, _cfg(lazy=False))
    assert lazy.info["status"] == full.info["status"] == 0
    assert abs(lazy.info["objective"] - full.info["objective"]) <= 1e-7
    assert lazy.info["num_points"] == full.info["num_points"] == len(
        prob.repair)
    # Rows in the last LP: fewer than all (points × wrong classes).
    assert lazy.info["num_active"] < full.info["num_constraints"] == len(
        prob.repair) * 9
    assert full.info["num_active"] == full.info["num_constraints"]
    assert lazy.info["num_rounds"] >= 1
    m = _margins64(model, lazy.variables, "dense2", prob.repair.x,
                   prob.repair.y)
    assert m.min() >= lazy.info["margin"] - 1e-5


def _margins64_multi(model, variables, x, y):
    """float64 margins of the mlp3 net from dense2's (unchanged) inputs."""
    in_fn = _linear.delta_jacobian_fns(model, 3)[0]
    a = np.asarray(in_fn(variables, x), np.float64).reshape(len(y), -1)
    p = variables["params"]
    k = lambda n, leaf: np.asarray(p[n][leaf], np.float64)
    z = np.maximum(a @ k("dense2", "kernel") + k("dense2", "bias"), 0.0)
    z = z @ k("dense3", "kernel") + k("dense3", "bias")
    y = np.asarray(y)
    m = z[np.arange(len(y)), y][:, None] - z
    m[np.arange(len(y)), y] = np.inf
    return m


@pytest.mark.parametrize("search", ["greedy", "random"])
def test_multi_layer_certified_smaller_and_unmasked_unchanged(search):
    model, v, ds, prob = mlp3_problem()
    single = mm.fix(jax.random.key(1), prob, _cfg())
    r = mm.fix(jax.random.key(1), prob,
               _cfg(separation="dense2", search=search, time_limit_s=30.0))
    assert mm.MODES[r.info["mode"]] == "multi"
    assert mm.STATUS[r.info["status"]] == "feasible"
    assert r.info["num_points"] == len(prob.repair)
    # Anytime: α = 0 (the last-layer query alone) is the first candidate,
    # so the search never returns more than the single-layer optimum.
    assert r.info["epsilon"] <= single.info["epsilon"] + 1e-9
    assert r.info["epsilon"] == max(r.info["epsilon_1"], r.info["epsilon_2"])
    for n in ("dense2", "dense3"):
        d = max(np.abs(np.asarray(r.variables["params"][n][leaf], np.float64)
                       - np.asarray(v["params"][n][leaf], np.float64)).max()
                for leaf in ("kernel", "bias"))
        assert d <= r.info["epsilon"] + 1e-6
    # Every repair point: correct with the margin in the real network.
    m = _margins64_multi(model, r.variables, prob.repair.x, prob.repair.y)
    assert m.min() >= r.info["margin"] - 1e-5
    pred = np.asarray(model.predict(r.variables, prob.repair.x))
    assert np.all(pred == np.asarray(prob.repair.y))
    assert r.info["max_violation"] <= 1e-5
    # Layers outside the two modified ones: bit-for-bit the original.
    for leaf in ("kernel", "bias"):
        np.testing.assert_array_equal(
            np.asarray(r.variables["params"]["dense1"][leaf]),
            np.asarray(v["params"]["dense1"][leaf]))
    assert fixtures.changed_outside(r.mask, v["params"],
                                    r.variables["params"]) == 0
    assert bool(np.all(r.mask["dense2"]["kernel"]))
    assert bool(np.all(r.mask["dense3"]["kernel"]))
    assert not bool(np.any(r.mask["dense1"]["kernel"]))


def test_multi_layer_greedy_beats_single_layer_on_mlp3():
    """On the 32-16-10 MLP the two-layer change is smaller (measured
    0.075 vs 0.175)."""
    model, v, ds, prob = mlp3_problem()
    single = mm.fix(jax.random.key(1), prob, _cfg())
    r = mm.fix(jax.random.key(1), prob,
               _cfg(separation="dense2", time_limit_s=30.0))
    assert r.info["alpha"] > 0 and r.info["epsilon_1"] > 0
    assert r.info["epsilon"] < 0.9 * single.info["epsilon"]


def test_multi_layer_timeout_returns_the_original():
    model, v, ds, prob = mlp3_problem()
    r = mm.fix(jax.random.key(1), prob,
               _cfg(separation="dense2", time_limit_s=0.0))
    assert mm.STATUS[r.info["status"]] == "time limit"
    assert r.info["timed_out"] == 1
    for x, y in zip(jax.tree_util.tree_leaves(r.variables),
                    jax.tree_util.tree_leaves(v)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_target_directions_fix_the_original_last_layer():
    model, v, ds, prob = mlp3_problem()
    in_fn = _linear.delta_jacobian_fns(model, 5)[0]
    s = np.asarray(in_fn(v, prob.failing.x), np.float64)
    y = np.asarray(prob.failing.y)
    w2 = np.asarray(v["params"]["dense3"]["kernel"], np.float64)
    b2 = np.asarray(v["params"]["dense3"]["bias"], np.float64)
    dirs = mm._target_directions(s, y, w2, b2, 1e-3, True,
                                 time.perf_counter() + 30)
    assert all(d is not None for d in dirs)
    d = np.stack(dirs)
    assert np.all(d[s == 0] == 0)          # inactive units stay off
    assert np.all(s + d >= -1e-9)          # stays a ReLU output
    mg = mm._margin_min((s + d) @ w2 + b2, y)
    assert mg.min() >= 1e-3 - 1e-7


def test_multi_layer_bad_separation_raises():
    model, v, ds, prob = mlp3_problem()
    with pytest.raises(ValueError, match="separation"):
        mm.fix(jax.random.key(0), prob, _cfg(separation="dense1"))
    with pytest.raises(ValueError, match="only Dense"):
        mm.fix(jax.random.key(0), prob, _cfg(separation="relu2"))
    with pytest.raises(ValueError, match="linf"):
        mm.fix(jax.random.key(0), prob, _cfg(separation="dense2",
                                             norm="l1"))


def test_lazy_time_limit_returns_the_last_round_certified_on_the_rest(
        monkeypatch):
    """When the time runs out after a solved round (simulated: the second
    HiGHS call reports its time limit), that round's change is returned,
    status "feasible", with the points it violates counted as dropped."""
    model, v, ds, prob = fixtures.tiny_mlp_problem()
    real = _linear.solve_lp
    calls = []

    def second_times_out(*a, **kw):
        calls.append(1)
        delta, res = real(*a, **kw)
        if len(calls) == 2:
            res.status = 1
            return None, res
        return delta, res

    monkeypatch.setattr(mm._linear, "solve_lp", second_times_out)
    r = mm.fix(jax.random.key(1), prob, _cfg())
    assert len(calls) == 2
    assert mm.STATUS[r.info["status"]] == "feasible"
    assert r.info["timed_out"] == 1
    dropped = r.info["num_dropped_failing"] + r.info["num_dropped_passing"]
    assert dropped > 0 and r.info["num_points"] == len(prob.repair) - dropped
    assert r.info["max_violation"] <= 1e-5  # on the kept points
    m = _margins64(model, r.variables, "dense2", prob.repair.x,
                   prob.repair.y).min(1)
    assert int(np.sum(m >= r.info["margin"] - 1e-5)) >= r.info["num_points"]
    assert not np.array_equal(
        np.asarray(r.variables["params"]["dense2"]["kernel"]),
        np.asarray(v["params"]["dense2"]["kernel"]))
