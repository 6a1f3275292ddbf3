"""Multi-seed evaluation speed: sequential vs vmap vs lax.map over S models.

  python -m benchmarks.eval_seeds [--models=lenet5,vgg16] [--seeds=1,3,10]
      [--n_acc=1000] [--n_pgd=100] [--pgd_steps=40] [--out=FILE.json]

For each model, number of stacked models S and strategy of
``dlfix_jax.seed_axis`` it times (a) prediction of ``n_acc`` inputs (the
ACC/RR/NFR pass) and (b) L∞ PGD on ``n_pgd`` inputs with ``pgd_steps``
steps (the ASR pass), each as first call (compile + run) and steady state
(best of ``--repeats`` further calls). Weights are random (speed does not
depend on them); inputs are random in the model's input shape. Prints one
line per measurement and, per (model, S, task), which strategy won and what
``"auto"`` resolves to on this backend. The numbers justify the
``"predict"`` and ``"pgd"`` rows of ``seed_axis.AUTO_STRATEGY`` (recorded in
BENCHMARKS.md); the ``"train"`` and ``"population"`` rows come from
``benchmarks/apricot_rdlms.py`` and ``benchmarks/population.py``. Any
strategy of the layer can be timed (``--strategies=...,sharded`` splits the
seeds over the local devices).
"""

import json
import time

from absl import app, flags

flags.DEFINE_list("models", ["lenet5", "vgg16"], "Zoo models to time.")
flags.DEFINE_list("seeds", ["1", "3", "10"], "Stack sizes S.")
flags.DEFINE_list("strategies", ["sequential", "vmap", "lax_map"],
                  "Seed strategies.")
flags.DEFINE_list("tasks", ["acc", "pgd"], "What to time.")
flags.DEFINE_integer("n_acc", 1000, "Inputs predicted (accuracy pass).")
flags.DEFINE_integer("n_pgd", 100, "Inputs attacked (PGD pass).")
flags.DEFINE_integer("pgd_steps", 40, "PGD steps.")
flags.DEFINE_integer("batch_size", 250, "Inputs per compiled call.")
flags.DEFINE_integer("repeats", 3, "Interleaved steady-state rounds (best "
                     "is reported).")
flags.DEFINE_string("out", None, "Write all measurements as JSON here.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax
    import numpy as np

    from dlfix_jax import models
    from dlfix_jax.metrics import pgd, timing
    from dlfix_jax import seed_axis as seeds

    import os
    print(f"load {os.getloadavg()}")
    print(f"backend {jax.default_backend()}, devices {jax.devices()}, "
          f"auto -> predict {seeds.resolve_strategy('auto', task='predict')}"
          f", pgd {seeds.resolve_strategy('auto', task='pgd')}")
    rows = []
    for name in FLAGS.models:
        m = models.get(name)
        for s in map(int, FLAGS.seeds):
            st = seeds.stack_variables(
                [m.init(jax.random.key(i)) for i in range(s)])
            for task in FLAGS.tasks:
                n = FLAGS.n_acc if task == "acc" else FLAGS.n_pgd
                x = np.asarray(jax.random.uniform(
                    jax.random.key(1), (n,) + tuple(m.input_shape)))
                y = np.zeros(n, np.int32)

                def call(strategy):
                    if task == "acc":
                        return seeds.predict_stack(
                            m, st, x, FLAGS.batch_size, strategy)
                    return pgd.attack_stack(
                        m, st, x, y, eps=0.03, bounds=(0.0, 1.0),
                        steps=FLAGS.pgd_steps, batch_size=FLAGS.batch_size,
                        strategy=strategy)

                # First calls (compile + run), then `repeats` rounds that
                # interleave the strategies, so drifting load on a shared
                # machine hits all of them alike; the best round counts.
                first, outs = {}, {}
                for strategy in FLAGS.strategies:
                    with timing.Timer() as t:
                        outs[strategy] = call(strategy)
                    first[strategy] = t
                res = {k: float("inf") for k in FLAGS.strategies}
                for _ in range(FLAGS.repeats):
                    for strategy in FLAGS.strategies:
                        t0 = time.perf_counter()
                        call(strategy)
                        res[strategy] = min(res[strategy],
                                            time.perf_counter() - t0)
                ref = outs[FLAGS.strategies[0]]
                for strategy in FLAGS.strategies:
                    agree = float(np.mean(outs[strategy] == ref))
                    t = first[strategy]
                    row = {"model": name, "S": s, "task": task, "n": n,
                           "strategy": strategy, "first_s": t.total_s,
                           "compile_s": t.compile_s,
                           "steady_s": res[strategy],
                           "agree_with_first": agree}
                    if task == "pgd":
                        row["pgd_steps"] = FLAGS.pgd_steps
                    rows.append(row)
                    print(f"{name:7s} S={s:<2d} {task:3s} n={n:<5d} "
                          f"{strategy:10s} first {t.total_s:8.2f}s "
                          f"(compile {t.compile_s:6.2f}s) steady "
                          f"{res[strategy]:8.2f}s agree {agree:.3f}",
                          flush=True)
                win = min(res, key=res.get)
                seq = res.get("sequential")
                ratios = ", ".join(f"{k} {v / seq:.2f}x" for k, v in
                                   res.items()) if seq else ""
                auto = seeds.resolve_strategy(
                    "auto", task="predict" if task == "acc" else "pgd")
                print(f"  -> fastest {win} (auto: {auto}); time relative to "
                      f"sequential: {ratios}", flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"backend": jax.default_backend(), "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    app.run(main)
