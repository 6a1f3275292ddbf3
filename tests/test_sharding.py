"""Every stacked axis sharded over 8 fake CPU devices equals one device, bit
for bit: the seed axis (prediction), Apricot's K reduced models (training)
and a search population (scoring inside the compiled search). One
subprocess each: the device count is fixed when JAX starts."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PREDICT = """
import jax, numpy as np
from dlfix_jax import seed_axis, models, predict
assert jax.local_device_count() == 8, jax.local_device_count()
m = models.get("lenet5")
st = seed_axis.stack_variables([m.init(jax.random.key(i)) for i in range(5)])
x = np.asarray(jax.random.normal(jax.random.key(9), (32, 28, 28, 1)))
fn = predict.model_logits(m)
a = seed_axis.map_seeds(fn, st, x, strategy="sharded")
b = seed_axis.map_seeds(fn, st, x, strategy="lax_map")
assert a.shape == (5, 32, 10), a.shape
assert np.array_equal(np.asarray(a), np.asarray(b))
print("ok")
"""

# K = 5 models over 8 devices also checks the padding of the stack.
_APRICOT = """
import jax, numpy as np
from dlfix_jax.fixers import apricot
from tests import fixtures
assert jax.local_device_count() == 8, jax.local_device_count()
model, v, ds, prob = fixtures.tiny_conv_problem()
out = {}
for strat in ("sharded", "lax_map"):
    cfg = apricot.default_config()
    cfg.update(num_rdlms=5, rdlm_per_class=20, rdlm_epochs=2, rdlm_lr=3e-3,
               rdlm_batch_size=64, rdlm_strategy=strat)
    out[strat], _ = apricot.train_rdlms(jax.random.key(3), model, prob.train,
                                        10, cfg, original=v)
a = jax.tree_util.tree_leaves(out["sharded"])
b = jax.tree_util.tree_leaves(out["lax_map"])
moved = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
            for x, y in zip(a, jax.tree_util.tree_leaves(v)))
assert moved > 1e-3, moved
for x, y in zip(a, b):
    assert x.shape[0] == 5, x.shape
    assert np.array_equal(np.asarray(x), np.asarray(y))
print("ok")
"""

# An Arachne-style cached fitness (the last Dense layer of a LeNet5), DE with
# a population of 21 (not a multiple of 8), and the constriction PSO jitted
# and vmapped over two keys with a fitness closing over a traced scale.
_POPULATION = """
import jax, jax.numpy as jnp, numpy as np
from dlfix_jax import models, search
from dlfix_jax.fixers import _fitness
assert jax.local_device_count() == 8, jax.local_device_count()
m = models.get("lenet5")
v = m.init(jax.random.key(0))
x = np.asarray(jax.random.uniform(jax.random.key(1), (300, 28, 28, 1)))
y = jnp.asarray(np.arange(300) % 10, jnp.int32)
cache = _fitness.cache_layer(m, v, "dense3", x)
rows, cols = np.array([0, 3, 7, 20, 50]), np.array([1, 4, 4, 9, 0])
w0 = jnp.asarray(np.asarray(v["params"]["dense3"]["kernel"])[rows, cols])
z = _fitness.candidate_logits(cache, rows, cols, w0)
fit = lambda c: _fitness.correct_score(z(c), y)
init = w0 + 0.1 * jax.random.normal(jax.random.key(2), (21, 5))

def same(a, b):
    return all(np.array_equal(np.asarray(p), np.asarray(q), equal_nan=True)
               for p, q in zip(a, b))

de = {s: search.de(jax.random.key(3), fit, init, -1.0, 1.0,
                   max_generations=8, population_strategy=s)
      for s in ("sharded", "lax_map")}
assert int(de["sharded"].evaluations) == 21 * 9
assert same(de["sharded"], de["lax_map"])

def pso(k, scale, s):
    return search.pso_constriction(k, lambda c: scale * fit(c), init,
                                   max_iterations=6, population_strategy=s)
keys = jax.random.split(jax.random.key(4), 2)
scales = jnp.asarray([1.0, 2.0])
p = {s: jax.jit(jax.vmap(lambda k, sc, s=s: pso(k, sc, s)))(keys, scales)
     for s in ("sharded", "lax_map")}
assert same(p["sharded"], p["lax_map"])
print("ok")
"""


def _run(script):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


@pytest.mark.parametrize("script", [_PREDICT, _APRICOT, _POPULATION],
                         ids=["seeds_predict", "apricot_k_models",
                              "search_population"])
def test_sharded_stack_is_bit_identical_to_one_device(script):
    _run(script)


def test_auto_table_names_its_tasks_and_unmeasured_backends():
    from dlfix_jax import seed_axis as sa
    assert sa.resolve_strategy("auto", "cpu", "train") == "sequential"
    assert sa.resolve_strategy("auto", "cpu", "population") == "lax_map"
    assert sa.population_strategy(False, backend="cpu") == "lax_map"
    assert sa.population_strategy(True, backend="cpu") == "vmap"
    assert sa.population_strategy(True, "sharded") == "sharded"
    assert all(sa.is_measured("cpu", t) for t in sa.TASKS)
    for b in ("gpu", "tpu"):
        assert not any(sa.is_measured(b, t) for t in sa.TASKS)
    assert sa.fixer_seed_mode("auto", vmappable=True, backend="cpu") == \
        "sequential"
    assert sa.fixer_seed_mode("auto", vmappable=True, backend="gpu") == "vmap"
    assert sa.fixer_seed_mode("vmap", vmappable=True) == "vmap"
    assert sa.fixer_seed_mode("auto", vmappable=False) == "sequential"
    with pytest.raises(ValueError, match="not one jittable"):
        sa.fixer_seed_mode("sharded")


def test_stack_mapper_maps_several_arguments_alike():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from dlfix_jax import seed_axis as sa

    def fn(a, b, c):
        return {"y": jnp.tanh(a["w"] @ b) * c, "n": jnp.sum(b)}

    a = {"w": jax.random.normal(jax.random.key(0), (5, 3, 4))}
    b = jax.random.normal(jax.random.key(1), (5, 4))
    out = {s: sa.map_stacked(fn, a, b, 2.0, strategy=s, mapped=2)
           for s in ("sequential", "vmap", "lax_map", "sharded")}
    for s, o in out.items():
        assert o["y"].shape == (5, 3) and o["n"].shape == (5,)
        np.testing.assert_allclose(o["y"], out["sequential"]["y"], rtol=1e-6)
    np.testing.assert_array_equal(out["sharded"]["y"], out["lax_map"]["y"])
    with pytest.raises(ValueError, match="mapped"):
        sa.stack_mapper(fn, "vmap", "predict", 0)


def test_auto_mapper_is_cached_per_resolved_strategy(monkeypatch):
    """``"auto"`` is resolved before the mapper cache: a changed table
    gives the mapper of the new strategy, not the stale one."""
    import jax
    import numpy as np
    from dlfix_jax import seed_axis as sa

    def fn(v, x):
        return v * x

    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.setitem(sa.AUTO_STRATEGY, ("cpu", "predict"), "vmap")
    m_vmap = sa.stack_mapper(fn, "auto", "predict")
    assert m_vmap is sa.stack_mapper(fn, "vmap", "predict")
    monkeypatch.setitem(sa.AUTO_STRATEGY, ("cpu", "predict"), "lax_map")
    m_map = sa.stack_mapper(fn, "auto", "predict")
    assert m_map is sa.stack_mapper(fn, "lax_map", "predict")
    assert m_map is not m_vmap
    v = np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(m_vmap(v, 2.0)),
                                  np.asarray(m_map(v, 2.0)))
