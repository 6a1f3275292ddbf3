"""CARE: causal effects, the fold, and a tiny end-to-end fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dlfix_jax.fixers as fixers
from dlfix_jax import masks, search
from dlfix_jax.fixers import _fitness, care
from dlfix_jax.metrics import classification
from dlfix_jax.models import zoo
from dlfix_jax.models.layers import spec
from tests import fixtures

TINY = dict(particles=10, max_iterations=15)


def test_resolve_and_applicability():
    model, _, _, _ = fixtures.tiny_mlp_problem()
    assert care.resolve(model) == ("relu1", "dense2")
    assert care.resolve(model, "relu1") == ("relu1", "dense2")
    assert care.resolve(zoo.get("lenet5")) == ("relu4", "dense3")
    assert care.resolve(zoo.get("lenet5"), "pool2") == ("pool2", "dense1")
    with pytest.raises(ValueError, match="not be exact"):
        care.resolve(zoo.get("lenet5"), "conv2")      # relu before Dense
    with pytest.raises(ValueError, match="no Dense layer after"):
        care.resolve(model, "dense2")
    assert care.applicable(fixtures.info_of(zoo.get("lenet5"))) is None
    assert care.applicable(fixtures.info_of(zoo.get("resnet18"))) is None
    conv_last = zoo.sequential("c", [
        spec("conv", "c1", features=2, kernel=(1, 1)), spec("gap", "g")],
        (4, 4, 1), 2)
    reason = care.applicable(fixtures.info_of(conv_last))
    assert isinstance(reason, str) and "Dense" in reason
    dense_first = zoo.sequential("d", [spec("flatten", "f"),
                                       spec("dense", "d1", features=2)],
                                 (4, 4, 1), 2)
    assert "input" in care.applicable(fixtures.info_of(dense_first))
    s = fixers.get("care")
    assert (s.level, s.abbrev, s.vmappable) == ("neuron", "CARE", True)


@pytest.mark.parametrize("dense", ["dense2", "dense1"])
def test_causal_effects_equal_a_naive_loop(dense):
    """Batched do-interventions == one model.apply(intervene=...) per
    neuron and value (dense1: hidden tail; dense2: the logits layer)."""
    model, variables, _, problem = fixtures.tiny_mlp_problem()
    hidden = "flatten" if dense == "dense1" else "relu1"
    x, y = problem.failing.x, problem.failing.y
    cache = _fitness.cache_layer(model, variables, dense, x)
    kernel = np.asarray(variables["params"][dense]["kernel"])
    values = care.intervention_values(cache.h, 4)
    got = np.asarray(care._effects(
        jnp.asarray(cache.h), jnp.asarray(cache.out),
        jnp.asarray(cache.logits), jnp.asarray(y), jnp.asarray(kernel),
        jnp.asarray(values), cache.tail_vars, tail=cache.tail, chunk=7))
    assert got.shape == (kernel.shape[0], 4)
    for i in (0, 3, int(np.argmax(cache.h.std(0)))):
        for t in range(4):
            v = values[i, t]
            z = model.apply(variables, x, intervene={
                hidden: lambda o, i=i, v=v: o.reshape(len(o), -1)
                .at[:, i].set(v).reshape(o.shape)})
            p = jax.nn.softmax(z, -1)[jnp.arange(len(y)), y]
            np.testing.assert_allclose(got[i, t], float(jnp.mean(p)),
                                       rtol=1e-4, atol=1e-6)
    # the chunked lax.map and one vmap agree
    full = np.asarray(care._effects(
        jnp.asarray(cache.h), jnp.asarray(cache.out),
        jnp.asarray(cache.logits), jnp.asarray(y), jnp.asarray(kernel),
        jnp.asarray(values), cache.tail_vars, tail=cache.tail, chunk=0))
    np.testing.assert_allclose(got, full, rtol=1e-6, atol=1e-7)


def test_fold_equals_intervention_and_cost_matches_model():
    model, variables, _, problem = fixtures.tiny_mlp_problem()
    neurons = np.array([2, 7, 19])
    r = np.array([0.3, -2.0, 4.5], np.float32)
    newp, mask = care.fold(variables["params"], "dense2", neurons, r)
    x = problem.repair.x
    folded = model.apply({"params": newp}, x)
    cols = jnp.asarray(neurons)
    want = model.apply(variables, x, intervene={
        "relu1": lambda o: o.at[:, cols].multiply(jnp.asarray(r))})
    np.testing.assert_allclose(np.asarray(folded), np.asarray(want),
                               rtol=1e-5, atol=1e-5)
    assert masks.count(mask) == len(neurons) * 10
    assert fixtures.changed_outside(mask, variables["params"], newp) == 0
    # the cached cost == the cost recomputed from full forward passes
    neg = _fitness.cache_layer(model, variables, "dense2", problem.failing.x)
    pos = _fitness.cache_layer(model, variables, "dense2", problem.passing.x)
    kernel = np.asarray(variables["params"]["dense2"]["kernel"])
    cost = care.make_cost(neg, problem.failing.y, pos, problem.passing.y,
                          neurons, jnp.asarray(kernel[neurons]), 0.1)
    acc = lambda d: float(jnp.mean(model.predict({"params": newp}, d.x) == d.y))
    want_c = 0.9 * (1 - acc(problem.failing)) + 0.1 * (1 - acc(problem.passing))
    np.testing.assert_allclose(float(cost(jnp.asarray(r))), want_c, rtol=1e-6)
    np.testing.assert_allclose(float(cost(jnp.ones(3))), 0.9, rtol=1e-6)


def test_fix_repairs_deterministically_and_changes_only_the_rows():
    model, variables, _, problem = fixtures.tiny_mlp_problem()
    cfg = fixers.get("care").config(TINY)
    res = care.fix(jax.random.key(0), problem, cfg)
    res2 = care.fix(jax.random.key(0), problem, cfg)
    for a, b in zip(jax.tree_util.tree_leaves(res.variables),
                    jax.tree_util.tree_leaves(res2.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    info = res.info
    neurons = np.asarray(info["neurons"])
    assert len(neurons) == 5 == int(info["num_neurons"])
    eff = np.asarray(info["effects"])
    assert eff.shape == (32,)
    assert np.min(eff[neurons]) >= np.max(np.delete(eff, neurons))
    # only the kernel rows of dense2 that read the repaired neurons change
    want_mask = np.zeros((32, 10), bool)
    want_mask[neurons] = True
    np.testing.assert_array_equal(np.asarray(res.mask["dense2"]["kernel"]),
                                  want_mask)
    assert fixtures.changed_outside(res.mask, variables["params"],
                                    res.variables["params"]) == 0
    k0 = np.asarray(variables["params"]["dense2"]["kernel"])
    k1 = np.asarray(res.variables["params"]["dense2"]["kernel"])
    np.testing.assert_allclose(
        k1[neurons], np.asarray(info["factors"])[:, None] * k0[neurons],
        rtol=1e-6)
    assert float(info["best_cost"]) <= float(info["initial_cost"])
    assert 0 < int(info["iterations"]) <= TINY["max_iterations"]
    assert search.stop_reason_name(info["stop_reason"]) in search.STOP_REASONS
    x, y = problem.repair.x, problem.repair.y
    rr = classification.flips(model.predict(variables, x),
                              model.predict(res.variables, x), y)["rr"]
    assert float(rr) > 0
    # a hidden layer further down (through Flatten): the input pixels of
    # dense1 are the neurons; runs and keeps the structure
    res_h = care.fix(jax.random.key(0), problem,
                     fixers.get("care").config(dict(TINY, layer="flatten")))
    assert fixtures.changed_outside(res_h.mask, variables["params"],
                                    res_h.variables["params"]) == 0
    assert masks.count(res_h.mask) == 5 * 32


def test_refuses_bad_inputs():
    model, variables, _, problem = fixtures.tiny_mlp_problem()
    cfg = fixers.get("care").config(TINY)
    with pytest.raises(ValueError, match="I_neg"):
        care.fix(jax.random.key(0), problem.replace(
            failing=problem.failing.take(np.zeros((0,), np.int32))), cfg)
    bad_x = np.array(problem.failing.x)
    bad_x[0, 0, 0, 0] = np.nan
    bad = problem.replace(failing=problem.failing.replace(x=jnp.asarray(bad_x)))
    with pytest.raises(ValueError, match="non-finite"):
        care.fix(jax.random.key(0), bad, cfg)
    with pytest.raises(ValueError, match="not be exact|no Dense"):
        care.fix(jax.random.key(0), problem,
                 fixers.get("care").config(dict(TINY, layer="dense1")))
