"""Apricot's reduced models: training K models one after another vs vmapped.

  python -m benchmarks.apricot_rdlms [--model=lenet5] [--k=4,20]
      [--steps=60] [--batch_size=128] [--strategies=sequential,vmap]
      [--out=FILE.json]

Trains K models of ``--model`` from independent random initialisations for
``--steps`` Adam steps each on random inputs of the model's shape (speed
does not depend on the data), with :func:`dlfix_jax.training.loop.fit_many`
under each strategy, as Apricot's ``train_rdlms`` does. Each (K, strategy)
is run twice in the same process; the second run (compiled) is the one
reported, in training examples per second summed over the K models. Prints
what ``strategy="auto"`` resolves to on this backend
(:func:`dlfix_jax.seed_axis.resolve_strategy`, task ``"train"``), which is
what Apricot uses by default.
"""

import json
import time

from absl import app, flags

flags.DEFINE_string("model", "lenet5", "Zoo model.")
flags.DEFINE_list("k", ["4", "20"], "Numbers of models K.")
flags.DEFINE_integer("steps", 60, "Training steps per model.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_list("strategies", ["sequential", "vmap"], "fit_many strategies.")
flags.DEFINE_string("out", None, "Write the measurements as JSON here.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax
    import numpy as np

    from dlfix_jax import models
    from dlfix_jax import seed_axis
    from dlfix_jax.training import loop

    auto = seed_axis.resolve_strategy("auto", task="train")
    print(f"backend {jax.default_backend()}, fit_many auto -> {auto}")
    m = models.get(FLAGS.model)
    tx = loop.optimizer("adam", 2e-4)
    step_fn = loop.make_step(loop.xent(m), tx)
    bs, steps = FLAGS.batch_size, FLAGS.steps
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(bs,) + tuple(m.input_shape)).astype(np.float32)
    y = rng.integers(0, m.num_classes, bs).astype(np.int32)
    rows = []
    for k in map(int, FLAGS.k):
        inits = [m.init(jax.random.key(i)) for i in range(k)]
        keys = [jax.random.key(100 + i) for i in range(k)]
        for strategy in FLAGS.strategies:
            times = []
            for _ in range(2):
                iters = [iter([(x, y)] * steps) for _ in range(k)]
                t0 = time.perf_counter()
                out = loop.fit_many(keys, inits, iters, step_fn=step_fn,
                                    tx=tx, num_steps=steps,
                                    strategy=strategy)
                jax.block_until_ready(out)
                times.append(time.perf_counter() - t0)
            ex_s = k * steps * bs / times[1]
            row = {"model": FLAGS.model, "k": k, "strategy": strategy,
                   "steps": steps, "batch_size": bs,
                   "first_s": times[0], "second_s": times[1],
                   "examples_per_s": ex_s}
            rows.append(row)
            print(f"K={k:3d} {strategy:10s} first {times[0]:7.2f}s "
                  f"second {times[1]:7.2f}s  {ex_s:9.0f} ex/s")
        best = max((r for r in rows if r["k"] == k),
                   key=lambda r: r["examples_per_s"])
        print(f"K={k}: fastest {best['strategy']}; auto uses {auto}")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"backend": jax.default_backend(), "auto": auto,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
