"""Fixes a base model with one approach for S seeds.

Example:
  python -m experiments.fix --config=experiments/configs/mnist_lenet5.py \
      --approach=ra --seeds=3 --workdir=runs/mnist_lenet5 \
      [--fixer=num_passing=1000 --fixer=margin=0.05] [--eval_batch_size=1000]

1. Trains the base model of ``--config`` into ``DIR/base`` with
   :func:`dlfix_jax.training.train_and_evaluate` (a completed run there is
   loaded instead), and builds the :class:`~dlfix_jax.fixers.Problem` with
   the per-epoch training history.
2. ``spec.applicable(model, dataset)``: a reason is printed and the script
   exits with status 3 (the approach is *unadaptable* to this model).
3. Runs the fixer for seeds s = 0..S-1 with the study runner's keys
   ``fold_in(fold_in(key(config.seed), STREAM_FIX), s)`` (the same keys as
   ``experiments.run_study``, so both give the same fixed models), in one
   ``jit(vmap(fix))`` call when the fixer is vmappable, else one seed after
   another. ``--fixer=key=value`` overrides a fixer-config key (the value is
   parsed with the type of the default).
4. Writes each fixed model to ``DIR/<approach>/seed<s>/variables.msgpack``
   (plus ``info.json``) and, last and atomically, ``DIR/<approach>/metrics.json``
   with, per seed, test ACC / ⇑ACC / RR / NFR (``evaluate_models``), RR / NFR
   on the repair set, wall-clock time, status and the fixer's info.
   Exit status 1 when any seed failed.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from dlfix_jax import progress

config_flags.DEFINE_config_file(
    "config", None, "Base-model training config (experiments/configs/*.py).",
    lock_config=True)
flags.DEFINE_string("approach", None, "Registered fixer name (e.g. apricot).")
flags.DEFINE_integer("seeds", 3, "Number of fixing runs (seeds).")
flags.DEFINE_string("workdir", None, "Output directory.")
flags.DEFINE_multi_string("fixer", [], "Fixer-config override key=value "
                          "(repeatable; nested keys with dots).")
flags.DEFINE_integer("eval_batch_size", 1000, "Inputs per evaluation call.")
flags.mark_flags_as_required(["config", "approach", "workdir"])
FLAGS = flags.FLAGS

EXIT_FAILED, EXIT_UNADAPTABLE = 1, 3


def _parse_value(old, text: str):
    """Parses ``text`` with the type of the default value ``old``."""
    if isinstance(old, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"not a boolean: {text!r}")
    if isinstance(old, int):
        return int(float(text)) if "e" in text.lower() else int(text)
    if isinstance(old, float):
        return float(text)
    return text


def apply_overrides(cfg, overrides):
    """Applies ``key=value`` strings to a fixer ConfigDict (keys must exist)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--fixer expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        parts = key.split(".")
        node = cfg
        for p in parts[:-1]:
            node = node[p]
        if parts[-1] not in node:
            raise KeyError(f"fixer config has no key {key!r}; keys: "
                           f"{sorted(cfg.keys())}")
        node[parts[-1]] = _parse_value(node[parts[-1]], text)
    return cfg


def _get_spec(fixers, approach: str):
    """The registered fixer; imports ``dlfix_jax.fixers.<approach>`` first if
    the package did not (its module list is filled as fixers land)."""
    import importlib
    try:
        return fixers.get(approach)
    except KeyError:
        try:
            importlib.import_module(f"dlfix_jax.fixers.{approach}")
        except ModuleNotFoundError:
            pass
        return fixers.get(approach)  # raises with the registered names


def run(config, approach: str, num_seeds: int, workdir: str,
        overrides=(), eval_batch_size: int = 1000) -> tuple[int, dict]:
    """Library entry point of the script; returns (exit status, metrics)."""
    import jax
    import numpy as np

    from dlfix_jax import data as data_lib
    from dlfix_jax import fixers
    from dlfix_jax import predict as predict_lib
    from dlfix_jax.metrics import classification
    from dlfix_jax.metrics.evaluate import evaluate_models
    from dlfix_jax.study import runner
    from dlfix_jax.training import checkpoint, train

    spec = _get_spec(fixers, approach)
    cfg = apply_overrides(spec.default_config(), overrides)
    ds = data_lib.load(config.dataset.name, data_dir=config.dataset.data_dir,
                       seed=config.dataset.seed)
    base_dir = os.path.join(workdir, "base")
    res = train.train_and_evaluate(config, base_dir, dataset=ds)
    model, variables = res.model, res.variables
    out_dir = os.path.join(workdir, approach)
    os.makedirs(out_dir, exist_ok=True)

    history = None
    if checkpoint.history_epochs(base_dir):
        history = checkpoint.load_history(base_dir, model.abstract_variables())
    reason = spec.applicable(fixers.problem_info(
        model, ds, len(history) if history else 0))
    if reason:
        msg = f"{approach} is not applicable to {model.name}/{ds.name}: {reason}"
        print(f"UNADAPTABLE: {msg}", file=sys.stderr)
        checkpoint.atomic_write_json(os.path.join(out_dir, "metrics.json"), {
            "approach": approach, "status": "unadaptable", "reason": str(reason)})
        return EXIT_UNADAPTABLE, {}

    problem = fixers.make_problem(model, variables, ds, history=history)
    keys = runner.seed_keys(config, num_seeds)
    logging.info("%s on %s/%s: %d failing / %d passing repair inputs, %d "
                 "seeds (%s)", approach, ds.name, model.name,
                 len(problem.failing), len(problem.passing), num_seeds,
                 "vmap" if spec.vmappable else "sequential")
    t0 = time.perf_counter()
    if spec.vmappable:
        outs = runner.run_vmapped(spec, problem, cfg, keys, None)
    else:
        outs = runner.run_sequential(spec, problem, cfg, keys, None)
    wall = time.perf_counter() - t0

    ok = [s for s, o in enumerate(outs) if o["status"] == "ok"]
    for s in ok:
        d = os.path.join(out_dir, f"seed{s}")
        os.makedirs(d, exist_ok=True)
        checkpoint.save_variables(os.path.join(d, "variables.msgpack"),
                                  outs[s]["variables"])
        checkpoint.atomic_write_json(os.path.join(d, "info.json"),
                                     runner.info_summary(outs[s]["info"], spec=spec))
    test = {}
    if ok:
        test = evaluate_models(jax.random.key(0), model, variables,
                               [(model, outs[s]["variables"]) for s in ok], ds,
                               batch_size=eval_batch_size)
    po = predict_lib.predict(model, variables, ds.repair.x, eval_batch_size)
    seeds = []
    for s, o in enumerate(outs):
        rec = {"seed": s, "status": o["status"], "reason": o["reason"],
               "time_s": o["time_s"], "time_compile_s": o["time_compile_s"],
               "info": runner.info_summary(o["info"], spec=spec)}
        if s in ok:
            i = ok.index(s)
            rec.update({k: test[k][i] for k in ("acc", "d_acc", "rr", "nfr",
                                                "repaired", "broken")})
            pf = predict_lib.predict(model, o["variables"], ds.repair.x,
                                     eval_batch_size)
            fl = classification.to_python(classification.flips(po, pf,
                                                               ds.repair.y))
            rec.update(repair_rr=fl["rr"], repair_nfr=fl["nfr"])
        seeds.append(rec)

    def mean(k):
        v = [r[k] for r in seeds if k in r]
        return float(np.mean(v)) if v else None

    metrics = {
        "approach": approach, "level": spec.level, "paper": spec.paper,
        "dataset": ds.name, "model": model.name, "num_seeds": num_seeds,
        "status": "ok" if len(ok) == num_seeds else "failure",
        "execution": "vmap" if spec.vmappable else "sequential",
        "fixer_config": cfg.to_dict(),
        "orig": {"test_acc": test.get("acc_orig", res.metrics.get(
            "test_accuracy")), "test_wrong": test.get("wrong_orig"),
            "repair_failing": len(problem.failing),
            "repair_passing": len(problem.passing)},
        "mean": {k: mean(k) for k in ("acc", "d_acc", "rr", "nfr",
                                      "repair_rr", "repair_nfr", "time_s")},
        "wall_s": wall, "seeds": seeds,
    }
    checkpoint.atomic_write_json(os.path.join(out_dir, "metrics.json"), metrics)
    return (0 if len(ok) == num_seeds else EXIT_FAILED), metrics


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    progress.quiet_orbax()
    status, m = run(FLAGS.config, FLAGS.approach, FLAGS.seeds, FLAGS.workdir,
                    FLAGS.fixer, FLAGS.eval_batch_size)
    if m:
        mm = m["mean"]
        fmt = lambda v, f="{:.2f}": "n/a" if v is None else f.format(v)  # noqa: E731
        print(f"{m['approach']} on {m['dataset']}/{m['model']} x{m['num_seeds']}: "
              f"status {m['status']}; test ACC {fmt(mm['acc'])} (orig "
              f"{fmt(m['orig']['test_acc'])}), RR {fmt(mm['rr'])}, NFR "
              f"{fmt(mm['nfr'])}; repair RR {fmt(mm['repair_rr'])}; time/seed "
              f"{fmt(mm['time_s'], '{:.1f}')}s -> "
              f"{os.path.join(os.path.abspath(FLAGS.workdir), m['approach'])}")
    sys.exit(status)


if __name__ == "__main__":
    app.run(main)
