"""The shared training loop: steps, masking, fit selection/patience, K models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlfix_jax import masks, predict
from dlfix_jax.data.source import Source
from dlfix_jax.metrics import timing
from dlfix_jax.training import loop
from tests import fixtures


def _setup():
    model, variables, ds, _ = fixtures.tiny_mlp_problem()
    tx = loop.optimizer("adam", 1e-3)
    return model, variables, ds, tx, loop.make_step(loop.xent(model), tx)


def test_factories_are_cached_so_steps_compile_once():
    model, variables, ds, tx, step = _setup()
    assert loop.optimizer("adam", 1e-3) is tx
    assert loop.xent(model) is loop.xent(fixtures.tiny_mlp())
    assert loop.make_step(loop.xent(fixtures.tiny_mlp()), tx) is step
    src = Source(ds.train)
    key = jax.random.key(0)
    loop.fit(key, variables, src.take_steps(key, 32, 3), step_fn=step, tx=tx,
             num_steps=3)
    with timing.Timer() as t:
        loop.fit(key, variables, src.take_steps(key, 32, 3), step_fn=step,
                 tx=tx, num_steps=3)
    assert t.n_compiles == 0


def test_fit_is_deterministic_and_lowers_the_loss():
    model, variables, ds, tx, step = _setup()
    src = Source(ds.train)
    key = jax.random.key(3)
    a = loop.fit(key, variables, src.take_steps(key, 64, 40), step_fn=step,
                 tx=tx, num_steps=40, check_every=10)
    b = loop.fit(key, variables, src.take_steps(key, 64, 40), step_fn=step,
                 tx=tx, num_steps=40, check_every=10)
    for x, y in zip(jax.tree_util.tree_leaves(a.variables),
                    jax.tree_util.tree_leaves(b.variables)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.steps == 40 and int(a.state.step) == 40
    assert a.totals["loss"] / 40 < 2.3


def test_masked_step_leaves_unmasked_parameters_bit_exact():
    model, variables, ds, _, _ = _setup()
    tx = loop.optimizer("sgd", 0.5, momentum=0.9, weight_decay=1e-2)
    step = loop.make_step(loop.xent(model), tx, masked=True)
    mask = masks.unit_mask(variables["params"], "dense1", [0, 3, 7])
    src = Source(ds.train)
    key = jax.random.key(1)
    res = loop.fit(key, variables, src.take_steps(key, 32, 5), step_fn=step,
                   tx=tx, num_steps=5, mask=mask)
    assert fixtures.changed_outside(mask, variables["params"],
                                    res.variables["params"]) == 0
    moved = np.asarray(res.variables["params"]["dense1"]["kernel"][:, 0]
                       != variables["params"]["dense1"]["kernel"][:, 0])
    assert moved.any()


def test_best_selection_and_patience():
    model, variables, ds, tx, step = _setup()
    src = Source(ds.train)
    key = jax.random.key(2)
    scores = iter([0.5, 0.9, 0.1, 0.2, 0.3, 0.4, 0.5])
    seen = []

    def eval_fn(v):
        seen.append(v)
        return next(scores)

    res = loop.fit(key, variables, src.take_steps(key, 16, 70), step_fn=step,
                   tx=tx, num_steps=70, eval_fn=eval_fn, eval_every=10,
                   select="best", patience=3)
    assert res.stop_reason == "patience" and res.steps == 50
    assert res.best_step == 20 and res.best_score == 0.9
    for a, b in zip(jax.tree_util.tree_leaves(res.variables),
                    jax.tree_util.tree_leaves(seen[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="needs an eval_fn"):
        loop.fit(key, variables, [], step_fn=step, tx=tx, num_steps=1,
                 select="best")


def test_non_finite_loss_raises():
    model, variables, ds, tx, step = _setup()
    bad = jax.tree_util.tree_map(lambda a: a * jnp.nan, variables)
    src = Source(ds.train)
    key = jax.random.key(0)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        loop.fit(key, bad, src.take_steps(key, 16, 2), step_fn=step, tx=tx,
                 num_steps=2)


def test_fit_many_sequential_equals_vmap():
    model, variables, ds, tx, step = _setup()
    src = Source(ds.train)
    keys = [jax.random.key(i) for i in range(3)]
    inits = [model.init(k) for k in keys]

    def iters():
        return [src.take_steps(k, 32, 6) for k in keys]

    seq = loop.fit_many(keys, inits, iters(), step_fn=step, tx=tx,
                        num_steps=6, strategy="sequential")
    vm = loop.fit_many(keys, inits, iters(), step_fn=step, tx=tx,
                       num_steps=6, strategy="vmap")
    for a, b in zip(seq, vm):
        for x, y in zip(jax.tree_util.tree_leaves(a),
                        jax.tree_util.tree_leaves(b)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                       rtol=1e-4, atol=1e-5)
    x = np.asarray(ds.test.x)
    assert predict.predict(model, seq[0], x).shape == (len(x),)
