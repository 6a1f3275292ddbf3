"""Editable Training on the tiny models of tests/fixtures.py: the edit loss,
the editor (it flips the edited input's prediction to the target), the
second-order meta-gradient, and the fixer (repairs, deterministic, finite,
BatchNorm models)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlfix_jax import fixers
from dlfix_jax import predict
from dlfix_jax.data.source import Source
from dlfix_jax.fixers import editable_training as et
from dlfix_jax.metrics.classification import flips
from dlfix_jax.models import zoo
from dlfix_jax.models.layers import spec
from tests import fixtures

TINY = dict(epochs=0.5, eval_every_epochs=0.25, eval_batch_size=256)


def _cfg(**kw):
    return fixers.fixer_config(fixers.get("editable_training"),
                               {**TINY, **kw})


def test_registered_with_the_original_defaults():
    s = fixers.get("editable_training")
    assert (s.level, s.abbrev, s.vmappable) == ("model", "ET", False)
    c = s.default_config()
    assert (c.batch_size, c.lr, c.max_norm, c.stability_coeff,
            c.editability_coeff, c.editor_lr, c.beta_init, c.max_steps,
            c.patience, c.drawdown_edits) == (128, 1e-3, 10.0, 0.01, 0.01,
                                              1e-3, 0.5, 10, 500, 10)
    with pytest.raises(ValueError, match="edit_mode"):
        _cfg(edit_mode="parallel")
    with pytest.raises(ValueError, match="beta_init"):
        _cfg(beta_init=1.5)


def test_edit_loss_is_the_relu_margin():
    logits = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]]))
    # Row 0 already has target 0 on top -> 0; row 1: log .5 - log .2.
    got = et.edit_loss(logits, jnp.array([0, 0]))
    np.testing.assert_allclose(got, 0.5 * np.log(0.5 / 0.2), rtol=1e-6)
    assert float(et.edit_loss(logits[:1], jnp.array([0]))) == 0.0
    # With a margin the satisfied row costs margin - (log .7 - log .2) > 0.
    m = et.edit_loss(logits[:1], jnp.array([0]), margin=2.0)
    np.testing.assert_allclose(m, 2.0 - np.log(0.7 / 0.2), rtol=1e-6)


def test_editor_flips_the_edited_input_to_its_target():
    model, v, ds, prob = fixtures.tiny_mlp_problem()
    cfg = et.default_config()
    editor = et.init_editor(cfg)
    # Every failing input, toward its true label, at the defaults (k = 10),
    # and correct inputs toward a wrong label with k = 30 (a confident
    # prediction needs up to ~17 steps of the untrained editor): each edited
    # input ends up predicted as its target.
    runs = {k: et.edit_fn(model, cfg.editor_lr, k, cfg.margin, cfg.editor_eps)
            for k in (cfg.max_steps, 30)}
    cases = ([(prob.failing.x[i:i + 1], prob.failing.y[i:i + 1], 10)
              for i in range(len(prob.failing))]
             + [(prob.passing.x[i:i + 1], (prob.passing.y[i:i + 1] + 3) % 10,
                 30) for i in range(5)])
    for x, target, k in cases:
        assert int(model.predict(v, x)[0]) != int(target[0])
        params, loss, ok, steps = runs[k](v, editor, x, target)
        assert bool(ok) and float(loss) == 0.0
        assert 1 <= int(steps) <= k
        edited = {**v, "params": params}
        assert int(model.predict(edited, x)[0]) == int(target[0])
    run = runs[cfg.max_steps]
    # Freezing: an edit whose target is already predicted takes 0 steps and
    # leaves the parameters bit-for-bit unchanged.
    x, y = prob.passing.x[:1], prob.passing.y[:1]
    params, loss, ok, steps = run(v, editor, x, y)
    assert bool(ok) and int(steps) == 0
    for a, b in zip(jax.tree_util.tree_leaves(params),
                    jax.tree_util.tree_leaves(v["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_editable_layers_restrict_the_edit():
    model, v, ds, prob = fixtures.tiny_mlp_problem()
    cfg = et.default_config()
    run = et.edit_fn(model, 1e-2, 20, 0.0, 1e-6, "dense2")
    x, y = prob.failing.x[:1], prob.failing.y[:1]
    params, _, ok, _ = run(v, et.init_editor(cfg), x, y)
    assert bool(ok)
    np.testing.assert_array_equal(np.asarray(params["dense1"]["kernel"]),
                                  np.asarray(v["params"]["dense1"]["kernel"]))
    assert not np.array_equal(np.asarray(params["dense2"]["kernel"]),
                              np.asarray(v["params"]["dense2"]["kernel"]))
    with pytest.raises(KeyError, match="nope"):
        et.editable_mask(model, "nope")


def test_meta_gradient_goes_through_the_editor_steps():
    """beta only enters the loss through the k in-graph editor steps, so a
    non-zero d loss / d beta that matches finite differences shows that the
    loop differentiates through them (second order)."""
    model, v, ds, prob = fixtures.tiny_mlp_problem()
    cfg = et.default_config()
    loss_fn = et.meta_loss(model, cfg.editor_lr, cfg.max_steps, cfg.margin,
                           cfg.editor_eps, 0.01, 1.0)
    x = np.asarray(ds.train.x[:33], np.float32)
    y = np.asarray(ds.train.y[:33], np.int32)

    def f(beta, key):
        tv = {"params": {"model": v["params"], "editor": {"beta": beta}}}
        return loss_fn(tv, (x, y), key)

    # A step key whose random edit label needs at least 2 editor steps (the
    # first RMSProp step does not depend on beta).
    key = next(k for k in (jax.random.key(i) for i in range(50))
               if float(f(jnp.float32(0.5), k)[1][1]["edit_steps"]) >= 2)
    g = float(jax.grad(lambda b: f(b, key)[0])(jnp.float32(0.5)))
    assert g != 0.0
    h = 1e-2
    fd = float((f(jnp.float32(0.5 + h), key)[0]
                - f(jnp.float32(0.5 - h), key)[0]) / (2 * h))
    np.testing.assert_allclose(g, fd, rtol=0.1, atol=1e-4)


def test_fix_repairs_deterministic_and_finite():
    model, v, ds, prob = fixtures.tiny_mlp_problem()
    cfg = _cfg()
    a = et.fix(jax.random.key(7), prob, cfg)
    b = et.fix(jax.random.key(7), prob, cfg)
    for x, y in zip(jax.tree_util.tree_leaves(a.variables),
                    jax.tree_util.tree_leaves(b.variables)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert np.isfinite(np.asarray(x)).all()
    info = a.info
    assert info["train_steps"] == round(0.5 * prob.train.steps_per_epoch(129))
    assert len(info["valid_acc_trace"]) == len(info["drawdown_trace"]) >= 2
    assert info["n_edits"] == len(prob.failing) == len(info["edit_success"])
    assert 0.0 <= info["beta"] <= 1.0 and info["beta"] != 0.5  # learned
    po = model.predict(v, prob.repair.x)
    pf = model.predict(a.variables, prob.repair.x)
    assert float(flips(po, pf, prob.repair.y)["rr"]) > 0
    assert info["failing_fixed"] > 0
    c = et.fix(jax.random.key(8), prob, cfg)
    assert not np.array_equal(np.asarray(c.variables["params"]["dense2"]
                                         ["kernel"]),
                              np.asarray(a.variables["params"]["dense2"]
                                         ["kernel"]))


def test_batch_edit_mode_makes_one_joint_edit():
    model, v, ds, prob = fixtures.tiny_mlp_problem()
    res = et.fix(jax.random.key(7), prob,
                 _cfg(epochs=0.0, edit_mode="batch", fix_max_steps=50))
    assert res.info["train_steps"] == 0
    assert res.info["edit_success"].shape == (1,)
    pf = predict.predict(model, res.variables, prob.failing.x)
    if bool(res.info["edit_success"][0]):
        np.testing.assert_array_equal(pf, np.asarray(prob.failing.y))
    assert res.info["failing_fixed"] > 0


def _bn_problem():
    model = zoo.sequential("tiny_bn", [
        spec("conv", "conv1", features=4, kernel=(3, 3)),
        spec("bn", "bn1"), spec("relu", "relu1"),
        spec("maxpool", "pool1", window=(4, 4)), spec("flatten", "flatten"),
        spec("dense", "dense1", features=10)], (28, 28, 1), 10)
    _, _, ds, _ = fixtures.tiny_mlp_problem()
    v = fixtures.train(model, ds, 40, 3e-3)
    return model, v, ds, fixers.make_problem(model, v, ds)


def test_batchnorm_model_edits_in_inference_mode():
    model, v, ds, prob = _bn_problem()
    assert model.has_batch_norm and len(prob.failing) > 0
    res = et.fix(jax.random.key(1), prob, _cfg(epochs=0.25))
    for leaf in jax.tree_util.tree_leaves(res.variables):
        assert np.isfinite(np.asarray(leaf)).all()
    # Training updated the running statistics; the edits did not touch them
    # (they are not parameters), and BN scale/shift are editable parameters.
    assert not np.array_equal(np.asarray(res.variables["batch_stats"]["bn1"]
                                         ["mean"]),
                              np.asarray(v["batch_stats"]["bn1"]["mean"]))
    assert res.info["failing_fixed"] > 0


def test_applicability():
    s = fixers.get("editable_training")
    lenet = zoo.get("lenet5")
    assert s.applicable(fixtures.info_of(lenet, n_train=100)) is None
    assert s.applicable(fixtures.info_of(lenet, n_train=100,
                                         streaming=True)) is None
    assert "training set" in s.applicable(fixtures.info_of(lenet))


def test_streamed_training_data_runs():
    model, v, ds, prob = fixtures.tiny_mlp_problem()

    class Stream:
        def __init__(self, split, bs=100):
            self.split, self.bs = split, bs

        def __len__(self):
            return len(self.split)

        def __iter__(self):
            for i in range(0, len(self.split), self.bs):
                yield self.split.take(slice(i, i + self.bs))

    streamed = prob.replace(train=Source(Stream(ds.train), "train"))
    assert streamed.info.streaming
    res = et.fix(jax.random.key(7), streamed, _cfg(epochs=0.25))
    assert res.info["train_steps"] > 0
    for leaf in jax.tree_util.tree_leaves(res.variables):
        assert np.isfinite(np.asarray(leaf)).all()
