"""Multi-layer search fitness: the low-rank form vs re-running the matmul.

  python -m benchmarks.tail_fitness [--model=PATH.h5] [--n=5000]
      [--population=100] [--k1_fractions=0.02,0.2,0.4,0.6,1.0] [--k2=5]
      [--rounds=3] [--out=FILE.json]

NeuRecover and Arachne's ``localisation="all"`` score candidates over
kernel entries of several Dense layers with
:func:`dlfix_jax.fixers._fitness.tail_logits`. Its two forms give the same
logits up to rounding: **low rank** (the earliest layer's cached output plus
``h[:, rows] @ ((v - w0) onehot(cols))``, then the rest of the model) and
**full** (that layer's matmul re-run with the genes written in).
:func:`~dlfix_jax.fixers._fitness.tail_setup` picks one by the rule of
``_fitness.LOW_RANK_MAX_FRACTION``. This measures both, for ``k1`` genes in
the first Dense layer (``k1 = fraction x`` its input width ``d``) plus
``--k2`` in the second, on ``--n`` random inputs. The population is scored
under the strategy the fixers use (``seed_axis.population_strategy(False)``).
After one compiling call each, ``--rounds`` rounds alternate the forms
(A, B, A, B, ...); the best round counts. The ratio is low rank / full
(below 1: low rank is faster), with the rule's choice beside it.

The model is ``--model``, else the study's MNIST LeNet5
(``fixingstudy/mnist_lenet5_original.h5`` under the data directory: d =
144), else the zoo LeNet5 (the same shapes). The weights and inputs only
set shapes here.
"""

import json
import os
import time

from absl import app, flags

flags.DEFINE_string("model", None, "Keras .h5 model (default: see above).")
flags.DEFINE_integer("n", 5000, "Inputs scored per candidate.")
flags.DEFINE_integer("population", 100, "Candidates per call.")
flags.DEFINE_list("k1_fractions", ["0.02", "0.2", "0.4", "0.6", "1.0"],
                  "Genes in the first Dense layer, as fractions of its "
                  "input width.")
flags.DEFINE_integer("k2", 5, "Genes in the second Dense layer.")
flags.DEFINE_integer("rounds", 3, "Alternating timed rounds (best counts).")
flags.DEFINE_string("out", None, "Write the measurements as JSON here.")
FLAGS = flags.FLAGS


def _model():
    import jax

    from dlfix_jax import data as data_lib
    from dlfix_jax import models
    from dlfix_jax.models import keras_h5
    path = FLAGS.model
    if path is None:
        root = data_lib.default_data_dir()
        cand = os.path.join(root or "", "fixingstudy",
                            "mnist_lenet5_original.h5")
        path = cand if root and os.path.exists(cand) else None
    if path:
        m, v = keras_h5.load(path)
        return path, m, v
    m = models.get("lenet5")
    return "zoo:lenet5", m, m.init(jax.random.key(0))


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dlfix_jax import masks, seed_axis
    from dlfix_jax.fixers import _fitness
    from dlfix_jax.models import base as models_base

    source, model, variables = _model()
    params = variables["params"]
    dense = [s.name for s in model.layers if s.kind == "dense"]
    if len(dense) < 2:
        raise SystemExit(f"{source}: needs two Dense layers, has {dense}")
    layers = tuple(dense[:2])
    shapes = [np.shape(models_base.get_layer_params(params, n)["kernel"])
              for n in layers]
    d = shapes[0][0]
    strategy = seed_axis.population_strategy(False)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(FLAGS.n,) + tuple(model.input_shape)).astype(
        np.float32)
    cache = _fitness.cache_layer(model, variables, layers[0], x)
    h, out = jnp.asarray(cache.h), jnp.asarray(cache.out)
    print(f"model {source}; {layers[0]} {shapes[0]}, {layers[1]} "
          f"{shapes[1]}; backend {jax.default_backend()}, strategy "
          f"{strategy}, load {os.getloadavg()}", flush=True)
    rows = []
    for frac in (float(f) for f in FLAGS.k1_fractions):
        k1 = max(1, min(int(round(frac * d)), int(np.prod(shapes[0]))))
        lay = np.r_[np.zeros(k1, np.int32), np.ones(FLAGS.k2, np.int32)]
        idx = np.concatenate([
            np.stack(np.unravel_index(
                rng.choice(int(np.prod(s)), k, replace=False), s), 1)
            for s, k in zip(shapes, (k1, FLAGS.k2))])
        mask = masks.kernel_entries_mask(params, layers, lay, idx)
        g = masks.indices_of(mask)
        w0 = np.asarray(masks.gather(params, g), np.float32)
        pop = jnp.asarray(w0 + 0.01 * rng.standard_normal(
            (FLAGS.population, w0.size)).astype(np.float32))
        auto = _fitness.tail_setup(model, variables, mask, layers).low_rank
        setups = {low: _fitness.tail_setup(model, variables, mask, layers,
                                           low_rank=low)
                  for low in (True, False)}

        @jax.jit
        def score(pop, setup):
            fn = _fitness.tail_logits(setup, h, out)
            return seed_axis.map_traced(lambda v: jnp.sum(fn(v), axis=0),
                                        pop, strategy)

        outs = {low: jax.block_until_ready(score(pop, s))
                for low, s in setups.items()}
        best = {True: float("inf"), False: float("inf")}
        for _ in range(FLAGS.rounds):
            for low, s in setups.items():
                t0 = time.perf_counter()
                jax.block_until_ready(score(pop, s))
                best[low] = min(best[low], time.perf_counter() - t0)
        diff = float(jnp.max(jnp.abs(outs[True] - outs[False])
                             / (jnp.abs(outs[False]) + 1e-6)))  # of sums
        row = {"d": int(d), "k1": k1, "k2": FLAGS.k2, "n": FLAGS.n,
               "population": FLAGS.population,
               "low_rank_ms": 1e3 * best[True], "full_ms": 1e3 * best[False],
               "ratio_low_over_full": best[True] / best[False],
               "rule_picks": "low_rank" if auto else "full",
               "max_rel_diff": diff}
        rows.append(row)
        print(f"k1 {k1:4d} ({k1 / d:.2f} d): low rank "
              f"{row['low_rank_ms']:7.1f} ms, full {row['full_ms']:7.1f} ms,"
              f" ratio {row['ratio_low_over_full']:.2f}; rule: "
              f"{row['rule_picks']}; max rel diff {diff:.1e}", flush=True)
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)),
                    exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump({"model": source, "backend": jax.default_backend(),
                       "strategy": strategy, "load": os.getloadavg(),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
