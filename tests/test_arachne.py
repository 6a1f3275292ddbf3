"""Arachne: localisation, cached fitness, and a tiny end-to-end fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dlfix_jax.fixers as fixers
from dlfix_jax import masks, search
from dlfix_jax.fixers import _fitness, _localize, arachne
from dlfix_jax.models import zoo
from dlfix_jax.models.layers import spec
from tests.fixtures import info_of
from tests.fixtures import tiny_mlp_problem as tiny_problem


def test_pareto_front():
    g = np.array([3.0, 2.0, 1.0, 3.0, 0.5, 2.0])
    f = np.array([1.0, 2.0, 3.0, 0.5, 3.0, 2.0])
    # (3,1), (2,2) twice, (1,3) are non-dominated; (3,.5) and (.5,3) are not
    assert _localize.pareto_front(g, f).tolist() == [True, True, True, False,
                                                    False, True]


def test_bounds_push_away_from_zero():
    assert arachne.bounds(np.array([-1.0, 2.0])) == (-2.0, 4.0)
    assert arachne.bounds(np.array([0.5, 2.0])) == (0.25, 4.0)
    assert arachne.bounds(np.array([-3.0, -1.0])) == (-6.0, -0.5)


def test_applicability():
    assert arachne.applicable(info_of(zoo.get("lenet5"))) is None
    assert arachne.applicable(info_of(zoo.get("resnet18"))) is None
    from dlfix_jax.models.layers import spec
    conv_last = zoo.sequential("c", [spec("conv", "c1", features=2, kernel=(1, 1)),
                                     spec("gap", "g")], (4, 4, 1), 2)
    reason = arachne.applicable(info_of(conv_last))
    assert isinstance(reason, str) and "Dense" in reason
    assert fixers.get("arachne").level == "neuron"
    assert fixers.get("arachne").abbrev == "AR"


def test_localise_and_cached_fitness_match_model():
    model, variables, ds, problem = tiny_problem()
    layer = arachne.target_layer(model)
    assert layer == "dense2"
    lp = variables["params"][layer]
    k, b = np.asarray(lp["kernel"]), np.asarray(lp["bias"])
    neg = _fitness.cache_layer(model, variables, layer, problem.failing.x, 64)
    h_neg = neg.h
    y_neg = np.asarray(problem.failing.y)
    loc1 = arachne.localise(k, b, h_neg, y_neg, 20)
    loc2 = arachne.localise(k, b, h_neg, y_neg, 20)
    np.testing.assert_array_equal(loc1["indices"], loc2["indices"])
    idx = loc1["indices"]
    assert 0 < len(idx) <= loc1["num_candidates"] <= k.size
    # gradient matches autodiff of the summed cross-entropy
    def loss(w):
        z = model.apply({"params": {**variables["params"],
                                    layer: {"kernel": w, "bias": lp["bias"]}}},
                        problem.failing.x)
        return jnp.sum(jax.nn.logsumexp(z, -1)
                       - jnp.take_along_axis(z, problem.failing.y[:, None], -1)[:, 0])
    np.testing.assert_allclose(loc1["grad"], np.abs(jax.grad(loss)(lp["kernel"])),
                               rtol=1e-3, atol=1e-4)
    # cached fitness == fitness recomputed from a full forward pass
    pos = _fitness.cache_layer(model, variables, layer, problem.passing.x, 64)
    rows, cols = jnp.asarray(idx[:, 0]), jnp.asarray(idx[:, 1])
    fit = arachne.make_fitness(
        pos, problem.passing.y, neg, problem.failing.y, rows, cols,
        jnp.asarray(k[idx[:, 0], idx[:, 1]]), 2.0)
    v = jnp.asarray(k[idx[:, 0], idx[:, 1]]) + 0.3
    mask = masks.weight_mask(variables["params"], layer, idx)
    newp = masks.scatter(variables["params"], masks.indices_of(mask), v)

    def part(x, y):
        z = model.apply({"params": newp}, x)
        lo = jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, y[:, None], -1)[:, 0]
        ok = jnp.argmax(z, -1) == y
        return jnp.sum(ok) + jnp.sum(jnp.where(ok, 0.0, 1.0 / (lo + 1.0)))

    want = part(problem.passing.x, problem.passing.y) + 2.0 * part(
        problem.failing.x, problem.failing.y)
    np.testing.assert_allclose(float(fit(v)), float(want), rtol=1e-4)


def test_fix_improves_fitness_and_reports():
    model, variables, ds, problem = tiny_problem()
    cfg = fixers.get("arachne").config(dict(population=20, max_generations=10,
                                            num_positive=50))
    res = arachne.fix(jax.random.key(0), problem, cfg)
    info = res.info
    assert float(info["best_fitness"]) >= float(info["initial_fitness"])
    assert int(info["num_localised"]) == len(info["localised"]) > 0
    assert masks.count(res.mask) == int(info["num_localised"])
    assert 0 < int(info["generations"]) <= 10
    assert search.stop_reason_name(info["stop_reason"]) in search.STOP_REASONS
    # only kernel entries of the last layer change; bias untouched
    np.testing.assert_array_equal(np.asarray(res.variables["params"]["dense2"]["bias"]),
                                  np.asarray(variables["params"]["dense2"]["bias"]))
    with pytest.raises(ValueError, match="I_neg"):
        arachne.fix(jax.random.key(0), problem.replace(failing=problem.failing.take(
            np.zeros((0,), np.int32))), cfg)


def test_hidden_layer_cached_fitness_matches_the_model():
    """The cached fitness of a hidden Dense layer runs the tail (split_at)."""
    model, variables, ds, problem = tiny_problem()
    cache = _fitness.cache_layer(model, variables, "dense1", problem.repair.x)
    assert cache.tail is not None
    k = np.asarray(variables["params"]["dense1"]["kernel"])
    rows, cols = np.array([0, 5, 9]), np.array([1, 2, 3])
    v = jnp.asarray(k[rows, cols]) - 0.7
    z = _fitness.candidate_logits(cache, rows, cols, k[rows, cols])(v)
    newk = k.copy()
    newk[rows, cols] = np.asarray(v)
    p = {**variables["params"],
         "dense1": {**variables["params"]["dense1"], "kernel": newk}}
    want = model.apply({"params": p}, problem.repair.x)
    np.testing.assert_allclose(np.asarray(z), np.asarray(want), rtol=1e-4,
                               atol=1e-4)


# ---------------------------------------------------------------------------
# Options (issue 9): localisation="all", localiser="coinse", num_positive
# ---------------------------------------------------------------------------

from tests.fixtures import changed_outside  # noqa: E402
from tests.fixtures import tiny_conv_problem  # noqa: E402


def _cfg(**kw):
    return fixers.get("arachne").config({"population": 20,
                                         "max_generations": 10, **kw})


def _set_score(model, variables, split):
    z = model.apply(variables, split.x)
    return float(_fitness.correct_score(z, split.y))


def test_option_defaults_and_check_config():
    cfg = arachne.default_config()
    assert cfg.localisation == "last" and cfg.localiser == "eai"
    assert cfg.num_positive == 0 and cfg.patch_aggr == 1.0
    for bad in (dict(localisation="every"), dict(localiser="deepfl")):
        with pytest.raises(ValueError, match="not one of"):
            arachne.check_config(_cfg(**bad))


def test_all_localisation_on_mlp_changes_only_localised_weights():
    model, variables, ds, problem = tiny_problem()
    res = arachne.fix(jax.random.key(0), problem, _cfg(localisation="all"))
    assert int(res.info["num_localised"]) > 0
    assert changed_outside(res.mask, variables["params"],
                           res.variables["params"]) == 0
    ok = jnp.argmax(model.apply(res.variables, problem.failing.x), -1)
    assert int(jnp.sum(ok == problem.failing.y)) > 0          # RR > 0


def test_all_localisation_spans_layers_and_forwards_from_the_cache():
    """On the tiny conv net the coinse front covers both Dense layers; the
    DE's fitness (cached input of dense1, tail of the model) equals the
    full model's, before and after the repair."""
    model, variables, ds, problem = tiny_conv_problem()
    cfg = _cfg(localisation="all", localiser="coinse")
    res = arachne.fix(jax.random.key(0), problem, cfg)
    info = res.info
    lay = np.asarray(info["localised_layer"])
    assert set(lay.tolist()) == {0, 1}                       # dense1, dense2
    assert changed_outside(res.mask, variables["params"],
                           res.variables["params"]) == 0
    assert masks.count(res.mask) == int(info["num_localised"]) == len(lay)
    for name in ("dense1", "dense2"):                        # both changed
        assert not np.array_equal(
            np.asarray(res.variables["params"][name]["kernel"]),
            np.asarray(variables["params"][name]["kernel"]))
        np.testing.assert_array_equal(
            np.asarray(res.variables["params"][name]["bias"]),
            np.asarray(variables["params"][name]["bias"]))
    want0 = (_set_score(model, variables, problem.passing)
             + _set_score(model, variables, problem.failing))
    np.testing.assert_allclose(float(info["initial_fitness"]), want0,
                               rtol=1e-5)
    want1 = (_set_score(model, res.variables, problem.passing)
             + _set_score(model, res.variables, problem.failing))
    np.testing.assert_allclose(float(info["best_fitness"]), want1, rtol=1e-5)
    ok = jnp.argmax(model.apply(res.variables, problem.failing.x), -1)
    assert int(jnp.sum(ok == problem.failing.y)) > 0          # RR > 0
    # deterministic for a key, and vmappable over keys
    res2 = arachne.fix(jax.random.key(0), problem, cfg)
    np.testing.assert_array_equal(
        np.asarray(res.variables["params"]["dense1"]["kernel"]),
        np.asarray(res2.variables["params"]["dense1"]["kernel"]))
    small = _cfg(localisation="all", localiser="coinse", population=8,
                 max_generations=2)
    keys = jax.random.split(jax.random.key(1), 2)
    batched = jax.vmap(arachne.fix, in_axes=(0, None, None))(keys, problem,
                                                              small)
    one = arachne.fix(keys[1], problem, small)
    np.testing.assert_allclose(
        np.asarray(batched.variables["params"]["dense1"]["kernel"][1]),
        np.asarray(one.variables["params"]["dense1"]["kernel"]), rtol=1e-6,
        atol=1e-6)


def test_coinse_localiser_scores_passing_inputs():
    model, variables, ds, problem = tiny_problem()
    params = variables["params"]
    layer = "dense2"
    negs = {layer: _fitness.cache_layer(model, variables, layer,
                                        problem.failing.x)}
    poss = {layer: _fitness.cache_layer(model, variables, layer,
                                        problem.passing.x)}
    args = (params, (layer,), negs, problem.failing.y, poss, problem.passing.y,
            20)
    eai = arachne.localise_layers(*args, "eai")
    coinse = arachne.localise_layers(*args, "coinse")
    # "eai" over the last layer is exactly today's localisation
    k = np.asarray(params[layer]["kernel"])
    b = np.asarray(params[layer]["bias"])
    old = arachne.localise(k, b, negs[layer].h, np.asarray(problem.failing.y),
                           20)
    np.testing.assert_array_equal(eai["indices"], old["indices"])
    # coinse: cost_neg / (1 + cost_pos) per weight, front over all weights
    g_n, f_n = arachne.layer_scores(k, b, negs[layer], problem.failing.y)
    g_p, f_p = arachne.layer_scores(k, b, poss[layer], problem.passing.y)
    np.testing.assert_allclose(coinse["grad"][layer], g_n / (1 + g_p))
    np.testing.assert_allclose(coinse["fi"][layer], f_n / (1 + f_p))
    flat = _localize.bidirectional(g_n / (1 + g_p), f_n / (1 + f_p), 0)
    np.testing.assert_array_equal(
        coinse["indices"], np.stack(np.unravel_index(flat, k.shape), 1))
    assert not np.array_equal(coinse["indices"], eai["indices"])
    # end to end: differs from eai, deterministic
    r1 = arachne.fix(jax.random.key(0), problem, _cfg(localiser="coinse"))
    r2 = arachne.fix(jax.random.key(0), problem, _cfg(localiser="coinse"))
    r0 = arachne.fix(jax.random.key(0), problem, _cfg())
    np.testing.assert_array_equal(np.asarray(r1.info["localised"]),
                                  coinse["indices"])
    assert not np.array_equal(np.asarray(r1.info["localised"]),
                              np.asarray(r0.info["localised"]))
    for a, b2 in zip(jax.tree_util.tree_leaves(r1.variables),
                     jax.tree_util.tree_leaves(r2.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b2))


def test_num_positive_pairs_with_eai_fitness():
    model, variables, ds, problem = tiny_problem()
    layer = "dense2"
    k = np.asarray(variables["params"][layer]["kernel"])
    neg = _fitness.cache_layer(model, variables, layer, problem.failing.x)
    pos = _fitness.cache_layer(model, variables, layer, problem.passing.x)
    rows, cols = np.array([0, 3]), np.array([1, 2])
    w0 = k[rows, cols]
    fit = arachne.make_fitness(pos, problem.passing.y, neg, problem.failing.y,
                               rows, cols, w0, 2.0, form="eai")

    def term(split):
        z = model.apply(variables, split.x)
        loss, ok = _fitness.cross_entropy_and_correct(z, split.y)
        return (float(jnp.mean(ok)) + 1) / (float(jnp.mean(loss)) + 1)

    np.testing.assert_allclose(float(fit(jnp.asarray(w0))),
                               2.0 * term(problem.failing)
                               + term(problem.passing), rtol=1e-5)
    res = arachne.fix(jax.random.key(0), problem, _cfg(num_positive=50))
    # eAI's scale: each term is at most 2 (coinse's counts ~ |I_pos|)
    assert 0 < float(res.info["initial_fitness"]) <= 4.0


def test_grad_scores_match_a_direct_gradient_and_compile_once():
    """``_localize.grad_scores``: |dCE/dkernel| summed over batches equals
    one jax.grad over all inputs; a second call compiles nothing."""
    from dlfix_jax.fixers import _localize
    from dlfix_jax.metrics import timing
    from tests import fixtures
    model, variables, ds, _ = fixtures.tiny_mlp_problem()
    x, y = np.asarray(ds.test.x[:50]), np.asarray(ds.test.y[:50], np.int32)
    got = _localize.grad_scores(model, variables, "dense2", x, y,
                                batch_size=16)

    def loss(w):
        p = dict(variables["params"])
        p["dense2"] = dict(p["dense2"], kernel=w)
        z = model.apply({**variables, "params": p}, jnp.asarray(x))
        return -jnp.sum(jax.nn.log_softmax(z)[jnp.arange(len(y)), y])

    want = np.abs(np.asarray(jax.grad(loss)(
        variables["params"]["dense2"]["kernel"])))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    with timing.Timer() as t:
        _localize.grad_scores(model, variables, "dense2", x, y, batch_size=16)
    assert t.n_compiles == 0


def _check_tail_forms(model, variables, x, k1_low):
    """Genes in the first two Dense layers: ``k1`` in the first (low rank
    expected for ``k1_low``, the full form at ``k1 = d`` and beyond) and 4 in
    the second; both forms, through jit as a pytree, give the full model's
    logits with the genes written in."""
    params = variables["params"]
    layers = tuple(s.name for s in model.layers if s.kind == "dense")[:2]
    shapes = [np.shape(params[n]["kernel"]) for n in layers]
    d = shapes[0][0]
    cache = _fitness.cache_layer(model, variables, layers[0], x)
    logits = jax.jit(lambda v, s: _fitness.tail_logits(s, cache.h,
                                                       cache.out)(v))
    rng = np.random.default_rng(0)
    for k1, want_low in ((k1_low, True), (d, False), (d + 3, False)):
        lay = np.r_[np.zeros(k1, np.int32), np.ones(4, np.int32)]
        idx = np.concatenate([
            np.stack(np.unravel_index(rng.choice(int(np.prod(s)), k,
                                                 replace=False), s), 1)
            for s, k in zip(shapes, (k1, 4))])
        mask = masks.kernel_entries_mask(params, layers, lay, idx)
        g = masks.indices_of(mask)
        w0 = np.asarray(masks.gather(params, g), np.float32)
        v = jnp.asarray(w0 + rng.normal(0, 0.2, w0.shape).astype(np.float32))
        want = model.apply(masks.scatter_variables(variables, g, v), x)
        auto = _fitness.tail_setup(model, variables, mask, layers)
        assert auto.low_rank is want_low and auto.layer == layers[0]
        for low in (True, False):
            s = _fitness.tail_setup(model, variables, mask, layers,
                                    low_rank=low)
            assert s.first_genes.size == (k1 if low else 0)
            np.testing.assert_allclose(np.asarray(logits(v, s)),
                                       np.asarray(want), rtol=1e-4,
                                       atol=1e-5)
        assert not np.allclose(np.asarray(want), np.asarray(
            model.apply(variables, x)), atol=1e-3)   # the genes mattered


def test_tail_logits_both_forms_give_the_full_models_logits():
    """``_fitness.tail_logits`` (Arachne's and NeuRecover's multi-layer
    fitness): the low-rank form and the re-run matmul give the full model's
    logits, after a flatten (tiny conv net) and with the first Dense layer
    on the raw input (the tail is then the whole model); the automatic rule
    takes low rank below ``d`` genes in the earliest layer."""
    model, variables, ds, problem = tiny_conv_problem()
    _check_tail_forms(model, variables, problem.passing.x, 3)
    mlp = zoo.sequential("mlp_flat", [
        spec("dense", "dense1", features=16), spec("relu", "relu1"),
        spec("dense", "dense2", features=10)], (8,), 10)
    x = np.random.default_rng(1).normal(size=(50, 8)).astype(np.float32)
    _check_tail_forms(mlp, mlp.init(jax.random.key(0)), x, 3)
    with pytest.raises(ValueError, match="selects no kernel entry"):
        _fitness.tail_setup(mlp, mlp.init(jax.random.key(0)),
                            masks.empty_mask(
                                mlp.init(jax.random.key(0))["params"]),
                            ("dense1", "dense2"))
