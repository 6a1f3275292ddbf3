"""Search populations: scoring strategies of the strategy layer.

  python -m benchmarks.population [--cases=logits,hidden] [--population=100]
      [--generations=20] [--n_pos=4946] [--n_neg=54] [--k=5] [--rounds=3]
      [--strategies=vmap,lax_map] [--out=FILE.json]

Runs DE (:func:`dlfix_jax.search.de`, jitted, no early stop) for
``--generations`` generations on an Arachne-style fitness (``N_correct +
sum 1/(CE+1)`` on a positive and a negative set, ``_fitness.correct_score``)
over ``--k`` weights of one Dense layer of a random LeNet5, with the layer's
inputs cached (``_fitness.cache_layer``): case ``logits`` searches the last
Dense layer (Arachne's default: a candidate is one matmul), case ``hidden``
the one before it (the rest of the network runs per candidate, as CARE /
NeuRecover / Arachne's multi-layer search do). The population is scored
under each :mod:`dlfix_jax.seed_axis` strategy (task ``"population_head"``
for case ``logits``, ``"population"`` for ``hidden``:
:func:`~dlfix_jax.seed_axis.population_strategy`);
after one compiling call per strategy, ``--rounds`` rounds interleave the
strategies (A, B, A, B, ...) and the best round is reported as fitness
evaluations per second, with the ratio to ``vmap``. Results of the
strategies are compared (bit-identical or not). Prints the load average.
"""

import json
import os
import time

from absl import app, flags

flags.DEFINE_list("cases", ["logits", "hidden"], "Which layer is searched.")
flags.DEFINE_integer("population", 100, "Population size P.")
flags.DEFINE_integer("generations", 20, "DE generations.")
flags.DEFINE_integer("n_pos", 4946, "Positive (passing) inputs.")
flags.DEFINE_integer("n_neg", 54, "Negative (failing) inputs.")
flags.DEFINE_integer("k", 5, "Searched weights.")
flags.DEFINE_integer("rounds", 3, "Interleaved timed rounds (best counts).")
flags.DEFINE_list("strategies", ["vmap", "lax_map"], "seed_axis strategies.")
flags.DEFINE_string("out", None, "Write the measurements as JSON here.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dlfix_jax import models, search, seed_axis
    from dlfix_jax.fixers import _fitness
    from dlfix_jax.models import base as models_base

    autos = {case: seed_axis.population_strategy(case == "logits")
             for case in FLAGS.cases}
    print(f"backend {jax.default_backend()}, devices "
          f"{jax.local_device_count()}, auto per case {autos} (measured: "
          f"{seed_axis.is_measured(task='population')}), load "
          f"{os.getloadavg()}", flush=True)
    m = models.get("lenet5")
    v = m.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    n = FLAGS.n_pos + FLAGS.n_neg
    x = rng.uniform(size=(n,) + tuple(m.input_shape)).astype(np.float32)
    y = rng.integers(0, m.num_classes, n).astype(np.int32)
    P, G, K = FLAGS.population, FLAGS.generations, FLAGS.k
    rows = []
    for case in FLAGS.cases:
        layer = {"logits": "dense3", "hidden": "dense2"}[case]
        cache = _fitness.cache_layer(m, v, layer, x)
        pos, neg = cache.take(slice(0, FLAGS.n_pos)), cache.take(
            slice(FLAGS.n_pos, n))
        y_pos, y_neg = jnp.asarray(y[:FLAGS.n_pos]), jnp.asarray(
            y[FLAGS.n_pos:])
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
            population_strategy=s)) for s in FLAGS.strategies}

        def timed(s):
            t0 = time.perf_counter()
            out = jax.block_until_ready(runs[s](jax.random.key(2)))
            return time.perf_counter() - t0, out

        first, outs = {}, {}
        for s in FLAGS.strategies:
            first[s], outs[s] = timed(s)
        best = {s: float("inf") for s in FLAGS.strategies}
        for _ in range(FLAGS.rounds):
            for s in FLAGS.strategies:
                best[s] = min(best[s], timed(s)[0])
        evals = int(outs[FLAGS.strategies[0]].evaluations)
        ref = outs[FLAGS.strategies[0]]
        for s in FLAGS.strategies:
            same = all(np.array_equal(np.asarray(a), np.asarray(b),
                                      equal_nan=True)
                       for a, b in zip(outs[s], ref))
            row = {"case": case, "layer": layer, "strategy": s,
                   "population": P, "generations": G, "k": K,
                   "n_pos": FLAGS.n_pos, "n_neg": FLAGS.n_neg,
                   "first_s": first[s], "best_s": best[s],
                   "evals_per_s": evals / best[s],
                   f"identical_to_{FLAGS.strategies[0]}": same}
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
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"backend": jax.default_backend(), "auto": autos,
                       "load": os.getloadavg(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
