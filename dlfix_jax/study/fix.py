"""Fixes one base model with one approach for S seeds (``dlfix fix``).

:func:`run` is the library call behind ``dlfix fix`` and
``python -m experiments.fix``:

1. The base model: with ``base=PATH`` it is loaded, never retrained, from a
   training workdir of ours (with its per-epoch history when it has one), a
   fixed model written by this function, or a Keras ``.h5`` file
   (:func:`dlfix_jax.training.checkpoint.load_model`); the dataset comes
   from ``config.dataset`` (a Keras file holds none). Without ``base`` the
   base model of the training ``config`` is trained into ``DIR/base`` with
   :func:`dlfix_jax.training.train.train_and_evaluate` (a completed run
   there is loaded instead). The :class:`~dlfix_jax.fixers.Problem` gets the
   per-epoch training history when there is one.
2. ``spec.applicable(...)``: a reason is printed and the status is
   :data:`EXIT_UNADAPTABLE` (the approach is *unadaptable* to this model).
3. Runs the fixer for seeds s = 0..S-1 with the study runner's keys
   ``fold_in(fold_in(key(config.seed), STREAM_FIX), s)`` (the same keys as
   ``run_study``, so both give the same fixed models), in one
   ``jit(vmap(fix))`` call or one seed after another
   (``seed_strategy``, :func:`dlfix_jax.seed_axis.fixer_seed_mode`:
   ``"auto"`` is sequential on CPU, where it was measured faster, and vmap
   for vmappable fixers on accelerators). ``overrides`` (``key=value``) override fixer-config keys (the
   value is parsed with the type of the default).
4. Writes each fixed model to ``DIR/<approach>/seed<s>/`` (``model.json`` +
   ``variables.msgpack``, :func:`~dlfix_jax.training.checkpoint.save_model`,
   so ``dlfix evaluate --fixed=DIR/<approach>/seed<s>`` and ``dlfix export``
   read it; plus ``info.json``) and, last and atomically,
   ``DIR/<approach>/metrics.json`` with, per seed, test ACC / ⇑ACC / RR /
   NFR (``evaluate_models``), RR / NFR on the repair set, wall-clock time,
   status and the fixer's info. Status :data:`EXIT_FAILED` when any seed
   failed.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import time

import jax
import ml_collections
from absl import logging
import numpy as np

from dlfix_jax import data as data_lib
from dlfix_jax import fixers
from dlfix_jax import predict as predict_lib
from dlfix_jax import seed_axis
from dlfix_jax.metrics import classification
from dlfix_jax.metrics.evaluate import evaluate_models
from dlfix_jax.study import runner
from dlfix_jax.training import checkpoint, train

EXIT_FAILED, EXIT_UNADAPTABLE = 1, 3


def _clear_outputs(out_dir: str) -> None:
    """Removes a previous run's ``seed*/`` and ``metrics.json`` from
    ``out_dir`` (after every check has passed), so a rerun with fewer seeds
    or another config never leaves stale models beside the new metrics."""
    old = os.path.join(out_dir, "metrics.json")
    if os.path.exists(old):
        os.remove(old)  # first: a crash below leaves no stale summary
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if (name.startswith("seed") and name[4:].isdigit()
                and os.path.isdir(path)):
            shutil.rmtree(path)


def dataset_config(name: str, data_dir: str | None = None, data_seed: int = 0,
                   seed: int = 0) -> ml_collections.ConfigDict:
    """The part of a training config that :func:`run` reads with ``base``:
    ``dataset.{name, data_dir, seed}`` and the fixing ``seed``."""
    c = ml_collections.ConfigDict()
    c.seed = seed
    c.dataset = ml_collections.ConfigDict(
        {"name": name, "data_dir": data_dir, "seed": data_seed})
    return c


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


def get_spec(approach: str):
    """The registered fixer; imports ``dlfix_jax.fixers.<approach>`` first if
    the package did not (its module list is filled as fixers land)."""
    try:
        return fixers.get(approach)
    except KeyError:
        try:
            importlib.import_module(f"dlfix_jax.fixers.{approach}")
        except ModuleNotFoundError:
            pass
        return fixers.get(approach)  # raises with the registered names


def check_fits(model, ds, base: str) -> None:
    """ValueError when ``model``'s classes or input shape differ from
    dataset ``ds``'s."""
    if model.num_classes != ds.num_classes:
        raise ValueError(f"base model {base!r} has {model.num_classes} "
                         f"classes, dataset {ds.name!r} has "
                         f"{ds.num_classes}")
    if tuple(model.input_shape) != tuple(ds.input_shape):
        raise ValueError(f"base model {base!r} takes inputs "
                         f"{model.input_shape}, dataset {ds.name!r} has "
                         f"{ds.input_shape}")


def run(config, approach: str, num_seeds: int, workdir: str,
        overrides=(), eval_batch_size: int = 1000,
        base: str | None = None,
        time_budget_s: float | None = None,
        seed_strategy: str = "auto") -> tuple[int, dict]:
    """Fixes the base model; returns (exit status, metrics) (module doc).

    Args:
      config: a training config (``experiments/configs/<dataset>_<model>.py``)
        or, with ``base``, anything with ``dataset.{name, data_dir, seed}``
        and ``seed`` (:func:`dataset_config`).
      approach: registered fixer name.
      num_seeds: number of fixing runs.
      workdir: output directory.
      overrides: fixer-config ``key=value`` strings.
      eval_batch_size: inputs per evaluation call.
      base: a training workdir, fixed-model directory or Keras ``.h5`` to
        fix as it is; None trains the config's base model into
        ``workdir/base``.
      time_budget_s: per-seed time budget (None or 0: none); a seed past it
        is a failure with a "timeout" reason, as in the study runner.
      seed_strategy: ``"auto"``, ``"vmap"`` or ``"sequential"``: how the
        seeds run (:func:`dlfix_jax.seed_axis.fixer_seed_mode`).
    """
    if time_budget_s is not None and time_budget_s < 0:
        raise ValueError(f"time budget must be >= 0 s, got {time_budget_s}")
    budget = float(time_budget_s) if time_budget_s else None
    spec = get_spec(approach)
    mode = seed_axis.fixer_seed_mode(seed_strategy, spec.vmappable)
    cfg = apply_overrides(spec.default_config(), overrides)
    if base is not None:  # read first: a bad path fails before data loads
        model, variables, history = checkpoint.load_model(base, history=True)
    ds = data_lib.load(config.dataset.name, data_dir=config.dataset.data_dir,
                       seed=config.dataset.seed)
    orig_acc = None
    if base is not None:
        check_fits(model, ds, base)
        history = history or None
        base_path = os.path.abspath(base)
    else:
        base_path = os.path.join(workdir, "base")
        res = train.train_and_evaluate(config, base_path, dataset=ds)
        model, variables = res.model, res.variables
        orig_acc = res.metrics.get("test_accuracy")
        history = None
        if checkpoint.history_epochs(base_path):
            history = checkpoint.load_history(base_path,
                                              model.abstract_variables())
    out_dir = os.path.join(workdir, approach)
    os.makedirs(out_dir, exist_ok=True)

    reason = spec.applicable(fixers.problem_info(
        model, ds, len(history) if history else 0))
    if reason:
        msg = f"{approach} is not applicable to {model.name}/{ds.name}: {reason}"
        print(f"UNADAPTABLE: {msg}", file=sys.stderr)
        checkpoint.atomic_write_json(os.path.join(out_dir, "metrics.json"), {
            "approach": approach, "status": "unadaptable", "reason": str(reason)})
        return EXIT_UNADAPTABLE, {}

    problem = fixers.make_problem(model, variables, ds, history=history)
    _clear_outputs(out_dir)
    keys = runner.seed_keys(config, num_seeds)
    logging.info("%s on %s/%s: %d failing / %d passing repair inputs, %d "
                 "seeds (%s)", approach, ds.name, model.name,
                 len(problem.failing), len(problem.passing), num_seeds, mode)
    t0 = time.perf_counter()
    if mode == "vmap":
        outs = runner.run_vmapped(spec, problem, cfg, keys, budget)
    else:
        outs = runner.run_sequential(spec, problem, cfg, keys, budget)
    wall = time.perf_counter() - t0

    ok = [s for s, o in enumerate(outs) if o["status"] == "ok"]
    for s in ok:
        d = os.path.join(out_dir, f"seed{s}")
        checkpoint.save_model(d, model, outs[s]["variables"])
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
        "dataset": ds.name, "model": model.name, "base": base_path,
        "num_seeds": num_seeds,
        "status": "ok" if len(ok) == num_seeds else "failure",
        "execution": mode, "backend": jax.default_backend(),
        "fixer_config": cfg.to_dict(),
        "orig": {"test_acc": test.get("acc_orig", orig_acc),
                 "test_wrong": test.get("wrong_orig"),
                 "repair_failing": len(problem.failing),
                 "repair_passing": len(problem.passing)},
        "mean": {k: mean(k) for k in ("acc", "d_acc", "rr", "nfr",
                                      "repair_rr", "repair_nfr", "time_s")},
        "wall_s": wall, "seeds": seeds,
    }
    checkpoint.atomic_write_json(os.path.join(out_dir, "metrics.json"), metrics)
    return (0 if len(ok) == num_seeds else EXIT_FAILED), metrics
