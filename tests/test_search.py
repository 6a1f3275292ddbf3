"""Population search: convergence, determinism, early stop, bounds, vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlfix_jax import search

K = 4
OPT = 0.5


def neg_sphere(x):
    return -jnp.sum((x - OPT) ** 2)


def neg_rastrigin_lite(x):  # a few shallow local optima, optimum at OPT
    d = x - OPT
    return -(jnp.sum(d ** 2) + 0.5 * jnp.sum(1.0 - jnp.cos(2 * jnp.pi * d)))


def _init(key, p=24):
    return jax.random.uniform(key, (p, K), minval=-2.0, maxval=2.0)


RUNNERS = {
    "de": lambda key, f, init, **kw: search.de(key, f, init, -2.0, 2.0, **kw),
    "ga": lambda key, f, init, **kw: search.ga(
        key, f, init, -2.0, 2.0, sigma=0.2, mut_prob=0.5, **kw),
    "pso_gbest": lambda key, f, init, max_generations=100, **kw:
        search.pso_global_best(key, f, init, w=0.7, c1=1.5, c2=1.5,
                               lower=-2.0, upper=2.0,
                               max_iterations=max_generations, **kw),
    "pso_constriction": lambda key, f, init, max_generations=100, **kw:
        search.pso_constriction(key, f, init, v_max=1.0,
                                max_iterations=max_generations, **kw),
}


KEYS = jax.random.split(jax.random.key(0), 2)


@pytest.fixture(scope="module")
def results():
    """Each optimiser once, jitted and vmapped over keys (k0, k0, k1) on the
    sphere; DE and GA also on rastrigin-lite (one compile per entry)."""
    out = {}
    keys = jnp.stack([KEYS[0], KEYS[0], KEYS[1]])
    init = _init(jax.random.key(1))
    for name, run in RUNNERS.items():
        fns = [("sphere", neg_sphere)]
        if name in ("de", "ga"):
            fns.append(("rastrigin", neg_rastrigin_lite))
        for fname, f in fns:
            out[name, fname] = jax.jit(jax.vmap(
                lambda k, run=run, f=f: run(k, f, init, max_generations=80)))(keys)
    return out


def _row(r, i):
    return jax.tree_util.tree_map(lambda a: a[i], r)


@pytest.mark.parametrize("name", sorted(RUNNERS))
def test_reaches_near_optimum(results, name):
    for fname in ("sphere", "rastrigin"):
        if (name, fname) not in results:
            continue
        r = _row(results[name, fname], 0)
        assert float(r.best_fitness) > -1e-2, (name, fname, r.best_fitness)
        np.testing.assert_allclose(np.asarray(r.best_x), OPT, atol=0.1)
        # the trace is monotone (maximising) and ends at best_fitness
        tr = np.asarray(r.trace)
        g = int(r.generations)
        valid = tr[~np.isnan(tr)]
        assert np.all(np.diff(valid) >= -1e-6)
        np.testing.assert_allclose(tr[g], float(r.best_fitness), rtol=1e-6)
        assert np.all(np.isnan(tr[g + 1:]))


@pytest.mark.parametrize("name", sorted(RUNNERS))
def test_deterministic_and_key_sensitive(results, name):
    r = results[name, "sphere"]
    for a in r:  # rows 0 and 1 share a key
        np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(a[1]))
    assert not np.array_equal(np.asarray(r.best_x[0]), np.asarray(r.best_x[2]))


def test_vmap_matches_single_run(results):
    init = _init(jax.random.key(1))
    one = jax.jit(lambda k: search.de(k, neg_sphere, init, -2.0, 2.0,
                                      max_generations=80))(KEYS[1])
    r = _row(results["de", "sphere"], 2)
    np.testing.assert_allclose(np.asarray(r.best_x), np.asarray(one.best_x),
                               rtol=1e-5, atol=1e-6)
    assert int(r.generations) == int(one.generations)
    ga = _row(results["ga", "sphere"], 0)  # no patience -> full budget
    assert int(ga.generations) == 80
    assert search.stop_reason_name(ga.stop_reason) == "max_generations"


def test_minimize_flag():
    init = _init(jax.random.key(1))
    r = search.de(jax.random.key(0), lambda x: -neg_sphere(x), init, -2, 2,
                  max_generations=60, maximize=False)
    assert float(r.best_fitness) < 1e-2
    assert np.nanmax(np.diff(np.asarray(r.trace)[:int(r.generations) + 1])) <= 1e-6


def test_de_early_stop_on_flat_fitness():
    init = _init(jax.random.key(1))
    from dlfix_jax.search.de import default_patience
    assert default_patience(100) == 10 and default_patience(50) == 10
    assert default_patience(300) == 30
    r = search.de(jax.random.key(0), lambda x: jnp.float32(1.0), init, -2, 2,
                  max_generations=300)
    # patience 30; generation 1 sets the reference, then more than 30
    # unchanged generations -> stops at generation 32 (as coinse's DEAP code).
    assert search.stop_reason_name(r.stop_reason) == "unchanged"
    assert int(r.generations) == 32


def test_other_early_stops():
    init = _init(jax.random.key(1))
    flat = lambda x: jnp.float32(1.0)
    r = search.pso_constriction(jax.random.key(0), flat, init, patience=10)
    assert search.stop_reason_name(r.stop_reason) == "unchanged"
    assert int(r.generations) == 12  # eAI: stops at 0-based iteration 11
    r = search.pso_global_best(jax.random.key(0), flat, init, ftol=1e-3,
                               ftol_iter=5, lower=-2, upper=2)
    assert search.stop_reason_name(r.stop_reason) == "ftol"
    assert int(r.generations) == 6
    r = search.ga(jax.random.key(0), flat, init, -2, 2, patience=5)
    assert search.stop_reason_name(r.stop_reason) == "unchanged"
    assert int(r.generations) == 6


def test_bounds_respected():
    """The optimum lies outside the box: the best must sit on the bound."""
    init = jax.random.uniform(jax.random.key(1), (20, K), minval=-1, maxval=1)
    far = lambda x: -jnp.sum((x - 5.0) ** 2)
    de = search.de(jax.random.key(0), far, init, -1.0, 1.0, max_generations=30)
    for r in (de,
              search.ga(jax.random.key(0), far, init, -1.0, 1.0, max_generations=30),
              search.pso_global_best(jax.random.key(0), far, init, lower=-1.0,
                                     upper=1.0, max_iterations=30)):
        x = np.asarray(r.best_x)
        assert np.all(x <= 1.0) and np.all(x >= -1.0)
    np.testing.assert_allclose(np.asarray(de.best_x), 1.0, atol=5e-2)


def test_constriction_chi():
    from dlfix_jax.search.pso import constriction_chi
    assert abs(constriction_chi(4.1) - 0.7298) < 1e-3
    with pytest.raises(ValueError):
        constriction_chi(4.0)


@pytest.mark.parametrize("name", sorted(RUNNERS))
def test_population_strategies_agree(name):
    """The population is scored through the strategy layer: lax_map and
    sequential run the same per-candidate program (bit-identical); vmap and
    lax_map agree to float tolerance (here exactly: the sphere's reduction
    has 4 terms), so every search follows the same path."""
    init = _init(jax.random.key(1))
    run = RUNNERS[name]
    out = {s: jax.jit(lambda k, s=s: run(k, neg_rastrigin_lite, init,
                                         max_generations=15,
                                         population_strategy=s))(KEYS[0])
           for s in ("vmap", "lax_map", "sequential")}
    for a, b in zip(out["lax_map"], out["sequential"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(out["vmap"], out["lax_map"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    assert int(out["vmap"].evaluations) > 0


def test_population_strategy_is_checked():
    with pytest.raises(ValueError, match="unknown seed strategy"):
        search.de(jax.random.key(0), neg_sphere, _init(jax.random.key(1)),
                  -2.0, 2.0, max_generations=2, population_strategy="threads")
