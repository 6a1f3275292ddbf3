"""RA (PRDNN-style single-layer LP repair) on a tiny conv net and digits."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlfix_jax import fixers
from dlfix_jax.fixers import _linear, ra
from dlfix_jax.models import zoo
from tests import fixtures


def tiny_problem():
    """A small conv net trained briefly on digits (~90% accurate), as a
    Problem with a dozen failing repair inputs: ``(ds, model, variables,
    problem)``."""
    model, variables, ds, problem = fixtures.tiny_conv_problem()
    return ds, model, variables, problem


def _cfg(**kw):
    """Hard constraints (PRDNN's setting) on 100 passing points unless
    ``kw`` says otherwise."""
    c = ra.default_config()
    c.num_passing = 100
    c.slack_penalty = 0.0
    c.update(kw)
    return c


def test_registered_and_applicability():
    s = fixers.get("ra")
    assert (s.level, s.abbrev, s.vmappable) == ("layer", "RA", False)
    assert s.applicable(fixtures.info_of(zoo.get("lenet5"))) is None
    assert "not sequential" in s.applicable(
        fixtures.info_of(zoo.get("resnet18")))


@pytest.mark.parametrize("norm", ["l1", "linf"])
def test_last_dense_repairs_all_constrained_points(norm):
    ds, model, v, prob = tiny_problem()
    assert len(prob.failing) > 0
    r = ra.fix(jax.random.key(1), prob, _cfg(norm=norm))
    assert r.info["lp_status"] == 0
    # The LP's constraints hold on the real network (last layer: exact).
    m = ra.margins(model, r.variables, prob.failing.x, prob.failing.y)
    m[np.arange(len(m)), np.asarray(prob.failing.y)] = np.inf
    assert m.min() >= r.info["margin"] - 1e-4
    assert r.info["max_violation"] <= 1e-4
    pred = np.asarray(model.predict(r.variables, prob.failing.x))
    assert np.all(pred == np.asarray(prob.failing.y))  # RR on repair = 100%
    assert all(np.isfinite(np.asarray(a)).all()
               for a in jax.tree_util.tree_leaves(r.variables))


def test_only_the_chosen_layer_changes_bit_for_bit():
    ds, model, v, prob = tiny_problem()
    r = ra.fix(jax.random.key(1), prob, _cfg())
    for layer in ("conv1", "dense1"):
        for k in ("kernel", "bias"):
            np.testing.assert_array_equal(
                np.asarray(r.variables["params"][layer][k]),
                np.asarray(v["params"][layer][k]))
    assert not np.array_equal(np.asarray(r.variables["params"]["dense2"]["kernel"]),
                              np.asarray(v["params"]["dense2"]["kernel"]))
    assert set(r.variables["params"]) == set(v["params"])


def test_deterministic_for_a_key_and_passing_points_kept():
    ds, model, v, prob = tiny_problem()
    a = ra.fix(jax.random.key(3), prob, _cfg())
    b = ra.fix(jax.random.key(3), prob, _cfg())
    for x, y in zip(jax.tree_util.tree_leaves(a.variables),
                    jax.tree_util.tree_leaves(b.variables)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.info["num_passing"] == 100


def test_earlier_layer_decoupled_constraints_hold():
    ds, model, v, prob = tiny_problem()
    r = ra.fix(jax.random.key(1), prob, _cfg(layer="conv1", num_passing=20))
    assert r.info["lp_status"] == 0
    assert r.info["max_violation_decoupled"] <= 1e-6
    np.testing.assert_array_equal(np.asarray(r.variables["params"]["dense2"]["kernel"]),
                                  np.asarray(v["params"]["dense2"]["kernel"]))


def test_decoupled_map_is_exact_for_last_layer():
    ds, model, v, prob = tiny_problem()
    layer_in, lin = _linear.decoupled_map(model, len(model.layers) - 1)
    a = layer_in(v, prob.failing.x[:3])
    d = {"kernel": jnp.ones((32, 10)) * 0.01, "bias": jnp.arange(10.0) * 0.1}
    got = jax.vmap(lambda ai: lin(v, ai, d))(a)
    np.testing.assert_allclose(np.asarray(got), np.asarray(a @ d["kernel"] + d["bias"]),
                               rtol=1e-5, atol=1e-5)


def test_too_large_lp_and_wrong_layer_raise():
    ds, model, v, prob = tiny_problem()
    with pytest.raises(RuntimeError, match="too large"):
        ra.fix(jax.random.key(0), prob, _cfg(max_lp_size=10))
    with pytest.raises(ValueError, match="only"):
        ra.fix(jax.random.key(0), prob, _cfg(layer="relu1"))


def _row_violations(model, variables, prob, need):
    """Per failing point: max(0, need − min over j ≠ y of its margin) on the
    float32 network."""
    m = ra.margins(model, variables, prob.failing.x, prob.failing.y)
    m[np.arange(len(m)), np.asarray(prob.failing.y)] = np.inf
    return np.maximum(0.0, need - m.min(axis=1))


@pytest.mark.parametrize("norm,penalty", [("l1", 1.0), ("linf", 0.5)])
def test_soft_constraints_slack_is_the_violation(norm, penalty):
    ds, model, v, prob = tiny_problem()
    r = ra.fix(jax.random.key(1), prob, _cfg(norm=norm, slack_penalty=penalty,
                                             num_passing=-1))
    assert r.info["lp_status"] == 0
    slack = np.asarray(r.info["slack"])
    assert slack.shape == (len(prob.failing),)
    # Soft enough that some failing points stay unrepaired (else the test
    # would not test the slack) and strong enough that some are repaired.
    assert 0 < r.info["num_repaired_lp"] < len(prob.failing)
    viol = _row_violations(model, r.variables, prob, r.info["margin"])
    np.testing.assert_allclose(slack, viol, atol=1e-4)
    assert r.info["slack_total"] == pytest.approx(slack.sum())
    assert r.info["max_violation"] <= 1e-4
    # Passing points (all constrained here) stay hard constraints.
    mp = ra.margins(model, r.variables, prob.passing.x, prob.passing.y)
    mp[np.arange(len(mp)), np.asarray(prob.passing.y)] = np.inf
    assert mp.min() >= r.info["margin"] - 1e-4
    for layer in ("conv1", "dense1"):
        for k in ("kernel", "bias"):
            np.testing.assert_array_equal(
                np.asarray(r.variables["params"][layer][k]),
                np.asarray(v["params"][layer][k]))


def test_constraint_generation_matches_the_full_lp():
    ds, model, v, prob = tiny_problem()
    a = ra.fix(jax.random.key(1), prob, _cfg(solver="cg", num_passing=-1))
    b = ra.fix(jax.random.key(1), prob, _cfg(solver="full", num_passing=-1))
    assert a.info["lp_rounds"] >= 1 and b.info["lp_rounds"] == 1
    assert a.info["lp_rows"] < b.info["lp_rows"] == b.info["num_constraints"]
    assert a.info["objective"] == pytest.approx(b.info["objective"], rel=1e-6)
    assert a.info["max_violation_decoupled"] <= 1e-6
    assert a.info["max_violation"] <= 1e-4


def test_passing_margin_floor():
    ds, model, v, prob = tiny_problem()
    floor = 2.0
    r = ra.fix(jax.random.key(1), prob, _cfg(passing_margin=floor,
                                             num_passing=-1))
    m0 = ra.margins(model, v, prob.passing.x, prob.passing.y)
    m1 = ra.margins(model, r.variables, prob.passing.x, prob.passing.y)
    yy = np.arange(len(m0)), np.asarray(prob.passing.y)
    m0[yy] = np.inf
    m1[yy] = np.inf
    need = np.minimum(m0.min(axis=1), floor)
    assert np.all(m1.min(axis=1) >= need - 1e-4)
    assert r.info["max_violation"] <= 1e-4
    base_r = ra.fix(jax.random.key(1), prob, _cfg(num_passing=-1))
    assert r.info["objective"] >= base_r.info["objective"] - 1e-9


def test_solve_lp_rows_generation_equals_one_solve():
    rs = np.random.default_rng(0)
    m = rs.normal(size=(300, 20))
    # Feasible by construction (Δ = d_true), with many binding rows.
    d_true = rs.normal(size=20)
    r = m @ d_true - rs.uniform(0.0, 2.0, size=300)
    for norm in ("l1", "linf"):
        d0, res0 = _linear.solve_lp(m, r, norm)
        init = np.zeros(300, bool)
        init[:10] = True
        d1, s1, res1, st = _linear.solve_lp_rows(m, r, norm, initial=init)
        assert res0.status == res1.status == 0
        assert res1.fun == pytest.approx(res0.fun, rel=1e-7, abs=1e-9)
        assert st["rounds"] > 1 and st["max_violation"] <= 1e-7
        assert np.min(m @ d1 - r) >= -1e-7
        # Soft rows: each group's slack is its largest violation.
        g = np.repeat(np.arange(30), 10)
        d2, s2, res2, st2 = _linear.solve_lp_rows(m, r + 3.0, norm, groups=g,
                                                  penalty=0.05, initial=init)
        assert res2.status == 0
        v = np.maximum(0, (r + 3.0) - m @ d2).reshape(30, 10).max(axis=1)
        np.testing.assert_allclose(s2, v, atol=1e-7)
        assert np.any(s2 > 1e-6)


def test_bad_variant_config_raises():
    with pytest.raises(ValueError, match="solver"):
        fixers.fixer_config(fixers.get("ra"), {"solver": "simplex"})
    with pytest.raises(ValueError, match="penalty"):
        _linear.solve_lp_rows(np.ones((2, 2)), np.ones(2), "l1",
                              groups=np.array([0, -1]), penalty=0.0)


def test_failing_subset_is_repaired_hard():
    ds, model, v, prob = tiny_problem()
    r = ra.fix(jax.random.key(2), prob, _cfg(num_failing=3))
    assert r.info["num_failing"] == 3 and r.info["lp_status"] == 0
    assert r.info["max_violation"] <= 1e-4
    pred = np.asarray(model.predict(r.variables, prob.failing.x))
    assert np.sum(pred == np.asarray(prob.failing.y)) >= 3
