"""RA (PRDNN-style single-layer LP repair) on a tiny conv net and digits."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlfix_jax import data, fixers
from dlfix_jax.fixers import base
from dlfix_jax.fixers import _linear, ra
from dlfix_jax.models import zoo
from dlfix_jax.models.layers import spec
from tests import fixtures


def tiny_problem():
    """A small conv net trained briefly on digits (~90% accurate), as a
    Problem with a dozen failing repair inputs: ``(ds, model, variables,
    problem)``."""
    model, variables, ds, problem = fixtures.tiny_conv_problem()
    return ds, model, variables, problem


def _cfg(**kw):
    c = ra.default_config()
    c.num_passing = 100
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
