"""Shared tiny models and problems for the fixer tests (built on the
library's own training loop; cached per process).

* :func:`tiny_mlp_problem` — Flatten -> Dense 32 -> ReLU -> Dense 10 on the
  embedded digits, trained for few steps so the repair set has failing
  inputs.
* :func:`tiny_conv_problem` — Conv 4@3x3 -> ReLU -> MaxPool 4 -> Flatten ->
  Dense 32 -> ReLU -> Dense 10, trained to about 90%.

Both return ``(model, variables, dataset, problem)``.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from dlfix_jax import data as data_lib
from dlfix_jax import fixers
from dlfix_jax.data.source import Source
from dlfix_jax.fixers import base
from dlfix_jax.metrics import classification
from dlfix_jax.models import zoo
from dlfix_jax.models.layers import spec
from dlfix_jax.training import loop


def tiny_mlp():
    layers = [spec("flatten", "flatten"), spec("dense", "dense1", features=32),
              spec("relu", "relu1"), spec("dense", "dense2", features=10)]
    return zoo.sequential("tiny_mlp", layers, (28, 28, 1), 10)


def tiny_conv():
    return zoo.sequential("tiny_conv", [
        spec("conv", "conv1", features=4, kernel=(3, 3)), spec("relu", "relu1"),
        spec("maxpool", "pool1", window=(4, 4)), spec("flatten", "flatten"),
        spec("dense", "dense1", features=32), spec("relu", "relu2"),
        spec("dense", "dense2", features=10)], (28, 28, 1), 10)


def train(model, ds, steps: int, lr: float, batch_size: int = 64, seed=0):
    """Trains ``model`` on ``ds.train`` with the shared loop (Adam)."""
    tx = loop.optimizer("adam", lr)
    key = jax.random.key(seed)
    res = loop.fit(key, model.init(key),
                   Source(ds.train).take_steps(key, batch_size, steps),
                   step_fn=loop.make_step(loop.xent(model), tx), tx=tx,
                   num_steps=steps)
    return res.variables


@functools.lru_cache(maxsize=None)
def tiny_mlp_problem(steps: int = 60):
    ds = data_lib.load("digits", seed=0)
    model = tiny_mlp()
    variables = train(model, ds, steps, 3e-3, batch_size=128)
    return model, variables, ds, fixers.make_problem(model, variables, ds)


@functools.lru_cache(maxsize=None)
def tiny_conv_problem(steps: int = 150):
    ds = data_lib.load("digits", seed=0)
    model = tiny_conv()
    variables = train(model, ds, steps, 3e-3)
    return model, variables, ds, fixers.make_problem(model, variables, ds)


def info_of(model, **kw) -> base.ProblemInfo:
    """A ProblemInfo of ``model`` for applicability checks."""
    return base.ProblemInfo(model=model, num_classes=model.num_classes, **kw)


def changed_outside(mask, old, new) -> int:
    """Number of parameter entries that differ (bitwise) outside ``mask``."""
    bad = 0
    leaves_m = jax.tree_util.tree_leaves(
        mask, is_leaf=lambda a: isinstance(a, (bool, np.bool_)))
    for m, a, b in zip(leaves_m, jax.tree_util.tree_leaves(old),
                       jax.tree_util.tree_leaves(new)):
        a, b = np.asarray(a), np.asarray(b)
        diff = a.view(np.uint32) != b.view(np.uint32)
        m = np.broadcast_to(np.asarray(m, bool), a.shape)
        bad += int(np.sum(diff & ~m))
    return bad


@functools.lru_cache(maxsize=None)
def tiny_history_problem():
    """The tiny MLP trained 40 Adam steps (checkpoint T-1), then 3 more at a
    higher learning rate (T, the repaired model): 39 of 200 repair inputs
    fail, 31 of them regressions. Returns ``(model, variables, ds,
    problem)`` with ``problem.history == (T-1, T)``."""
    ds = data_lib.load("digits", seed=0)
    model = tiny_mlp()
    prev = train(model, ds, 40, 3e-3, batch_size=128)
    tx = loop.optimizer("adam", 1e-2)
    key = jax.random.key(1)
    last = loop.fit(key, prev, Source(ds.train).take_steps(key, 128, 3),
                    step_fn=loop.make_step(loop.xent(model), tx), tx=tx,
                    num_steps=3).variables
    return model, last, ds, fixers.make_problem(model, last, ds,
                                                history=(prev, last))


def assert_deterministic_and_repairs(fix, problem, cfg, key=0):
    """Runs ``fix`` twice with one key: bit-equal variables and RR > 0 on
    the repair set. Returns the first result."""
    res = fix(jax.random.key(key), problem, cfg)
    res2 = fix(jax.random.key(key), problem, cfg)
    for a, b in zip(jax.tree_util.tree_leaves(res.variables),
                    jax.tree_util.tree_leaves(res2.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x, y = problem.repair.x, problem.repair.y
    model = problem.model
    rr = float(classification.flips(model.predict(problem.variables, x),
                                    model.predict(res.variables, x), y)["rr"])
    assert rr > 0, "repaired nothing on the repair set"
    return res
