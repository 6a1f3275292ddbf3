"""The measurement of ``benchmarks/population.py`` as a function (no absl
flags), shared with ``benchmarks/device_check.py``."""

import os
import time


def measure(cases=("logits", "hidden"), population=100, generations=20,
            n_pos=4946, n_neg=54, k=5, rounds=3,
            strategies=("vmap", "lax_map")) -> list[dict]:
    """DE on an Arachne-style cached fitness, the population scored under
    each strategy (``benchmarks/population.py``'s docstring); one row per
    (case, strategy), printed as it is measured."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dlfix_jax import models, search, seed_axis
    from dlfix_jax.fixers import _fitness
    from dlfix_jax.models import base as models_base

    autos = {case: seed_axis.population_strategy(case == "logits")
             for case in cases}
    print(f"backend {jax.default_backend()}, devices "
          f"{jax.local_device_count()}, auto per case {autos} (measured: "
          f"{seed_axis.is_measured(task='population')}), load "
          f"{os.getloadavg()}", flush=True)
    m = models.get("lenet5")
    v = m.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    n = n_pos + n_neg
    x = rng.uniform(size=(n,) + tuple(m.input_shape)).astype(np.float32)
    y = rng.integers(0, m.num_classes, n).astype(np.int32)
    P, G, K = population, generations, k
    rows = []
    for case in cases:
        layer = {"logits": "dense3", "hidden": "dense2"}[case]
        cache = _fitness.cache_layer(m, v, layer, x)
        pos, neg = cache.take(slice(0, n_pos)), cache.take(
            slice(n_pos, n))
        y_pos, y_neg = jnp.asarray(y[:n_pos]), jnp.asarray(
            y[n_pos:])
        d, units = cache.h.shape[1], cache.out.shape[1]
        r = rng.choice(d * units, K, replace=False)
        rows_, cols = r // units, r % units
        kernel = np.asarray(models_base.get_layer_params(
            v["params"], layer)["kernel"])
        w0 = jnp.asarray(kernel[rows_, cols], jnp.float32)
        zp = _fitness.candidate_logits(pos, rows_, cols, w0)
        zn = _fitness.candidate_logits(neg, rows_, cols, w0)

        def fitness(c):
            return (_fitness.correct_score(zp(c), y_pos)
                    + _fitness.correct_score(zn(c), y_neg))

        init = w0 + 0.05 * jax.random.normal(jax.random.key(1), (P, K))
        runs = {s: jax.jit(lambda key, s=s: search.de(
            key, fitness, init, -1.0, 1.0, max_generations=G,
            population_strategy=s)) for s in strategies}

        def timed(s):
            t0 = time.perf_counter()
            out = jax.block_until_ready(runs[s](jax.random.key(2)))
            return time.perf_counter() - t0, out

        first, outs = {}, {}
        for s in strategies:
            first[s], outs[s] = timed(s)
        best = {s: float("inf") for s in strategies}
        for _ in range(rounds):
            for s in strategies:
                best[s] = min(best[s], timed(s)[0])
        evals = int(outs[strategies[0]].evaluations)
        ref = outs[strategies[0]]
        for s in strategies:
            same = all(np.array_equal(np.asarray(a), np.asarray(b),
                                      equal_nan=True)
                       for a, b in zip(outs[s], ref))
            row = {"case": case, "layer": layer, "strategy": s,
                   "population": P, "generations": G, "k": K,
                   "n_pos": n_pos, "n_neg": n_neg,
                   "first_s": first[s], "best_s": best[s],
                   "evals_per_s": evals / best[s],
                   f"identical_to_{strategies[0]}": same}
            if "vmap" in best:
                row["speed_vs_vmap"] = best["vmap"] / best[s]
            rows.append(row)
            print(f"{case:6s} {s:8s} first {first[s]:6.2f}s best "
                  f"{best[s]:6.2f}s {evals / best[s]:9.0f} evals/s  "
                  f"x{row.get('speed_vs_vmap', float('nan')):.2f} vs vmap  "
                  f"identical {same}", flush=True)
        print(f"{case}: fastest {min(best, key=best.get)}; "
              f"auto uses {autos[case]}; "
              f"load {os.getloadavg()}", flush=True)
    return rows
