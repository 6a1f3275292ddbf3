"""The contract every registered fixer must meet, on a tiny model.

One parameterized test per registered fixer name: finite variables of the
same tree structure, determinism for a key, RR > 0 on the repair set, an
applicability answer of None or a reason string, changes confined to the
declared mask (neuron/layer level), and ``jax.vmap`` over two keys for
vmappable fixers. Budgets are tiny (see ``SMALL``).
"""

import functools
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dlfix_jax.fixers as fixers
from dlfix_jax import data as data_lib
from dlfix_jax.metrics import classification
from dlfix_jax.models import zoo
from dlfix_jax.models.layers import spec

# Import the fixer modules that exist on disk (some land concurrently).
_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _m in ("arachne", "apricot", "ra"):
    if os.path.exists(os.path.join(_HERE, "dlfix_jax", "fixers", f"{_m}.py")):
        importlib.import_module(f"dlfix_jax.fixers.{_m}")

# Small budgets: generic keys, then per-fixer overrides (keys absent from a
# fixer's config are ignored).
SMALL = {"population": 20, "max_generations": 10, "iterations": 10}
SMALL_BY_FIXER = {
    "apricot": {"num_rdlms": 4, "rdlm_per_class": 60, "rdlm_epochs": 5,
                "rdlm_lr": 3e-3, "eta": 0.05, "retrain_epochs": 0.5,
                "retrain_lr": 1e-3, "max_passes": 3, "eval_batch_size": 256},
    "ra": {"num_passing": 100},
}


def tiny_model():
    """Flatten -> Dense 32 -> ReLU -> Dense 10 on 28x28x1 digits."""
    layers = [spec("flatten", "flatten"), spec("dense", "dense1", features=32),
              spec("relu", "relu1"), spec("dense", "dense2", features=10)]
    return zoo.sequential("tiny_mlp", layers, (28, 28, 1), 10)


@functools.lru_cache(maxsize=None)
def tiny_problem(steps: int = 60):
    """A briefly trained tiny MLP on the embedded digits, as a Problem.

    Trained for few steps so that the repair set has failing inputs.
    """
    ds = data_lib.load("digits", seed=0)
    model = tiny_model()
    variables = model.init(jax.random.key(0))
    tx = optax.adam(3e-3)
    x, y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)

    def loss(p):
        z = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    p, s = variables["params"], tx.init(variables["params"])
    for _ in range(steps):
        p, s = step(p, s)
    variables = {"params": p}
    return model, variables, ds, fixers.make_problem(model, variables, ds)


def _small_config(spec_):
    cfg = spec_.default_config()
    for k, v in {**SMALL, **SMALL_BY_FIXER.get(spec_.name, {})}.items():
        if k in cfg:
            cfg[k] = v
    return cfg


def _changed_outside(mask, old, new):
    """Number of parameter entries that differ outside ``mask``."""
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


@pytest.mark.parametrize("name", fixers.names())
def test_fixer_contract(name):
    spec_ = fixers.get(name)
    model, variables, ds, problem = tiny_problem()
    assert len(problem.failing) > 0

    reason = spec_.applicable(model, ds)
    assert reason is None or (isinstance(reason, str) and reason)
    if reason is not None:
        pytest.skip(f"{name} not applicable to the tiny model: {reason}")

    cfg = _small_config(spec_)
    key = jax.random.key(1)
    res = spec_.fix(key, problem, cfg)
    assert (jax.tree_util.tree_structure(res.variables)
            == jax.tree_util.tree_structure(variables))
    for leaf in jax.tree_util.tree_leaves(res.variables):
        assert np.all(np.isfinite(np.asarray(leaf)))

    res2 = spec_.fix(key, problem, cfg)
    for a, b in zip(jax.tree_util.tree_leaves(res.variables),
                    jax.tree_util.tree_leaves(res2.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    x, y = problem.repair.x, problem.repair.y
    pred0 = model.predict(variables, x)
    pred1 = model.predict(res.variables, x)
    rr = float(classification.flips(pred0, pred1, y)["rr"])
    assert rr > 0, f"{name} repaired nothing on the repair set"

    if spec_.level in ("neuron", "layer"):
        # Convention: info["mask"] is a mask over variables["params"].
        assert "mask" in res.info, f"{name} must expose info['mask']"
        assert _changed_outside(res.info["mask"], variables["params"],
                                res.variables["params"]) == 0

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
