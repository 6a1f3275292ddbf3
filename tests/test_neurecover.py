"""NeuRecover: regressions, localisation by hand, refusal without history,
and a tiny end-to-end fix on the tiny MLP with a two-checkpoint history."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dlfix_jax.fixers as fixers
from dlfix_jax.fixers import neurecover as nr
from dlfix_jax.models import zoo
from tests import fixtures

TINY = dict(particles=20, max_iterations=20)


history_problem = fixtures.tiny_history_problem


def test_refuses_without_history():
    s = fixers.get("neurecover")
    assert (s.level, s.abbrev, s.vmappable) == ("neuron", "NR", True)
    _, _, _, plain = fixtures.tiny_mlp_problem()
    reason = s.applicable(plain.info)
    assert isinstance(reason, str) and "history" in reason
    assert "history" in s.applicable(fixtures.info_of(zoo.get("lenet5"),
                                                      history_len=1))
    assert s.applicable(fixtures.info_of(zoo.get("lenet5"),
                                         history_len=2)) is None
    with pytest.raises(ValueError, match="history"):
        nr.fix(jax.random.key(0), plain, s.config(TINY))
    _, _, _, p = history_problem()
    assert s.applicable(p.info) is None
    with pytest.raises(ValueError, match="localisation"):
        s.config(dict(localisation="first"))


def test_regressions_hand_made():
    y = np.array([0, 1, 2, 3, 4, 5])
    prev = np.array([0, 1, 9, 9, 4, 0])   # ok ok  x  x ok  x
    last = np.array([0, 9, 2, 9, 7, 5])   # ok  x ok  x  x ok
    deg, imp = nr.regressions(prev, last, y)
    np.testing.assert_array_equal(deg, [0, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(imp, [0, 0, 1, 0, 0, 1])


def test_suspiciousness_and_localised_set_by_hand():
    # diffnorm = [1, 3, 0] / 4; finorm_deg = [1, 0, 1]/2; finorm_imp = [3, 1, 0]/4
    susp = nr.suspiciousness([1.0, 3.0, 0.0], [1.0, 0.0, 1.0],
                             [3.0, 1.0, 0.0])
    want0 = (0.5 / (0.5 + 0.75)) * 0.25
    np.testing.assert_allclose(susp, [want0, 0.0, 0.0])
    assert nr.num_localised(10, want0, 1.0) == 1      # round(1.0)
    assert nr.num_localised(10, 0.25, 1.0) == 2       # round(2.5) = 2
    # flat positions 0..5: top_3 of each ranking
    delta = np.array([5., -4, 3, 0, 0, 0])            # {0, 1, 2}
    fi_deg = np.array([1., 1, 1, 0, 0, 0])            # {0, 1, 2}
    g_deg = np.array([0., 2, 2, 2, 0, 0])             # {1, 2, 3}
    fi_imp = np.array([0., 0, 9, 0, 9, 9])            # {2, 4, 5}
    g_imp = np.array([0., 0, 9, 9, 9, 0])             # {2, 3, 4}
    got = nr.localised_set(delta, fi_deg, g_deg, fi_imp, g_imp, 3)
    np.testing.assert_array_equal(got, [1])           # {1,2} - {2,4}
    got = nr.localised_set(delta, fi_deg, g_deg, fi_imp, g_imp, 3,
                           has_imp=False)
    np.testing.assert_array_equal(got, [1, 2])
    assert len(nr.localised_set(delta, fi_deg, g_deg, fi_imp, g_imp, 0)) == 0


def test_localise_equals_a_naive_computation():
    model, v, _, p = history_problem()
    prev, last = p.history
    x, y = np.asarray(p.repair.x), np.asarray(p.repair.y)
    loc = nr.localise(model, v, prev, last, x, y, ("dense2",))
    ok0 = np.asarray(model.predict(prev, x)) == y
    ok1 = np.asarray(model.predict(last, x)) == y
    np.testing.assert_array_equal(loc["deg"], ok0 & ~ok1)
    np.testing.assert_array_equal(loc["imp"], ~ok0 & ok1)
    deg, imp = loc["deg"], loc["imp"]
    assert deg.sum() > 0 and imp.sum() > 0

    P = v["params"]
    names = [("dense1", "bias"), ("dense1", "kernel"), ("dense2", "bias"),
             ("dense2", "kernel")]   # tree_flatten order (sorted keys)
    dmean = np.array([np.abs(np.asarray(last["params"][a][b], np.float64)
                             - np.asarray(prev["params"][a][b])).mean()
                      for a, b in names])
    h1 = lambda xs: np.asarray(xs, np.float64).reshape(len(xs), -1)
    h2 = lambda xs: np.maximum(h1(xs) @ np.asarray(P["dense1"]["kernel"])
                               + np.asarray(P["dense1"]["bias"]), 0.0)

    def fi(h, w):   # mean_x |a_i w_ij| with the (N, d, C) tensor
        return np.mean(np.abs(h[:, :, None] * np.asarray(w)[None]), axis=0)
    fis = {}
    for s, sel in (("deg", deg), ("imp", imp)):
        fis[s] = {"dense1": fi(h1(x[sel]), P["dense1"]["kernel"]),
                  "dense2": fi(h2(x[sel]), P["dense2"]["kernel"])}
    fd = np.array([0, fis["deg"]["dense1"].mean(), 0,
                   fis["deg"]["dense2"].mean()])
    fm = np.array([0, fis["imp"]["dense1"].mean(), 0,
                   fis["imp"]["dense2"].mean()])
    dn, fdn, fmn = dmean / dmean.sum(), fd / fd.sum(), fm / fm.sum()
    susp = fdn / (fdn + fmn + (fdn == 0)) * dn
    n = {l: int(round(np.size(P[l]["kernel"]) * susp[i]))
         for l, i in (("dense1", 1), ("dense2", 3))}
    assert loc["num_per_layer"] == n and loc["layers"] == ("dense2",)

    def ce_grad(sel):   # |d sum CE / dW2| through the whole model
        def loss(w):
            pp = {"dense1": P["dense1"],
                  "dense2": {"kernel": w, "bias": P["dense2"]["bias"]}}
            z = model.apply({"params": pp}, x[sel])
            return jnp.sum(jax.nn.logsumexp(z, -1)
                           - jnp.take_along_axis(z, y[sel][:, None], -1)[:, 0])
        return np.abs(np.asarray(jax.grad(loss)(P["dense2"]["kernel"])))

    k = n["dense2"]
    top = lambda s: set(np.argsort(-np.ravel(s), kind="stable")[:k].tolist())
    dW = np.asarray(last["params"]["dense2"]["kernel"], np.float64) - np.asarray(
        prev["params"]["dense2"]["kernel"])
    want = ((top(np.abs(dW)) & top(fis["deg"]["dense2"]) & top(ce_grad(deg)))
            - (top(fis["imp"]["dense2"]) & top(ce_grad(imp))))
    got = set(np.ravel_multi_index(tuple(loc["indices"].T), (32, 10)).tolist())
    assert got == want and len(got) > 0
    np.testing.assert_array_equal(loc["layer"], 0)

    # every Dense kernel (the default): the same rule on dense1, whose CE
    # gradient goes through relu1 and dense2
    loc_all = nr.localise(model, v, prev, last, x, y)
    assert loc_all["layers"] == ("dense1", "dense2")
    np.testing.assert_array_equal(loc_all["per_layer"]["dense2"],
                                  loc["indices"])

    def ce_grad1(sel):
        def loss(w):
            pp = {"dense1": {"kernel": w, "bias": P["dense1"]["bias"]},
                  "dense2": P["dense2"]}
            z = model.apply({"params": pp}, x[sel])
            return jnp.sum(jax.nn.logsumexp(z, -1)
                           - jnp.take_along_axis(z, y[sel][:, None], -1)[:, 0])
        return np.abs(np.asarray(jax.grad(loss)(P["dense1"]["kernel"])))

    k1 = n["dense1"]
    top1 = lambda s: set(np.argsort(-np.ravel(s), kind="stable")[:k1].tolist())
    dW1 = (np.asarray(last["params"]["dense1"]["kernel"], np.float64)
           - np.asarray(prev["params"]["dense1"]["kernel"]))
    want1 = ((top1(np.abs(dW1)) & top1(fis["deg"]["dense1"])
              & top1(ce_grad1(deg)))
             - (top1(fis["imp"]["dense1"]) & top1(ce_grad1(imp))))
    k1_shape = np.shape(P["dense1"]["kernel"])
    got1 = set(np.ravel_multi_index(
        tuple(loc_all["per_layer"]["dense1"].T), k1_shape).tolist())
    assert got1 == want1 and len(got1) > 0
    sel1 = loc_all["layer"] == 0
    np.testing.assert_array_equal(loc_all["indices"][sel1],
                                  loc_all["per_layer"]["dense1"])
    np.testing.assert_array_equal(loc_all["indices"][~sel1], loc["indices"])


def test_fix_last_layer_option_changes_only_the_localised_logits():
    model, variables, _, problem = history_problem()
    cfg = fixers.get("neurecover").config(dict(TINY, localisation="last"))
    res = fixtures.assert_deterministic_and_repairs(nr.fix, problem, cfg)
    idx = np.asarray(res.info["localised"])
    want = np.zeros((32, 10), bool)
    want[idx[:, 0], idx[:, 1]] = True
    np.testing.assert_array_equal(np.asarray(res.mask["dense2"]["kernel"]),
                                  want)
    assert not np.asarray(res.mask["dense1"]["kernel"]).any()
    assert fixtures.changed_outside(res.mask, variables["params"],
                                    res.variables["params"]) == 0
    assert float(res.info["best_fitness"]) >= float(
        np.nanmax(np.asarray(res.info["fitness_trace"])))
    assert int(res.info["num_regressions"]) == 31
    np.testing.assert_array_equal(np.asarray(res.info["localised_layer"]), 0)


def test_fix_default_searches_every_dense_kernel_jointly():
    """The default (the original's) localises in dense1 AND dense2 on the
    history problem, searches both at once (forward from dense1), and
    changes nothing outside the localised entries."""
    model, variables, _, problem = history_problem()
    assert fixers.get("neurecover").config().localisation == "all"
    cfg = fixers.get("neurecover").config(dict(TINY, num_positive=0))
    res = fixtures.assert_deterministic_and_repairs(nr.fix, problem, cfg)
    lay = np.asarray(res.info["localised_layer"])
    idx = np.asarray(res.info["localised"])
    assert set(lay.tolist()) == {0, 1}
    assert int(res.info["num_localised"]) == len(idx) == len(lay)
    P = variables["params"]
    for i, name in enumerate(("dense1", "dense2")):
        want = np.zeros(np.shape(P[name]["kernel"]), bool)
        want[idx[lay == i, 0], idx[lay == i, 1]] = True
        np.testing.assert_array_equal(np.asarray(res.mask[name]["kernel"]),
                                      want)
        assert not np.asarray(res.mask[name]["bias"]).any()
    assert fixtures.changed_outside(res.mask, variables["params"],
                                    res.variables["params"]) == 0
    # both layers really moved (the joint search wrote into each)
    for name in ("dense1", "dense2"):
        assert not np.array_equal(np.asarray(P[name]["kernel"]),
                                  np.asarray(res.variables["params"][name]
                                             ["kernel"]))
    # the batched tail fitness (forward from dense1's cached input) is the
    # full model's: with P = all passing inputs (num_positive = 0) the
    # reported best fitness is recomputed from the returned variables
    def full_fitness(v):
        return float(nr.combine(
            model.apply(v, problem.failing.x), jnp.asarray(problem.failing.y),
            model.apply(v, problem.passing.x), jnp.asarray(problem.passing.y),
            1.0))
    np.testing.assert_allclose(float(res.info["best_fitness"]),
                               full_fitness(res.variables), rtol=1e-5)
    np.testing.assert_allclose(float(res.info["initial_fitness"]),
                               full_fitness(variables), rtol=1e-5)
    assert float(res.info["best_fitness"]) >= float(
        np.nanmax(np.asarray(res.info["fitness_trace"])))
    np.testing.assert_array_equal(np.asarray(res.info["num_per_layer"]),
                                  [1933, 54])


def test_refuses_non_finite_inputs_and_no_regression():
    model, variables, ds, problem = history_problem()
    cfg = fixers.get("neurecover").config(TINY)
    fx = np.asarray(problem.failing.x).copy()
    fx[0, 0, 0, 0] = np.nan
    bad = problem.replace(failing=dataclasses.replace(
        problem.failing, x=jnp.asarray(fx)))
    with pytest.raises(ValueError, match="non-finite"):
        nr.fix(jax.random.key(0), bad, cfg)
    same = problem.replace(history=(variables, variables))
    with pytest.raises(ValueError, match="no regression"):
        nr.fix(jax.random.key(0), same, cfg)


def test_fix_non_sequential_runs_the_whole_model():
    """A model without sequential layer specs (as ResNet18 / DenseNet121)
    localises the same weights and scores candidates by running the whole
    model from the inputs."""
    model, variables, ds, problem = history_problem()
    flat = dataclasses.replace(model, name="tiny_mlp_graph", layers=None)
    assert not flat.is_sequential
    prob = problem.replace(model=flat)
    cfg = fixers.get("neurecover").config(dict(TINY, num_positive=0))
    res = nr.fix(jax.random.key(0), prob, cfg)
    seq = nr.localise(model, variables, *problem.history, problem.repair.x,
                      problem.repair.y)
    got = {(int(l), int(r), int(c)) for l, (r, c) in zip(
        np.asarray(res.info["localised_layer"]),
        np.asarray(res.info["localised"]))}
    want = {(int(l), int(r), int(c))
            for l, (r, c) in zip(seq["layer"], seq["indices"])}
    assert got == want and {l for l, _, _ in got} == {0, 1}
    assert fixtures.changed_outside(res.mask, variables["params"],
                                    res.variables["params"]) == 0
    f = nr.combine(
        flat.apply(res.variables, problem.failing.x),
        jnp.asarray(problem.failing.y),
        flat.apply(res.variables, problem.passing.x),
        jnp.asarray(problem.passing.y), 1.0)
    np.testing.assert_allclose(float(res.info["best_fitness"]), float(f),
                               rtol=1e-5)
