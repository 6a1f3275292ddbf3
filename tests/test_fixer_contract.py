"""The contract every registered fixer must meet, on a tiny model.

One parameterized test per registered fixer name (the registry, not a list
here, decides what runs):

* its tiny budget below is a valid override of its config (strict keys);
* it refuses the problem of :data:`REFUSALS` with a reason (a string);
* on the tiny MLP: finite variables of the same tree structure, the same
  result for the same key, RR > 0 on the repair set;
* the second ``fix`` call with the same shapes compiles nothing;
* layer and neuron level: ``FixResult.mask`` is an element mask and every
  parameter outside it is bit-for-bit unchanged; model level: no mask;
* ``info`` summarises to valid JSON (no NaN tokens);
* ``vmappable`` fixers: ``jax.vmap`` over two keys equals two single calls.
"""

import json

import chex
import jax
import numpy as np
import pytest

import dlfix_jax.fixers as fixers
from dlfix_jax.metrics import classification
from dlfix_jax.metrics import timing
from dlfix_jax.models import zoo
from dlfix_jax.models.layers import spec
from tests import fixtures

# Tiny budgets, strictly checked against each fixer's config.
BUDGETS = {
    "vere": {"rounds": 10},
    "inner": {"probe_epochs": 10, "epochs": 5},
    "apricot": {"num_rdlms": 4, "rdlm_per_class": 60, "rdlm_epochs": 5,
                "rdlm_lr": 3e-3, "eta": 0.05, "retrain_epochs": 0.5,
                "retrain_lr": 1e-3, "max_passes": 3, "eval_batch_size": 256},
    "arachne": {"population": 20, "max_generations": 10},
    "ra": {"num_passing": 100, "slack_penalty": 1.0},
    "deeprepair": {"style_steps": 30, "style_width": 8, "epochs": 2,
                   "transfer_batch_size": 256},
    "editable_training": {"epochs": 2.0, "batch_size": 64, "max_steps": 5,
                          "fix_max_steps": 10, "eval_every_epochs": 1.0,
                          "eval_batch_size": 256},
    "fewshot_mix": {"epochs": 3.0, "batch_size": 64, "lr": 1e-3,
                    "eval_batch_size": 256},
    "hudd": {"max_clusters": 10, "epochs": 3, "batch_size": 64,
             "lr": 1e-2, "eval_batch_size": 256},
    "hybridrepair": {"tta_views": 2, "finetune_epochs": 1, "epochs": 2,
                     "tau_samples": 100, "density_k": 10,
                     "eval_batch_size": 256},
    "care": {"particles": 10, "max_iterations": 15},
    "genmunn": {"population": 20, "n_parents": 5, "max_generations": 15},
    "irepair": {"lr": 1e-3, "max_iters": 200},
    "minimal_modification": {"num_passing": 100, "time_limit_s": 30.0},
    "distrrep": {"particles": 20, "max_iterations": 15,
                 "merge_particles": 20, "merge_iterations": 15},
    "neurecover": {"particles": 20, "max_iterations": 20},
    # <- new fixers' tiny budgets go above this line
}

_CONV_LAST = zoo.sequential("conv_last", [
    spec("conv", "c1", features=2, kernel=(1, 1)), spec("gap", "g")],
    (4, 4, 1), 2)

# A problem each fixer must refuse (unadaptable), with a reason.
REFUSALS = {
    "vere": fixtures.info_of(zoo.get("resnet18")),  # not sequential
    "inner": fixtures.info_of(zoo.get("resnet18")),  # not sequential
    "apricot": fixtures.info_of(zoo.get("lenet5"), streaming=True),
    "arachne": fixtures.info_of(_CONV_LAST),
    "ra": fixtures.info_of(zoo.get("resnet18")),
    "deeprepair": fixtures.info_of(zoo.get("lenet5"), streaming=True),
    "editable_training": fixtures.info_of(zoo.get("lenet5"), n_train=0),
    "fewshot_mix": fixtures.info_of(zoo.get("lenet5"), n_train=0),
    "hudd": fixtures.info_of(zoo.get("lenet5"), streaming=True),
    "hybridrepair": fixtures.info_of(zoo.get("lenet5"), streaming=True),
    "care": fixtures.info_of(_CONV_LAST),  # no Dense to fold into
    "genmunn": fixtures.info_of(_CONV_LAST, n_valid=100),  # no Dense layer
    "irepair": fixtures.info_of(zoo.get("lenet5"), n_repair=5,
                                n_failing=5),  # no general set
    "minimal_modification": fixtures.info_of(zoo.get("resnet18")),
    "distrrep": fixtures.info_of(_CONV_LAST),  # no Dense logits layer
    "neurecover": fixtures.info_of(zoo.get("lenet5")),  # no history
    # <- new fixers' refusal cases go above this line
}

# Problems for fixers the tiny MLP cannot serve (default:
# fixtures.tiny_mlp_problem, which has no training history).
PROBLEMS = {
    "neurecover": fixtures.tiny_history_problem,  # two checkpoints
}


def _config(spec_):
    assert spec_.name in BUDGETS, (
        f"add a tiny budget for {spec_.name!r} to BUDGETS")
    return fixers.fixer_config(spec_, BUDGETS[spec_.name])


@pytest.mark.parametrize("name", fixers.names())
def test_refuses_with_a_reason(name):
    spec_ = fixers.get(name)
    assert name in REFUSALS, f"add a refusal case for {name!r} to REFUSALS"
    reason = spec_.applicable(REFUSALS[name])
    assert isinstance(reason, str) and reason


@pytest.mark.parametrize("name", fixers.names())
def test_fixer_contract(name):
    spec_ = fixers.get(name)
    model, variables, ds, problem = PROBLEMS.get(
        name, fixtures.tiny_mlp_problem)()
    assert len(problem.failing) > 0
    reason = spec_.applicable(problem.info)
    assert reason is None, f"{name} refuses the tiny MLP: {reason}"

    cfg = _config(spec_)
    key = jax.random.key(1)
    res = spec_.fix(key, problem, cfg)
    jax.block_until_ready(res.variables)
    chex.assert_trees_all_equal_shapes_and_dtypes(res.variables, variables)
    chex.assert_tree_all_finite(res.variables)

    with timing.Timer() as t:
        res2 = spec_.fix(key, problem, cfg)
        jax.block_until_ready(res2.variables)
    assert t.n_compiles == 0, (
        f"{name} recompiled {t.n_compiles}x on a second call with the same "
        "shapes")
    for a, b in zip(jax.tree_util.tree_leaves(res.variables),
                    jax.tree_util.tree_leaves(res2.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    x, y = problem.repair.x, problem.repair.y
    pred0 = model.predict(variables, x)
    pred1 = model.predict(res.variables, x)
    rr = float(classification.flips(pred0, pred1, y)["rr"])
    assert rr > 0, f"{name} repaired nothing on the repair set"

    if spec_.level in ("neuron", "layer"):
        assert res.mask is not None, f"{name} must return FixResult.mask"
        for m in jax.tree_util.tree_leaves(res.mask):
            assert np.asarray(m).dtype == bool
        assert fixtures.changed_outside(res.mask, variables["params"],
                                        res.variables["params"]) == 0
        assert fixers.base.mask_count(res.mask) > 0
    else:
        assert res.mask is None

    summary = fixers.summarize_info(spec_, res.info)
    json.dumps(summary, allow_nan=False)
    for key_, table in spec_.codes.items():
        assert key_ in res.info, f"{name}: code table for missing {key_!r}"
        assert f"{key_}_name" in summary and summary[f"{key_}_name"] in table

    if spec_.vmappable:
        keys = jax.random.split(jax.random.key(2), 2)
        out = jax.vmap(spec_.fix, in_axes=(0, None, None))(keys, problem, cfg)
        for a, b in zip(jax.tree_util.tree_leaves(out.variables),
                        jax.tree_util.tree_leaves(variables)):
            assert a.shape == (2,) + np.shape(b)
        single = spec_.fix(keys[1], problem, cfg)
        for a, b in zip(jax.tree_util.tree_leaves(out.variables),
                        jax.tree_util.tree_leaves(single.variables)):
            np.testing.assert_allclose(np.asarray(a[1]), np.asarray(b),
                                       rtol=1e-5, atol=1e-6)


def test_unknown_override_key_is_refused():
    with pytest.raises(KeyError, match="no config key 'populaton'"):
        fixers.fixer_config(fixers.get("arachne"), {"populaton": 3})
    with pytest.raises(TypeError, match="expects a number"):
        fixers.fixer_config(fixers.get("arachne"), {"population": "many"})
    with pytest.raises(ValueError, match="population=2 must be >= 4"):
        fixers.fixer_config(fixers.get("arachne"), {"population": 2})


def test_registry_refuses_a_second_registration_and_scopes_tests():
    spec_ = fixers.get("ra")
    with pytest.raises(ValueError, match="registered twice"):
        fixers.FIXERS.add("ra", spec_)
    with fixers.FIXERS.temporary(ra_copy=spec_):
        assert "ra_copy" in fixers.names()
    assert "ra_copy" not in fixers.names()
    with pytest.raises(KeyError, match="unknown fixer 'nope'.*arachne"):
        fixers.get("nope")
