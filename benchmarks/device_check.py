"""One short accelerator check: the numbers that choose per-backend strategies.

  python -m benchmarks.device_check --out=DIR/device_check.json [--quick]

(``benchmarks/device_check.sh`` wraps it.) On whatever backend JAX finds
(GPU, TPU or CPU) it measures, each with compilation excluded (one warm-up):

* training throughput of the shared loop (examples/s), LeNet5 and VGG16,
  batch 128, random data;
* S stacked LeNet5s (S = 1, 10): prediction and PGD under every seed-axis
  strategy of :mod:`dlfix_jax.seed_axis` (sequential, vmap, lax_map and,
  with more than one device, sharded);
* PGD, 500 inputs x 40 steps, one LeNet5;
* Arachne on the embedded digits with a digits-trained LeNet5 (one fix);
* one Apricot reduced-model epoch (K models, sequential vs vmap);
* Arachne's 3 seeds in one ``vmap(fix)`` vs one after another (task
  ``"fix"``);
* a search population scored with vmap vs lax_map, last Dense and hidden
  layer + tail (tasks ``"population_head"`` / ``"population"``,
  :func:`benchmarks._population.measure`, shorter runs);
* the multi-layer search fitness in its two forms, low rank vs the
  matmul re-run, at four gene counts (``_fitness.LOW_RANK_MAX_FRACTION``;
  :func:`benchmarks._tail_fitness.measure`, zoo LeNet5).

It writes one JSON file with the backend, device kinds, versions and every
number (rewritten after each section, with ``"complete": false`` until
the last, so a run cut short keeps what it measured), and prints a
summary. Budget: under 8 minutes on one GPU; ``--quick``
shrinks every size for a CPU smoke test.
"""

from __future__ import annotations

import functools
import json
import platform
import time

from absl import app, flags

from benchmarks._timing import timed

flags.DEFINE_string("out", "runs/bench/device_check.json", "JSON output.")
flags.DEFINE_bool("quick", False, "Tiny sizes (CPU smoke test).")
FLAGS = flags.FLAGS


def train_throughput(name: str, steps: int, batch: int = 128) -> dict:
    import jax
    import numpy as np

    from dlfix_jax import models
    from dlfix_jax.data import base as data_base
    from dlfix_jax.data.source import Source
    from dlfix_jax.training import loop

    model = models.get(name)
    v = model.init(jax.random.key(0))
    tx = loop.optimizer("adam", 1e-3)
    step = loop.make_step(loop.xent(model), tx)
    rng = np.random.default_rng(0)
    n = (steps + 2) * batch
    x = rng.random((n,) + tuple(model.input_shape), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    src = Source(data_base.Split(x, y))
    key = jax.random.key(1)
    state = loop.fit(key, None, src.take_steps(key, batch, 2), step_fn=step,
                     state=loop.init_state(v, tx), num_steps=2).state
    jax.block_until_ready(state)
    t = time.perf_counter()
    state = loop.fit(key, None, src.take_steps(key, batch, steps),
                     step_fn=step, state=state, num_steps=steps).state
    jax.block_until_ready(state)
    dt = time.perf_counter() - t
    return {"model": name, "steps": steps, "batch": batch,
            "examples_per_s": steps * batch / dt}


def seed_strategies(n_pred: int, n_pgd: int, pgd_steps: int) -> list[dict]:
    import jax
    import numpy as np

    from dlfix_jax import models, predict, seed_axis
    from dlfix_jax.metrics import pgd

    m = models.get("lenet5")
    strategies = ["sequential", "vmap", "lax_map"]
    if jax.local_device_count() > 1:
        strategies.append("sharded")
    rows = []
    for s in (1, 10):
        st = seed_axis.to_device(seed_axis.stack_variables(
            [m.init(jax.random.key(i)) for i in range(s)]))
        x = np.asarray(jax.random.uniform(jax.random.key(1),
                                          (n_pred, 28, 28, 1)))
        xp = x[:n_pgd]
        y = np.zeros(n_pgd, np.int32)
        for strat in strategies:
            f1, best = timed(lambda: seed_axis.map_seeds(
                predict.model_logits(m), st, x, strategy=strat))
            rows.append({"task": "predict", "S": s, "strategy": strat,
                         "n": n_pred, "first_s": f1, "steady_s": best})
            f1, best = timed(lambda: pgd.attack_stack(
                m, st, xp, y, eps=0.15, bounds=(0.0, 1.0), steps=pgd_steps,
                strategy=strat), repeats=2)
            rows.append({"task": "pgd", "S": s, "strategy": strat,
                         "n": n_pgd, "steps": pgd_steps, "first_s": f1,
                         "steady_s": best})
    return rows


def pgd_one(n: int, steps: int) -> dict:
    import jax
    import numpy as np

    from dlfix_jax import models
    from dlfix_jax.metrics import pgd

    m = models.get("lenet5")
    v = m.init(jax.random.key(0))
    x = np.asarray(jax.random.uniform(jax.random.key(1), (n, 28, 28, 1)))
    y = np.zeros(n, np.int32)
    f1, best = timed(lambda: pgd.linf_pgd(m, v, x, y, eps=0.15,
                                           bounds=(0.0, 1.0), steps=steps),
                      repeats=2)
    return {"n": n, "steps": steps, "first_s": f1, "steady_s": best}


def _digits_problem(epochs: int):
    import jax

    from dlfix_jax import data, fixers, models
    from dlfix_jax.data.source import Source
    from dlfix_jax.training import loop

    ds = data.load("digits")
    model = models.get("lenet5")
    tx = loop.optimizer("adam", 2e-3)
    key = jax.random.key(0)
    steps = epochs * Source(ds.train).steps_per_epoch(64)
    v = loop.fit(key, model.init(key),
                 Source(ds.train).take_steps(key, 64, steps),
                 step_fn=loop.make_step(loop.xent(model), tx), tx=tx,
                 num_steps=steps).variables
    return fixers.make_problem(model, v, ds)


def arachne_fix(problem, generations: int) -> dict:
    import jax

    from dlfix_jax import fixers

    spec = fixers.get("arachne")
    cfg = fixers.fixer_config(spec, {"max_generations": generations,
                                     "patience": generations})
    f1, best = timed(lambda: spec.fix(jax.random.key(0), problem,
                                       cfg).variables, repeats=1)
    return {"generations": generations, "first_s": f1, "steady_s": best}


def fix_seed_modes(problem, generations: int, seeds: int = 3) -> list[dict]:
    """Arachne's S seeds in one ``vmap(fix)`` vs one after another (the
    ``"fix"`` task of the strategy layer)."""
    import jax

    from dlfix_jax import fixers

    spec = fixers.get("arachne")
    cfg = fixers.fixer_config(spec, {"max_generations": generations,
                                     "patience": generations})
    keys = jax.random.split(jax.random.key(0), seeds)
    vfix = jax.vmap(spec.fix, in_axes=(0, None, None))
    runs = {"vmap": lambda: vfix(keys, problem, cfg).variables,
            "sequential": lambda: [spec.fix(k, problem, cfg).variables
                                   for k in keys]}
    rows = []
    for mode, fn in runs.items():
        f1, best = timed(fn, repeats=1)
        rows.append({"task": "fix", "S": seeds, "strategy": mode,
                     "first_s": f1, "steady_s": best})
    return rows


def apricot_epoch(problem, k: int) -> list[dict]:
    import jax

    from dlfix_jax import fixers
    from dlfix_jax.fixers import apricot

    rows = []
    for strat in ("sequential", "vmap"):
        cfg = fixers.fixer_config(fixers.get("apricot"), {
            "num_rdlms": k, "rdlm_epochs": 1, "rdlm_strategy": strat})
        f1, best = timed(lambda: apricot.train_rdlms(
            jax.random.key(0), problem.model, problem.train,
            problem.num_classes, cfg, original=problem.variables)[0],
            repeats=1)
        rows.append({"K": k, "strategy": strat, "first_s": f1,
                     "steady_s": best})
    return rows


def main(argv):
    del argv
    import jax

    q = FLAGS.quick
    t0 = time.perf_counter()
    out = {"backend": jax.default_backend(),
           "devices": [str(d) for d in jax.devices()],
           "device_kind": jax.devices()[0].device_kind,
           "jax": jax.__version__, "python": platform.python_version(),
           "host": platform.node(), "quick": q, "complete": False}
    # Built on first use, shared by the sections that fix it.
    digits = functools.cache(lambda: _digits_problem(1 if q else 15))

    def population():
        from benchmarks import _population
        return _population.measure(
            generations=2 if q else 10, n_pos=200 if q else 4946,
            n_neg=20 if q else 54, rounds=1)

    def tail_fitness():
        from benchmarks import _tail_fitness
        from dlfix_jax import models
        lenet = models.get("lenet5")
        return _tail_fitness.measure(
            lenet, lenet.init(jax.random.key(0)), n=200 if q else 5000,
            population=8 if q else 100, fractions=(0.05, 0.5, 1.0, 1.7),
            rounds=1 if q else 2, label="zoo:lenet5")

    # Shortest first: a cut-short run keeps as many sections as it can.
    sections = [
        ("pgd", lambda: pgd_one(32 if q else 500, 4 if q else 40)),
        ("train", lambda: [train_throughput("lenet5", 20 if q else 300),
                           train_throughput("vgg16", 2 if q else 50)]),
        ("seed_axis", lambda: seed_strategies(
            64 if q else 5000, 16 if q else 500, 2 if q else 40)),
        ("arachne", lambda: arachne_fix(digits(), 3 if q else 100)),
        ("apricot_rdlm_epoch", lambda: apricot_epoch(digits(),
                                                     3 if q else 20)),
        ("fix_seeds", lambda: fix_seed_modes(digits(), 3 if q else 30)),
        ("population", population),
        ("tail_fitness", tail_fitness),
    ]
    # The file is rewritten (atomically) after every section, so a run cut
    # short by device_check.sh's time limit keeps what it measured
    # ("complete": false, "total_s" up to the last finished section).
    from dlfix_jax.fileio import atomic_write_json
    for name, measure in sections:
        out[name] = measure()
        out["total_s"] = time.perf_counter() - t0
        atomic_write_json(FLAGS.out, out)
        print(f"{name} done ({out['total_s']:.0f} s)", flush=True)
    out["complete"] = True
    atomic_write_json(FLAGS.out, out)
    print(json.dumps({k: out[k] for k in ("backend", "device_kind", "train",
                                          "pgd", "arachne", "total_s")},
                     indent=1))
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
