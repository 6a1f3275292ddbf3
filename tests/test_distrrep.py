"""DistrRep: repair tasks, shared-weight map, merge, score, tiny fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dlfix_jax.fixers as fixers
from dlfix_jax.fixers import distrrep
from dlfix_jax.models import zoo
from dlfix_jax.models.layers import spec
from tests import fixtures

TINY = dict(particles=20, max_iterations=15, merge_particles=20,
            merge_iterations=15)


def test_repair_tasks_group_by_type_on_a_hand_made_case():
    y_true = np.array([1, 1, 1, 2, 2, 3, 3])
    y_pred = np.array([9, 8, 9, 8, 2, 7, 3])    # inputs 4 and 6 are right
    types, members = distrrep.repair_tasks(y_true, y_pred, 3, -1)
    # (1,9) x2 first; the count-1 ties in ascending (t, p) order, capped at
    # 3; then general repairs of classes 1 (3 failures), 2, 3 (1 each).
    np.testing.assert_array_equal(
        types, [[1, 9], [1, 8], [2, 8], [1, -1], [2, -1], [3, -1]])
    np.testing.assert_array_equal(members.astype(int), [
        [1, 0, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 0]])
    types, members = distrrep.repair_tasks(y_true, y_pred, 8, 1)
    np.testing.assert_array_equal(
        types, [[1, 9], [1, 8], [2, 8], [3, 7], [1, -1]])
    types, _ = distrrep.repair_tasks(y_true, y_pred, 0, 0)
    assert types.shape == (0, 2)


def test_shared_map_keeps_every_sharer():
    sm = distrrep.shared_map([np.array([0, 5]), np.array([5, 7]),
                              np.array([2, 5])])
    np.testing.assert_array_equal(sm["union"], [0, 2, 5, 7])
    np.testing.assert_array_equal(sm["member"], [[1, 0, 1, 0], [0, 0, 1, 1],
                                                 [0, 1, 1, 0]])
    np.testing.assert_array_equal(sm["shared"], [0, 0, 1, 0])
    np.testing.assert_array_equal(sm["owner"], [0, 2, 0, 1])
    np.testing.assert_array_equal(sm["coef"], [0, 2, 3, 1])
    assert sm["num_shared"] == 1


def test_merge_weights_as_documented():
    # Repair 0 localised union positions {0, 2}, repair 1 {1, 2}: 2 shared.
    sm = distrrep.shared_map([np.array([10, 30]), np.array([20, 30])])
    w0 = jnp.array([1.0, 2.0, 3.0])
    W = jnp.array([[0.5, 2.0, 4.0],     # repair 0 (w0 where not localised)
                   [1.0, 3.0, 2.5]])    # repair 1
    args = (W, w0, jnp.asarray(sm["shared"]), jnp.asarray(sm["owner"]),
            jnp.asarray(sm["coef"]))
    # Two disjoint patches with coefficient 1 == applying both; 0 == w0.
    got = distrrep.merge_weights(jnp.array([1.0, 1.0, 0.0]), *args)
    np.testing.assert_allclose(got[:2], [0.5, 3.0])
    got = distrrep.merge_weights(jnp.array([0.0, 0.0, 0.0]), *args)
    np.testing.assert_allclose(got, [1.0, 2.0, 2.5])    # shared: min V
    # c = (0.4, 0.25, 0.5): 1 + 0.4 (0.5 - 1); 2 + 0.25 (3 - 2);
    # shared V = {4, 2.5, 3}: 2.5 + 0.5 (4 - 2.5).
    got = distrrep.merge_weights(jnp.array([0.4, 0.25, 0.5]), *args)
    np.testing.assert_allclose(got, [0.8, 2.25, 3.25], rtol=1e-6)


def test_merge_score_on_a_small_example():
    types = jnp.array([[1, 9], [1, -1], [2, -1]])
    y = jnp.array([1, 1, 1, 1, 2, 2, 0])
    pred = jnp.array([9, 9, 3, 1, 2, 0, 0])
    counts = jnp.array([1.0, 4.0, 2.0])
    wp, wm = distrrep.score_weights(np.asarray(types))
    np.testing.assert_allclose(wp, [0, 0.5, 0.5])
    np.testing.assert_allclose(wm, [1 / 3] * 3)
    got = distrrep.merge_score(pred, y, types, jnp.asarray(wp),
                               jnp.asarray(wm), counts)
    # rates: (1->9) 2/4, class 1 3/4, class 2 1/2
    want = (0.5 * (1 - 0.75) + 0.5 * (1 - 0.5)
            - 0.5 / 3 * (0.5 + 0.75 + 0.5))
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_applicability():
    assert distrrep.applicable(fixtures.info_of(zoo.get("lenet5"))) is None
    assert distrrep.applicable(fixtures.info_of(zoo.get("facenet"))) is None
    conv_last = zoo.sequential("c", [
        spec("conv", "c1", features=2, kernel=(1, 1)), spec("gap", "g")],
        (4, 4, 1), 2)
    assert "Dense" in distrrep.applicable(fixtures.info_of(conv_last))
    s = fixers.get("distrrep")
    assert (s.level, s.abbrev, s.vmappable) == ("neuron", "DTR", True)


def test_fix_repairs_deterministically_inside_the_mask():
    model, variables, _, problem = fixtures.tiny_mlp_problem()
    s = fixers.get("distrrep")
    cfg = fixers.fixer_config(s, TINY)
    res = fixtures.assert_deterministic_and_repairs(s.fix, problem, cfg)
    assert fixtures.changed_outside(res.mask, variables["params"],
                                    res.variables["params"]) == 0
    assert fixers.base.mask_count(res.mask) == int(res.info["num_union"])
    R = res.info["types"].shape[0]
    assert res.info["coefficients"].shape == (
        R + int(res.info["num_shared"]),)


def test_refuses_non_finite_variables_and_inputs():
    _, variables, _, problem = fixtures.tiny_mlp_problem()
    s = fixers.get("distrrep")
    cfg = fixers.fixer_config(s, TINY)
    bad = jax.tree_util.tree_map(lambda a: a * jnp.nan, variables)
    with pytest.raises(ValueError, match="variables hold non-finite"):
        s.fix(jax.random.key(0), problem.replace(variables=bad), cfg)
    x = problem.failing.x.at[0, 0, 0, 0].set(jnp.inf)
    with pytest.raises(ValueError, match="repair inputs hold non-finite"):
        s.fix(jax.random.key(0),
              problem.replace(failing=problem.failing.replace(x=x)), cfg)
