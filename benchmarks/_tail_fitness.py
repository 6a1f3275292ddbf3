"""The measurement of ``benchmarks/tail_fitness.py`` as a function (no absl
flags), shared with ``benchmarks/device_check.py``."""

import os
import time


def measure(model, variables, n=5000, population=100,
            fractions=(0.02, 0.2, 0.4, 0.6, 1.0), k2=5, rounds=3,
            label="") -> list[dict]:
    """Both forms of ``_fitness.tail_logits`` for ``k1 = fraction x d``
    genes in the first Dense layer of ``model`` plus ``k2`` in the second
    (``benchmarks/tail_fitness.py``'s docstring); one row per fraction,
    printed as it is measured."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dlfix_jax import masks, seed_axis
    from dlfix_jax.fixers import _fitness
    from dlfix_jax.models import base as models_base

    params = variables["params"]
    dense = [s.name for s in model.layers if s.kind == "dense"]
    if len(dense) < 2:
        raise ValueError(f"{label or model.name}: needs two Dense layers, "
                         f"has {dense}")
    layers = tuple(dense[:2])
    shapes = [np.shape(models_base.get_layer_params(params, n_)["kernel"])
              for n_ in layers]
    d = shapes[0][0]
    strategy = seed_axis.population_strategy(False)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(n,) + tuple(model.input_shape)).astype(np.float32)
    cache = _fitness.cache_layer(model, variables, layers[0], x)
    h, out = jnp.asarray(cache.h), jnp.asarray(cache.out)
    print(f"model {label or model.name}; {layers[0]} {shapes[0]}, "
          f"{layers[1]} {shapes[1]}; backend {jax.default_backend()}, "
          f"strategy {strategy}, load {os.getloadavg()}", flush=True)

    @jax.jit
    def score(pop, setup):
        fn = _fitness.tail_logits(setup, h, out)
        return seed_axis.map_traced(lambda v: jnp.sum(fn(v), axis=0), pop,
                                    strategy)

    rows = []
    for frac in fractions:
        k1 = max(1, min(int(round(float(frac) * d)), int(np.prod(shapes[0]))))
        lay = np.r_[np.zeros(k1, np.int32), np.ones(k2, np.int32)]
        idx = np.concatenate([
            np.stack(np.unravel_index(
                rng.choice(int(np.prod(s)), k, replace=False), s), 1)
            for s, k in zip(shapes, (k1, k2))])
        mask = masks.kernel_entries_mask(params, layers, lay, idx)
        w0 = np.asarray(masks.gather(params, masks.indices_of(mask)),
                        np.float32)
        pop = jnp.asarray(w0 + 0.01 * rng.standard_normal(
            (population, w0.size)).astype(np.float32))
        auto = _fitness.tail_setup(model, variables, mask, layers).low_rank
        setups = {low: _fitness.tail_setup(model, variables, mask, layers,
                                           low_rank=low)
                  for low in (True, False)}
        outs = {low: jax.block_until_ready(score(pop, s))
                for low, s in setups.items()}
        best = {True: float("inf"), False: float("inf")}
        for _ in range(rounds):
            for low, s in setups.items():
                t0 = time.perf_counter()
                jax.block_until_ready(score(pop, s))
                best[low] = min(best[low], time.perf_counter() - t0)
        # on each candidate's logits summed over the inputs
        diff = float(jnp.max(jnp.abs(outs[True] - outs[False])
                             / (jnp.abs(outs[False]) + 1e-6)))
        row = {"d": int(d), "k1": k1, "k2": k2, "n": n,
               "population": population, "strategy": strategy,
               "low_rank_ms": 1e3 * best[True], "full_ms": 1e3 * best[False],
               "ratio_low_over_full": best[True] / best[False],
               "rule_picks": "low_rank" if auto else "full",
               "max_rel_diff": diff}
        rows.append(row)
        print(f"k1 {k1:4d} ({k1 / d:.2f} d): low rank "
              f"{row['low_rank_ms']:7.1f} ms, full {row['full_ms']:7.1f} ms,"
              f" ratio {row['ratio_low_over_full']:.2f}; rule: "
              f"{row['rule_picks']}; max rel diff {diff:.1e}", flush=True)
    return rows
