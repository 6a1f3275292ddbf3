"""Fidelity: one fixer on the study's own MNIST LeNet5, next to the study's row.

  python -m benchmarks.fidelity --approach=arachne --seeds=3 \
      [--model=../shared/data/fixingstudy/mnist_lenet5_original.h5 | --base=WORKDIR] \
      [--override=key=value ...] [--out=runs/fidelity/arachne.json]

Loads the study's original model (a Keras ``.h5``; ``--base`` takes one of
our training workdirs instead, e.g. for fixers that need a training
history), real MNIST from ``$DLFIX_DATA_DIR`` / ``../shared/data``, runs the
fixer for ``--seeds`` seeds with the study runner's keys
(:func:`dlfix_jax.rng.seed_keys`), evaluates every fixed model on the test
split (ACC, ⇑ACC, RR, NFR; ASR with PGD ε = 0.15, 500 samples, on the
model's probabilities as the study's foolbox runs did), and prints the mean
± std over seeds and the time per seed beside the study's published MNIST
row (``approaches.md`` §5). ``--out`` writes everything as JSON.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

from dlfix_jax import data as data_lib
from dlfix_jax import fileio
from dlfix_jax import fixers
from dlfix_jax import progress
from dlfix_jax import rng
from dlfix_jax.metrics import evaluate as evaluate_lib
from dlfix_jax.metrics import timing
from dlfix_jax.models import keras_h5
from dlfix_jax.training import checkpoint

# The study's MNIST row per abbreviation: (ACC, ⇑ACC, RR, ASR, ⇑ASR, NFR,
# TIME), transcribed in ../shared/reference/approaches.md §5.
STUDY_MNIST = {
    "AP": (99.06, 1.18, 73.97, 23.17, 69.87, 0.39, "13h46m"),
    "ET": (99.04, 1.16, 73.65, 15.93, 79.76, 0.41, "78h16m"),
    "FM": (98.05, 0.15, 17.78, 82.33, -0.90, 0.25, "9m05s"),
    "DR": (98.01, 0.11, 22.54, 84.77, -3.38, 0.37, "1h10m"),
    "HUDD": (98.63, 0.75, 50.79, 86.53, -7.36, 0.33, "1m05s"),
    "HR": (98.00, 0.11, 27.30, 79.10, 0.25, 0.53, "17m12s"),
    "3M": (97.90, 0.00, 0.00, 81.93, -3.71, 0.00, "17s"),
    "RA": (97.96, -0.14, 6.67, 89.20, -10.26, 0.14, "13s"),
    "AR": (97.75, -0.15, 12.70, 85.73, -3.29, 0.41, "1m12s"),
    "CARE": (97.59, -0.32, 13.97, 81.00, 0.61, 0.61, "4m28s"),
    "NR": (96.73, -1.20, 9.84, 79.53, -0.42, 1.38, "34m57s"),
    "IR": (98.06, 0.16, 15.56, 83.77, -2.91, 0.23, "17m00s"),
    "DTR": None,   # UNADAPTABLE on MNIST in the study
    "GM": (97.95, 0.05, 3.49, 81.10, -2.92, 0.03, "4h26m"),
    "VERE": None,  # UNADAPTABLE on MNIST in the study
    "IN": (96.59, -1.34, 21.90, 99.70, -23.24, 1.77, "35s"),
}

DEFAULT_MODEL = os.path.join("fixingstudy", "mnist_lenet5_original.h5")

flags.DEFINE_string("approach", None, "Registered fixer name.")
flags.DEFINE_integer("seeds", 3, "Fixing runs.")
flags.DEFINE_string("model", None, "Original Keras .h5 (default: the "
                    "study's, under the data dir).")
flags.DEFINE_string("base", None, "One of our training workdirs instead of "
                    "--model (brings its training history).")
flags.DEFINE_string("dataset", "mnist", "Dataset of the model.")
flags.DEFINE_string("data_dir", None, "Data directory.")
flags.DEFINE_multi_string("override", [], "Fixer config key=value.")
flags.DEFINE_bool("asr", True, "Measure ASR (PGD).")
flags.DEFINE_integer("n_samples", 500, "PGD samples.")
flags.DEFINE_string("out", None, "JSON output file.")
FLAGS = flags.FLAGS


def _overrides(items) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--override expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def _ms(values) -> str:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if not v.size:
        return "n/a"
    return f"{v.mean():.2f} ± {v.std():.2f}"


def run(approach: str, seeds: int, model_path: str | None, base: str | None,
        dataset: str, data_dir: str | None, overrides: dict, asr: bool,
        n_samples: int) -> dict:
    spec = fixers.get(approach)
    cfg = fixers.fixer_config(spec, overrides)
    ds = data_lib.load(dataset, data_dir=data_dir)
    history = None
    if base:
        model, variables, history = checkpoint.load_model(base, history=2)
        source = base
    else:
        root = data_dir or data_lib.default_data_dir() or ""
        source = model_path or os.path.join(root, DEFAULT_MODEL)
        model, variables = keras_h5.load(source)
    info = fixers.problem_info(model, ds, len(history) if history else 0)
    reason = spec.applicable(info)
    out = {"approach": approach, "abbrev": spec.abbrev, "model": source,
           "dataset": dataset, "seeds": seeds,
           "config": cfg.to_dict(), "study_row": STUDY_MNIST.get(spec.abbrev)}
    if reason:
        out.update(status="unadaptable", reason=reason)
        return out
    problem = fixers.make_problem(model, variables, ds, history=history)
    logging.info("%s: %d failing / %d passing repair inputs", approach,
                 len(problem.failing), len(problem.passing))
    keys = rng.seed_keys(0, seeds)
    fixed, times, compiles, infos = [], [], [], []
    for s, key in enumerate(keys):
        with timing.Timer() as t:
            res = spec.fix(key, problem, cfg)
            jax.block_until_ready(res.variables)
        fixed.append((model, res.variables))
        times.append(t.total_s)
        compiles.append(t.compile_s)
        infos.append(fixers.summarize_info(spec, res.info))
        logging.info("%s seed %d: %s", approach, s,
                     progress.format_duration(t.total_s))
    t0 = time.perf_counter()
    ev = evaluate_lib.evaluate_models(
        rng.stream(rng.root(0), rng.EVAL), model, variables, fixed, ds,
        asr=asr, n_samples=n_samples, batch_size=1000)
    out.update(status="ok", time_s=times, time_compile_s=compiles,
               eval_s=time.perf_counter() - t0, eval=ev, info=infos,
               n_failing=len(problem.failing), n_passing=len(problem.passing))
    return out


def row(out: dict) -> str:
    """A markdown row: ours next to the study's."""
    if out.get("status") != "ok":
        return (f"| {out['abbrev']} | {out.get('status')}: "
                f"{out.get('reason', '')} |")
    ev = out["eval"]
    ours = (f"{_ms(ev['acc'])} / {_ms(ev['rr'])} / {_ms(ev['nfr'])} / "
            f"{_ms(ev.get('asr', []))} (orig ACC {ev['acc_orig']:.2f}, ASR "
            f"{ev.get('asr_orig', float('nan')):.2f})")
    t = np.mean(out["time_s"])
    st = out["study_row"]
    study = ("UNADAPTABLE" if st is None else
             f"{st[0]:.2f} / {st[2]:.2f} / {st[5]:.2f} / {st[3]:.2f}, {st[6]}")
    return (f"| {out['abbrev']} | {ours} | {progress.format_duration(t)} "
            f"| {study} |")


def main(argv):
    del argv
    progress.quiet_orbax()
    out = run(FLAGS.approach, FLAGS.seeds, FLAGS.model, FLAGS.base,
              FLAGS.dataset, FLAGS.data_dir, _overrides(FLAGS.override),
              FLAGS.asr, FLAGS.n_samples)
    print("| approach | ours: test ACC / RR / NFR / ASR (mean ± std) | time "
          "per seed | study: ACC / RR / NFR / ASR, TIME |")
    print("|---|---|---|---|")
    print(row(out))
    if FLAGS.out:
        fileio.atomic_write_json(FLAGS.out, out)
        print(f"wrote {FLAGS.out}")
    sys.exit(0 if out.get("status") in ("ok", "unadaptable") else 1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["approach"])
    app.run(main)
