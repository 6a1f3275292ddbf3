"""GenMuNN (our design from the abstracts): localisation, GA, acceptance."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dlfix_jax.fixers as fixers
from dlfix_jax import masks
from dlfix_jax.data import base as data_base
from dlfix_jax.data.source import Source
from dlfix_jax.fixers import genmunn
from dlfix_jax.metrics import classification
from dlfix_jax.models import base as models_base
from dlfix_jax.models import zoo
from dlfix_jax.models.layers import spec
from tests import fixtures

SMALL = {"population": 20, "n_parents": 5, "max_generations": 15}


def _cfg(**kw):
    return fixers.fixer_config(fixers.get("genmunn"), {**SMALL, **kw})


def _localised():
    model, variables, _, problem = fixtures.tiny_mlp_problem()
    layers, cut = genmunn.dense_layers(model, variables)
    h = np.asarray(model.apply(variables, problem.failing.x,
                               capture="dense1")[1]["dense1"]["input"])
    y = np.asarray(problem.failing.y, np.int32)
    return model, variables, problem, layers, genmunn.localise(
        model, variables, layers, cut, h, y, 0.01)


def test_importance_equals_a_naive_computation():
    model, variables, problem, layers, loc = _localised()
    assert layers == ("dense1", "dense2")
    params = variables["params"]
    x, y = problem.failing.x, problem.failing.y

    def naive(layer, i, j):
        # |d/de sum_n CE(model with W[i, j] + e)| * |W[i, j]|, full model.
        def loss(e):
            lp = dict(params[layer])
            lp["kernel"] = lp["kernel"].at[i, j].add(e)
            v = dict(variables)
            v["params"] = models_base.set_layer_params(params, layer, lp)
            z = model.apply(v, x)
            return jnp.sum(jax.nn.logsumexp(z, -1)
                           - jnp.take_along_axis(z, y[:, None], -1)[:, 0])
        return abs(float(jax.grad(loss)(0.0))) * abs(
            float(params[layer]["kernel"][i, j]))

    for layer in layers:
        imp = loc["importance"][layer]
        top = np.unravel_index(int(np.argmax(imp)), imp.shape)
        for i, j in [top, (0, 0), (imp.shape[0] - 1, imp.shape[1] - 1)]:
            np.testing.assert_allclose(imp[i, j], naive(layer, int(i), int(j)),
                                       rtol=1e-4, atol=1e-7)


def test_selects_exactly_one_percent_per_layer_by_importance():
    _, variables, _, layers, loc = _localised()
    params = variables["params"]
    assert genmunn.num_selected(784 * 32, 0.01) == 251
    assert genmunn.num_selected(32 * 10, 0.01) == 4
    assert genmunn.num_selected(100, 0.01) == 1
    for layer in layers:
        kernel = params[layer]["kernel"]
        m = np.asarray(loc["mask"][layer]["kernel"])
        assert m.sum() == loc["k"][layer] == math.ceil(0.01 * kernel.size)
        assert not np.asarray(loc["mask"][layer]["bias"]).any()
        imp = loc["importance"][layer]
        assert imp[m].min() >= imp[~m].max()
    assert masks.count(loc["mask"]) == 251 + 4


def test_repairs_deterministically_and_changes_only_the_mask():
    model, variables, _, problem = fixtures.tiny_mlp_problem()
    fix = fixers.get("genmunn").fix
    cfg = _cfg()
    res = fix(jax.random.key(0), problem, cfg)
    again = fix(jax.random.key(0), problem, cfg)
    for a, b in zip(jax.tree_util.tree_leaves(res.variables),
                    jax.tree_util.tree_leaves(again.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(res.info["outcome"]) == genmunn.ACCEPTED
    x, y = problem.repair.x, problem.repair.y
    flips = classification.flips(model.predict(variables, x),
                                 model.predict(res.variables, x), y)
    assert float(flips["rr"]) > 0
    assert float(res.info["valid_acc_after"]) >= float(
        res.info["valid_acc_before"])
    assert fixtures.changed_outside(res.mask, variables["params"],
                                    res.variables["params"]) == 0
    assert masks.count(res.mask) == int(res.info["num_localised"]) == 255
    # Some selected weight moved; the search stopped within its budget.
    assert fixtures.changed_outside(masks.empty_mask(variables["params"]),
                                    variables["params"],
                                    res.variables["params"]) > 0
    assert 0 < int(res.info["generations"]) <= SMALL["max_generations"]
    other = fix(jax.random.key(5), problem, cfg)
    assert not np.array_equal(
        np.asarray(other.variables["params"]["dense1"]["kernel"]),
        np.asarray(res.variables["params"]["dense1"]["kernel"]))


@pytest.mark.parametrize("low_rank_max", [None, 0.0])
def test_both_tail_forms_score_the_returned_model(monkeypatch, low_rank_max):
    """The Dense tail in either form of ``_fitness.tail_setup`` (the tiny
    MLP takes low rank by default; 0.0 forces the re-run matmul, the form
    the study's models take): the reported fitness and repair accuracy are
    the full model's, recomputed from the returned variables."""
    from dlfix_jax.fixers import _fitness
    if low_rank_max is not None:
        monkeypatch.setattr(_fitness, "LOW_RANK_MAX_FRACTION", low_rank_max)
    forms = []
    setup_fn = _fitness.tail_setup

    def spy(*a, **k):
        setup = setup_fn(*a, **k)
        forms.append(setup.low_rank)
        return setup

    monkeypatch.setattr(_fitness, "tail_setup", spy)
    model, variables, _, problem = fixtures.tiny_mlp_problem()
    res = fixers.get("genmunn").fix(jax.random.key(0), problem, _cfg())
    assert forms == [low_rank_max is None]
    assert int(res.info["outcome"]) == genmunn.ACCEPTED

    def predict(split):
        return np.asarray(model.predict(res.variables, split.x))

    y_rep = np.concatenate([np.asarray(problem.passing.y),
                            np.asarray(problem.failing.y)])
    ok = np.concatenate([predict(problem.passing), predict(problem.failing)]
                        ) == y_rep
    n_pos = len(problem.passing.y)
    acc = ok.mean()
    nfr = (~ok[:n_pos]).sum() / max(n_pos, 1)
    np.testing.assert_allclose(float(res.info["repair_acc_after"]), acc,
                               rtol=1e-6)
    np.testing.assert_allclose(float(res.info["accepted_fitness"]),
                               acc + (1 - nfr) / (len(y_rep) + 1), rtol=1e-6)
    assert float(res.info["accepted_fitness"]) > float(
        res.info["initial_fitness"])


def test_validation_drop_returns_the_original():
    model, variables, _, problem = fixtures.tiny_mlp_problem()
    # Validation = the failing repair inputs labelled with the original's
    # predictions: the original is 100% right on it, and any mutant that
    # repairs a failing input (the only way to raise the repair accuracy)
    # changes one of those predictions, so the validation accuracy drops.
    x = np.asarray(problem.failing.x)
    pred = np.asarray(model.predict(variables, x), np.int32)
    valid = Source(data_base.Split(x, pred), "valid")
    prob = problem.replace(valid=valid)
    res = fixers.get("genmunn").fix(jax.random.key(0), prob, _cfg())
    assert int(res.info["outcome"]) == genmunn.VALIDATION_DROP
    assert float(res.info["best_fitness"]) > float(
        res.info["initial_fitness"])
    assert float(res.info["valid_acc_best"]) < float(
        res.info["valid_acc_before"]) == 1.0
    for a, b in zip(jax.tree_util.tree_leaves(res.variables),
                    jax.tree_util.tree_leaves(variables)):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint32),
                                      np.asarray(b).view(np.uint32))
    summary = fixers.summarize_info(fixers.get("genmunn"), res.info)
    assert summary["outcome_name"] == "validation_drop"


def test_refusals():
    spec_ = fixers.get("genmunn")
    conv_only = zoo.sequential("conv_only", [
        spec("conv", "c1", features=2, kernel=(1, 1)), spec("gap", "g")],
        (4, 4, 1), 2)
    assert "Dense" in spec_.applicable(fixtures.info_of(conv_only,
                                                        n_valid=10))
    assert "validation" in spec_.applicable(
        fixtures.info_of(zoo.get("lenet5"), n_valid=0))
    assert spec_.applicable(fixtures.info_of(zoo.get("lenet5"),
                                             n_valid=10)) is None
    _, variables, _, problem = fixtures.tiny_mlp_problem()
    bad = jax.tree_util.tree_map(lambda a: a, variables)
    bad["params"] = dict(bad["params"])
    bad["params"]["dense2"] = dict(bad["params"]["dense2"])
    b = bad["params"]["dense2"]["bias"]
    bad["params"]["dense2"]["bias"] = b.at[0].set(jnp.nan)
    with pytest.raises(ValueError, match="non-finite"):
        spec_.fix(jax.random.key(0), problem.replace(variables=bad), _cfg())
    nan_x = problem.failing.replace(x=problem.failing.x.at[0].set(jnp.nan))
    with pytest.raises(ValueError, match="activations.*non-finite"):
        spec_.fix(jax.random.key(0), problem.replace(failing=nan_x), _cfg())
    with pytest.raises(ValueError, match="n_parents"):
        fixers.fixer_config(spec_, {"population": 10, "n_parents": 10})
