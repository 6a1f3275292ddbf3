"""Apricot's reduced models: the training strategies of the strategy layer.

  python -m benchmarks.apricot_rdlms [--model=lenet5] [--k=4,20]
      [--steps=60] [--batch_size=128] [--rounds=2]
      [--strategies=sequential,vmap,lax_map,vmap_scan] [--out=FILE.json]

Trains K models of ``--model`` from independent random initialisations for
``--steps`` Adam steps each on one random batch of the model's shape (speed
does not depend on the data) with :func:`dlfix_jax.fixers.apricot.fit_rdlms`
under each :mod:`dlfix_jax.seed_axis` strategy (task ``"train"``), as
Apricot's ``train_rdlms`` does. ``vmap_scan`` is the reference the issue
measures against, not a strategy of the layer: one jitted ``lax.scan`` over
the steps of a vmapped step (all K models and all steps in one call).

Every strategy is first run once (compile + run), then ``--rounds`` rounds
interleave the strategies (A, B, C, A, B, C, ...) so drifting load on a
shared machine hits all alike; the best round is reported, in training
examples per second summed over the K models, with its ratio to
``vmap_scan`` and to ``vmap``. Prints what ``strategy="auto"`` resolves to
on this backend and the load average.
"""

import json
import os
import time

from absl import app, flags

flags.DEFINE_string("model", "lenet5", "Zoo model.")
flags.DEFINE_list("k", ["4", "20"], "Numbers of models K.")
flags.DEFINE_integer("steps", 60, "Training steps per model.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("rounds", 2, "Interleaved timed rounds (best counts).")
flags.DEFINE_list("strategies", ["sequential", "vmap", "lax_map", "vmap_scan"],
                  "seed_axis strategies (and the vmap_scan reference).")
flags.DEFINE_string("out", None, "Write the measurements as JSON here.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dlfix_jax import models
    from dlfix_jax import seed_axis
    from dlfix_jax.fixers import apricot
    from dlfix_jax.training import loop

    auto = seed_axis.resolve_strategy("auto", task="train")
    print(f"backend {jax.default_backend()}, devices "
          f"{jax.local_device_count()}, train auto -> {auto} (measured: "
          f"{seed_axis.is_measured(task='train')}), load {os.getloadavg()}",
          flush=True)
    m = models.get(FLAGS.model)
    tx = loop.optimizer("adam", 2e-4)
    step_fn = loop.make_step(loop.xent(m), tx)
    bs, steps = FLAGS.batch_size, FLAGS.steps
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(bs,) + tuple(m.input_shape)).astype(np.float32)
    y = rng.integers(0, m.num_classes, bs).astype(np.int32)

    @jax.jit
    def scan_train(states, batch, keys):
        vstep = jax.vmap(step_fn)

        def body(st, _):
            st, metrics = vstep(st, batch, keys)
            return st, metrics["loss"]
        return jax.lax.scan(body, states, None, length=steps)

    rows = []
    for k in map(int, FLAGS.k):
        inits = [m.init(jax.random.key(i)) for i in range(k)]
        keys = [jax.random.key(100 + i) for i in range(k)]

        def call(strategy):
            if strategy == "vmap_scan":
                states = seed_axis.stack_variables(
                    [loop.init_state(v, tx) for v in inits])
                batch = (jnp.asarray(np.stack([x] * k)),
                         jnp.asarray(np.stack([y] * k)))
                return scan_train(states, batch, jnp.stack(keys))[0]
            iters = [iter([(x, y)] * steps) for _ in range(k)]
            return apricot.fit_rdlms(keys, inits, iters, step_fn=step_fn,
                                     tx=tx, num_steps=steps,
                                     strategy=strategy)

        def timed(strategy):
            t0 = time.perf_counter()
            jax.block_until_ready(call(strategy))
            return time.perf_counter() - t0

        first = {s: timed(s) for s in FLAGS.strategies}
        best = {s: float("inf") for s in FLAGS.strategies}
        for _ in range(FLAGS.rounds):
            for s in FLAGS.strategies:
                best[s] = min(best[s], timed(s))
        ex = {s: k * steps * bs / best[s] for s in FLAGS.strategies}
        for s in FLAGS.strategies:
            row = {"model": FLAGS.model, "k": k, "strategy": s,
                   "steps": steps, "batch_size": bs, "first_s": first[s],
                   "best_s": best[s], "examples_per_s": ex[s]}
            for ref in ("vmap_scan", "vmap"):
                if ref in ex:
                    row[f"speed_vs_{ref}"] = ex[s] / ex[ref]
            rows.append(row)
            rel = "  ".join(f"x{row[f'speed_vs_{r}']:.2f} vs {r}"
                            for r in ("vmap_scan", "vmap")
                            if f"speed_vs_{r}" in row)
            print(f"K={k:3d} {s:10s} first {first[s]:7.2f}s best "
                  f"{best[s]:7.2f}s {ex[s]:9.0f} ex/s  {rel}", flush=True)
        win = max(ex, key=ex.get)
        print(f"K={k}: fastest {win}; auto uses {auto}; load "
              f"{os.getloadavg()}", flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"backend": jax.default_backend(), "auto": auto,
                       "load": os.getloadavg(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
