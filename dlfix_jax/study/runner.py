"""The study runner: (dataset, model) pairs × approaches × seeds -> records.

``run_study(config, workdir, force=False)`` does, for every pair in
``config.pairs`` (each carries a base-model training config of
``experiments/configs/<dataset>_<model>.py``):

1. **Base model.** Trains it into ``workdir/base/<dataset>_<model>`` with
   :func:`dlfix_jax.training.train_and_evaluate`, which loads a completed
   run instead of retraining (and restarts an interrupted one from scratch,
   so a killed study retrains bit-identically). The per-epoch history comes
   from :func:`dlfix_jax.training.load_history`; the
   :class:`~dlfix_jax.fixers.Problem` from ``fixers.make_problem``.
2. **Per approach** (``config.approaches``: ``"all"`` = every registered
   fixer at run time, or a comma-separated list):

   * ``spec.applicable(model, dataset)``; a reason makes every seed
     ``"unadaptable"`` with that reason (nothing is run).
   * The fixer runs once per seed ``s = 0..S-1`` with key
     ``fold_in(fold_in(key(config.seed), STREAM_FIX), s)``. Keys are folded
     per seed rather than ``split(…, S)`` so a seed's key does not depend on
     S: raising ``num_seeds`` later keeps the finished seeds valid.
     ``vmappable`` fixers run all seeds in one ``vmap(fix)`` call when
     ``config.fix_strategy`` resolves to ``"vmap"`` (``"auto"``:
     :func:`dlfix_jax.seed_axis.fixer_seed_mode`, sequential on CPU where
     it was measured faster, vmap on accelerators); the others run one
     seed after another. Times are split into compilation and execution
     (see *Timing*).
   * An exception makes that seed ``"failure"`` with the exception text.
   * The fixed models are evaluated together on the test split (see
     *Evaluation*); a seed is ``"corrupted"`` when its model outputs a
     non-finite logit on a test input, has non-finite parameters, or its
     accuracy is at most ``100/num_classes + config.corrupt_margin``
     (near chance). Its ACC/RR/NFR are recorded anyway.
   * Records of the approach's seeds are appended to the store together
     (one write), so a group is either wholly present or absent after a
     crash.

Resuming: cells whose key is in the store are skipped. If only some seeds
of an approach are missing (e.g. ``num_seeds`` was raised), the whole
approach is recomputed (fixers are deterministic per key, and ASR's sample
depends on all S fixed models) and only the missing records are appended,
so nothing is ever duplicated. ``force=True`` recomputes every cell and
appends newer records that supersede the old ones; the store is compacted
at the end of a forced run.

Several processes (``jax.process_count() > 1``): the (pair, approach)
units missing a record are dealt round-robin over the processes, each
appends to its own shard ``results.p<k>.jsonl``, and process 0 merges the
shards into ``results.jsonl`` at the end (and, first, any shards a killed
run left); see :mod:`dlfix_jax.study.distributed`. A one-process run also
merges leftover shards first, so the process count may change between runs.

Time budget (``config.time_budget_s`` per fixing run; 0 = none). What is
enforced, precisely:

* Sequential runs: the fix call of a seed runs under a ``SIGALRM`` timer
  (``signal.setitimer``, POSIX, main thread only) whose handler raises
  :class:`FixTimeout`. Python raises it at the next bytecode boundary, so a
  fixer looping in Python (epochs, generations, LP calls) is stopped within
  one step; a single long XLA computation or C call (one HiGHS solve)
  cannot be interrupted and is stopped only when it returns. Any run whose
  wall-clock exceeded the budget is a ``"failure"`` ("time budget
  exceeded") even if it returned. Between seeds: once a seed timed out,
  the approach's remaining seeds are not started and are recorded as
  ``"failure"`` with the reason naming the seed that timed out.
* Vmapped runs: the single batched call of S seeds runs under the same
  alarm with S × the budget (interruptible only between the fixer's jitted
  calls) and is checked again after it returns; over budget, every seed is
  a ``"failure"``.

Timing: ``metrics.time_s`` is the wall-clock of one fixing run,
``time_compile_s`` its JAX compilation part (tracing, lowering and XLA
compile events JAX reports during the run, via
:class:`dlfix_jax.metrics.timing.Timer`) and ``time_execute_s`` the rest. A vmapped run's
times are the batch's times divided by S (amortised per seed);
``record["execution"]`` keeps the batch totals, the mode and the JAX
backend. Neither is part of the cell key (they change how, not what, is
computed), but they can change a fixer's float round-off: GenMuNN and
I-Repair give different fixed models under vmap and sequential seeds
(each mode deterministic). A cell's seeds always run together, in one
mode; ``report`` warns about a cell whose records disagree (records from
different runs: a store merged by hand, or a ``--force`` rerun with fewer
seeds whose older higher seeds remain).

Evaluation (:func:`dlfix_jax.metrics.evaluate.evaluate_models`): ACC, ⇑ACC,
RR, NFR (repaired/broken counts) on the test split for every fixed model;
ASR (PGD, the pair's ``asr`` block) and AAOD (when the dataset has groups)
jointly over the stack of non-corrupted seeds, on one key-drawn sample of
test inputs that the original and all those models classify correctly.
Post-processing ensembles (``config.ensembles``) combine the original with
each fixed model via :func:`dlfix_jax.ensembles.combine`, for every approach
or only those listed in ``config.ensemble_approaches``. Their ASR attacks the
combination's log-probabilities (cross-entropy on probabilities, whatever the
pair's ``asr.softmax``) on inputs that the original and *that combination*
classify correctly, so an ensemble's ASR — "NO" included — is comparable
across combinations but not identical to the record's own ``asr``, whose
sample is shared by all S fixed models.

Progress: one line per fixing run and per record (approach, seed, status,
elapsed, ETA) through absl logging.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import datetime
import functools
import os
import signal
import subprocess
import threading
import time
import traceback
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

import dlfix_jax
from dlfix_jax import data as data_lib
from dlfix_jax import ensembles
from dlfix_jax import fileio
from dlfix_jax import fixers
from dlfix_jax import progress as progress_lib
from dlfix_jax import seed_axis as seeds_lib
from dlfix_jax.fixers import base as fixers_base
from dlfix_jax.metrics import classification as cls
from dlfix_jax.metrics import evaluate as evaluate_lib
from dlfix_jax.metrics import fairness, pgd
from dlfix_jax.metrics import timing
from dlfix_jax.study import distributed
from dlfix_jax.study import store as store_lib
from dlfix_jax.training import checkpoint, train as train_lib

# Named PRNG streams folded into jax.random.key(config.seed).
STREAM_FIX, STREAM_EVAL, STREAM_ENSEMBLE = 1, 2, 3

METRIC_KEYS = ("acc", "acc_orig", "d_acc", "rr", "nfr", "repaired", "broken",
               "asr", "asr_orig", "d_asr", "aaod", "aaod_orig", "d_aaod",
               "time_s", "time_compile_s", "time_execute_s")


class FixTimeout(Exception):
    """A fixing run exceeded the per-run time budget."""


# ---------------------------------------------------------------------------
# Small helpers.


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")


@functools.lru_cache(maxsize=1)
def git_rev() -> str:
    """``git rev-parse HEAD`` of the package's checkout, or "unknown"."""
    here = os.path.dirname(os.path.abspath(dlfix_jax.__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def approach_names(config) -> list[str]:
    """The approaches of ``config.approaches`` ("all" or a comma list)."""
    spec = config.approaches
    if isinstance(spec, str):
        spec = spec.strip()
        if spec == "all":
            if not fixers.names():
                raise ValueError(
                    "approaches='all' but no fixer is registered (the "
                    "modules in dlfix_jax.fixers._FIXER_MODULES register "
                    "them on import)")
            return fixers.names()
        items = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        items = [str(s) for s in spec]
    for name in items:
        fixers.get(name)  # raises KeyError listing the registered ones
    if not items:
        raise ValueError("config.approaches names no approach")
    if len(set(items)) != len(items):
        raise ValueError(f"approaches listed twice in {items}")
    return items


def _comma_list(spec) -> list[str]:
    spec = spec or ""
    if isinstance(spec, str):
        return [s.strip() for s in spec.split(",") if s.strip()]
    return [str(s) for s in spec]


def _ensemble_names(config) -> list[str]:
    return _comma_list(config.get("ensembles", ""))


def _ensembles_for(config, approach: str, combos: list[str]) -> list[str]:
    """The combinations evaluated for ``approach``: all of ``combos`` when
    ``config.ensemble_approaches`` is "all" (default), else only for the
    approaches it lists."""
    which = config.get("ensemble_approaches", "all") or "all"
    if which == "all" or approach in _comma_list(which):
        return combos
    return []


def fixer_config(spec, overrides) -> ml_collections.ConfigDict:
    """The fixer's config with the study's overrides (the one override rule:
    :func:`dlfix_jax.fixers.base.fixer_config`)."""
    return fixers_base.fixer_config(spec, overrides)


def info_summary(info: Any, max_list: int = 64, spec=None) -> Any:
    """A JSON-safe, size-bounded summary of ``FixResult.info``
    (:func:`dlfix_jax.fixers.base.summarize_info`)."""
    return fixers_base.summarize_info(spec, info, max_list)


def _index(tree, i: int):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def _all_finite(tree) -> bool:
    leaves = [a for a in jax.tree_util.tree_leaves(tree)
              if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.inexact)]
    return all(bool(jnp.all(jnp.isfinite(a))) for a in leaves)


# ---------------------------------------------------------------------------
# Timing and the time budget.


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raises :class:`FixTimeout` in the main thread after ``seconds``.

    A no-op when ``seconds`` is falsy, off the main thread or where
    ``SIGALRM`` does not exist. The exception is raised at the next Python
    bytecode boundary: a running XLA computation or C call finishes first.
    """
    usable = (seconds and seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def handler(signum, frame):
        del signum, frame
        raise FixTimeout(f"time budget of {seconds:g}s exceeded")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------
# Running a fixer over seeds.


def seed_keys(config, n: int) -> list[jax.Array]:
    """Key of seed s: ``fold_in(fold_in(key(config.seed), STREAM_FIX), s)``."""
    base = jax.random.fold_in(jax.random.key(int(config.seed)), STREAM_FIX)
    return [jax.random.fold_in(base, s) for s in range(n)]


def run_sequential(spec, problem, cfg, keys: Sequence[jax.Array],
                   budget_s: float | None,
                   progress: Callable[[int, dict], None] | None = None
                   ) -> list[dict]:
    """Runs ``spec.fix`` once per key. Returns one outcome dict per key:
    {"status": "ok"|"failure", "reason", "variables", "info", "time_s",
    "time_compile_s", "time_execute_s"}."""
    outs: list[dict] = []
    timed_out = None
    for s, key in enumerate(keys):
        if timed_out is not None:
            outs.append({"status": "failure", "variables": None, "info": {},
                         "reason": f"not run: seed {timed_out} exceeded the "
                                   f"time budget of {budget_s:g}s",
                         "time_s": None, "time_compile_s": None,
                         "time_execute_s": None})
            if progress:
                progress(s, outs[-1])
            continue
        t0 = time.perf_counter()
        out = {"variables": None, "info": {}, "reason": None}
        timer = timing.Timer()
        try:
            with timer, time_limit(budget_s):
                res = spec.fix(key, problem, cfg)
                jax.block_until_ready(res.variables)
            out.update(status="ok", variables=res.variables, info=res.info)
        except FixTimeout as e:
            out.update(status="failure", reason=f"timeout: {e}")
        except Exception as e:  # noqa: BLE001 - any fixer error is a result
            logging.warning("fixer %s seed %d raised:\n%s", spec.name, s,
                            traceback.format_exc())
            out.update(status="failure",
                       reason=f"{type(e).__name__}: {e}"[:2000])
        dt = time.perf_counter() - t0
        out.update(time_s=dt, time_compile_s=timer.compile_s,
                   time_execute_s=max(dt - timer.compile_s, 0.0))
        if budget_s and dt > budget_s:
            if out["status"] == "ok" or out["reason"].startswith("timeout"):
                out.update(status="failure", variables=None, reason=(
                    f"timeout: time budget of {budget_s:g}s exceeded "
                    f"({dt:.1f}s)"))
            timed_out = s
        outs.append(out)
        if progress:
            progress(s, out)
    return outs


def run_vmapped(spec, problem, cfg, keys: Sequence[jax.Array],
                budget_s: float | None) -> list[dict]:
    """Runs all seeds in one ``vmap(fix)`` call; same outcome dicts as
    :func:`run_sequential` with the batch's times divided by S."""
    n = len(keys)
    stacked = jnp.stack(keys)
    # The registry's contract (FixerSpec.vmappable) is exactly
    # ``jax.vmap(fix, in_axes=(0, None, None))``: the problem is not traced
    # (fixers may do host work on it) and each fixer jits its own kernels.
    fn = jax.vmap(lambda k: spec.fix(k, problem, cfg))
    t0 = time.perf_counter()
    timer = timing.Timer()
    try:
        with timer, time_limit(budget_s * n if budget_s else None):
            res = fn(stacked)
            jax.block_until_ready(res.variables)
    except Exception as e:  # noqa: BLE001
        dt = time.perf_counter() - t0
        if isinstance(e, FixTimeout):
            reason = f"timeout: {e} (vmapped over {n} seeds)"
        else:
            logging.warning("fixer %s (vmapped) raised:\n%s", spec.name,
                            traceback.format_exc())
            reason = f"{type(e).__name__}: {e}"[:2000]
        return [{"status": "failure", "reason": reason, "variables": None,
                 "info": {}, "time_s": dt / n, "time_compile_s": None,
                 "time_execute_s": None, "batch_time_s": dt}
                for _ in range(n)]
    total, compile_s = timer.total_s, timer.compile_s
    outs = []
    for s in range(n):
        out = {"status": "ok", "reason": None,
               "variables": _index(res.variables, s),
               "info": _index(res.info, s), "time_s": total / n,
               "time_compile_s": compile_s / n,
               "time_execute_s": timer.execute_s / n, "batch_time_s": total,
               "batch_compile_s": compile_s}
        if budget_s and total > budget_s * n:
            out.update(status="failure", variables=None, reason=(
                f"timeout: time budget of {budget_s:g}s per seed exceeded "
                f"({total:.1f}s for {n} vmapped seeds)"))
        outs.append(out)
    return outs


# ---------------------------------------------------------------------------
# Evaluation.


def check_corrupted(model, fixed_list: Sequence[dict], dataset,
                    margin: float, batch_size: int) -> list[str | None]:
    """Per fixed model: None, or why it is corrupted (non-finite parameters
    or test logits, or accuracy <= 100/num_classes + margin). A streamed
    test split is read batch by batch."""
    chance = 100.0 / dataset.num_classes
    out = []
    for v in fixed_list:
        if not _all_finite(v):
            out.append("non-finite parameters")
            continue
        stacked = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], v)
        n = n_bad = n_ok = 0
        for b in evaluate_lib.test_batches(dataset.test):
            yb = np.asarray(b.y, np.int32)
            if not len(yb):
                continue
            pred, finite = seeds_lib.predict_stack(
                model, stacked, np.asarray(b.x, np.float32), batch_size,
                "sequential", return_finite=True)
            n += len(yb)
            n_bad += int(np.sum(~finite[0]))
            n_ok += int(np.sum(pred[0] == yb))
        if n_bad:
            out.append(f"non-finite outputs on {n_bad}/{n} test inputs")
            continue
        acc = 100.0 * n_ok / max(n, 1)
        if acc <= chance + margin:
            out.append(f"accuracy {acc:.2f}% <= chance {chance:.2f}% + "
                       f"margin {margin:g}")
            continue
        out.append(None)
    return out


def evaluate_fixed(key, model, variables, fixed_list, dataset, pair_cfg,
                   config, asr: bool = True) -> list[dict]:
    """Metrics of the given fixed models evaluated together (one ASR sample
    for all of them); returns one metrics dict per model. ``asr=False`` (used
    for corrupted models) skips PGD whatever the pair's config says."""
    stacked = seeds_lib.stack_variables(fixed_list)
    acfg = pair_cfg.asr
    res = evaluate_lib.evaluate_models(
        key, model, variables, stacked, dataset,
        asr=bool(asr and acfg.enabled),
        aaod=getattr(dataset.test, "group", None) is not None,
        eps=acfg.eps, softmax=acfg.softmax, n_samples=int(acfg.n_samples),
        strategy=str(config.eval_strategy),
        batch_size=int(config.eval_batch_size))
    return [_per_seed(res, s) for s in range(len(fixed_list))]


def _per_seed(res: dict, s: int) -> dict:
    """Seed ``s``'s metrics from an ``evaluate_models`` result (per-seed
    values are sequences of length S; originals are scalars)."""
    out = {}
    for k in METRIC_KEYS:
        if k.startswith("time"):
            continue
        v = res.get(k)
        if v is None:
            out[k] = None
            continue
        if isinstance(v, (list, tuple)):
            v = v[s]   # per-seed list; None for a corrupted model
            out[k] = None if v is None else np.asarray(v).item()
            continue
        a = np.asarray(v)
        out[k] = (a.item() if a.ndim == 0 else a[s].item())
    return out


def _predict_probs(fn, x, batch_size: int) -> np.ndarray:
    return np.concatenate([np.asarray(fn(jnp.asarray(x[i:i + batch_size])))
                           for i in range(0, len(x), batch_size)])


@functools.lru_cache(maxsize=None)
def _combo_attack(name: str, model, temperature: float | None, steps: int,
                  rel_stepsize: float):
    """Jitted L∞ PGD against combination ``name`` of (model, model): the
    variables, key and inputs are traced, so it compiles once per name (US:
    once per fitted temperature). The loss is cross-entropy on the log of
    the combination's probabilities (= −log p_y), the success is judged on
    the final iterate, exactly as :mod:`dlfix_jax.metrics.pgd` otherwise."""

    @jax.jit
    def attack(vo, vr, key, x0, y, start, eps, lo, hi):
        fn, _ = ensembles.predict_fn(name, key, model, vo, model, vr,
                                     temperature=temperature)

        def logp(x):
            return jnp.log(jnp.maximum(fn(x), 1e-30))

        grad = jax.grad(lambda x: jnp.sum(pgd.foolbox_crossentropy(logp(x),
                                                                   y)))

        def step(_, x):
            x = x + rel_stepsize * eps * jnp.sign(grad(x))
            x = x0 + jnp.clip(x - x0, -eps, eps)
            return jnp.clip(x, lo, hi)

        x = jax.lax.fori_loop(0, steps, step, start)
        return jnp.argmax(fn(x), -1) != y

    return attack


def _ensembles_need_memory(dataset) -> None:
    """Raises unless the test split is in memory (ensembles read it whole)."""
    if evaluate_lib.is_streamed(dataset.test):
        raise ValueError(f"post-processing ensembles need the test split in "
                         f"memory; {dataset.name}'s is streamed (turn them "
                         f"off with --config.ensembles=)")


def evaluate_ensembles(key, model, variables, fixed_list, dataset,
                       names: Sequence[str], pair_cfg, config) -> list[dict]:
    """Per fixed model, ``{combo: {acc, rr, nfr, asr, aaod}}`` of the
    post-processing combinations of :mod:`dlfix_jax.ensembles` (M_o with
    that fixed model) on the test split; US fits its temperature on the
    validation inputs (unlabeled).

    ASR of a combination: L∞ PGD with the study's settings (40 steps, step
    ε/30, random start, bounds = min/max of the sample) on up to
    ``asr.n_samples`` test inputs, drawn with the key, that the original
    model and the combination both classify correctly; the loss is
    cross-entropy on the combination's log-probabilities. UP/UD reuse one
    key per evaluation (a fixed noise/dropout draw), so the attacked
    function is deterministic. AAOD only when the dataset has groups.
    """
    _ensembles_need_memory(dataset)
    x = np.asarray(dataset.test.x, np.float32)
    y = np.asarray(dataset.test.y, np.int32)
    ux = np.asarray(dataset.valid.x, np.float32)
    group = dataset.test.group
    bs = int(config.eval_batch_size)
    acfg = pair_cfg.asr
    eps = acfg.eps if acfg.eps is not None else pgd.epsilon_for(dataset.name)
    po = seeds_lib.predict(model, variables, x, bs)
    out = []
    prog = progress_lib.Progress(len(fixed_list) * len(names),
                                 "ensemble combinations", every_s=20.0)
    for s, vr in enumerate(fixed_list):
        res = {}
        for i, name in enumerate(names):
            k = jax.random.fold_in(jax.random.fold_in(key, s), i)
            fn, info = ensembles.predict_fn(name, k, model, variables, model,
                                            vr, unlabeled_x=ux)
            pf = np.argmax(_predict_probs(fn, x, bs), -1)
            fl = cls.to_python(cls.flips(po, pf, y))
            m = {"acc": float(cls.accuracy(pf, y)), "rr": fl["rr"],
                 "nfr": fl["nfr"], "asr": None, "aaod": None}
            if group is not None:
                m["aaod"] = float(fairness.aaod(pf, y, group,
                                                dataset.num_classes))
            if acfg.enabled:
                ka, kb = jax.random.split(jax.random.fold_in(k, 1))
                idx = pgd.select_samples(ka, (po == y) & (pf == y),
                                         int(acfg.n_samples))
                if len(idx):
                    x0 = x[idx]
                    lo, hi = float(x0.min()), float(x0.max())
                    start = pgd.random_start_points(kb, x0, eps, (lo, hi))
                    attack = _combo_attack(name, model,
                                           info.get("temperature"),
                                           pgd.STEPS, pgd.REL_STEPSIZE)
                    succ = attack(variables, vr, k, jnp.asarray(x0),
                                  jnp.asarray(y[idx]), start,
                                  jnp.float32(eps), jnp.float32(lo),
                                  jnp.float32(hi))
                    m["asr"] = 100.0 * float(np.mean(np.asarray(succ)))
            res[name] = m
            prog.step(extra=f"seed {s} {name}")
        out.append(res)
    prog.done()
    return out


# ---------------------------------------------------------------------------
# The study.


def _cell_progress(todo: int, prefix: str = "") -> progress_lib.Progress:
    """Elapsed time and ETA over the cells that need computing (this
    process's, with several; ``prefix`` names the process). Its ``step``
    lines go into the runner's own per-cell log lines, so it never logs by
    itself."""
    p = progress_lib.Progress(todo, desc=(prefix.strip() or "cells"),
                              every_s=float("inf"))
    p.prefix = prefix  # the runner's own lines start with it
    return p


def _pair_items(config) -> list[tuple[str, Any]]:
    return sorted(config.pairs.items())


def cell_variant(fixer_cfg, pair_cfg, config) -> str:
    """A short hash of what makes a cell: the fixer's full config, the base
    model (a brought one's content, ``pair.base``; else its training
    config, which determines the model the study trains), the study seed
    and the pair's ASR settings. Part of the cell key, so a changed
    config computes new cells instead of returning old ones. Not included:
    the time budget and batch sizes (they change how, not what, is
    computed)."""
    base = pair_base(pair_cfg)
    what = {"fixer": fileio.json_safe(fixer_cfg.to_dict()
                                      if hasattr(fixer_cfg, "to_dict")
                                      else dict(fixer_cfg)),
            # A brought base model: its content; else the training config
            # (which determines the model the study trains).
            "base": base_fingerprint(base) if base else None,
            "train": (fileio.json_safe(pair_cfg.train.dataset.to_dict())
                      if base else fileio.json_safe(pair_cfg.train.to_dict())),
            "asr": fileio.json_safe(pair_cfg.asr.to_dict())
            if "asr" in pair_cfg else None,
            "seed": int(config.seed)}
    text = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _base_record(pair_ds, pair_model, spec, seed, status, reason, cfg,
                 started, variant=None):
    return {"key": store_lib.make_key(pair_ds, pair_model, spec.name, seed,
                                      variant),
            "variant": variant,
            "dataset": pair_ds, "model": pair_model, "approach": spec.name,
            "abbrev": spec.abbrev or spec.name, "seed": int(seed),
            "status": status, "reason": reason,
            "metrics": {k: None for k in METRIC_KEYS},
            "fixer_config": fileio.json_safe(cfg) if cfg is not None
            else None,
            "info": {}, "version": dlfix_jax.__version__, "git_rev": git_rev(),
            "started": started, "finished": None}


def run_study(config, workdir: str, force: bool = False) -> list[dict]:
    """Runs (or resumes) the study of ``config`` in ``workdir``.

    On one process (``jax.process_count() == 1``) the records go straight
    to ``results.jsonl``. With several processes (``jax.distributed``;
    ``dlfix study --num_processes ...``) the (pair, approach) units are
    split across the processes, each appends to its own shard, and process
    0 merges the shards at the end; see :mod:`dlfix_jax.study.distributed`.
    Every process returns the same merged records.

    Args:
      config: a study config (``experiments/configs/study_*.py``).
      workdir: output directory: ``results.jsonl`` (the store), ``base/``
        (base models), ``config.json``. Shared by all processes.
      force: recompute every cell; newer records supersede older ones.

    Returns:
      The store's records (newest per key) for this config's cells, in
      grid order.
    """
    os.makedirs(workdir, exist_ok=True)
    S = int(config.num_seeds)
    if S < 1:
        raise ValueError(f"num_seeds must be >= 1, got {S}")
    approaches = approach_names(config)
    strategy = str(config.fix_strategy)
    seeds_lib.fixer_seed_mode(strategy)  # raises on a strategy fixers lack
    # Every fixer config is built (and checked) before anything is written.
    cfgs = {a: fixer_config(fixers.get(a), config.fixers.get(a)
                            if "fixers" in config else None)
            for a in approaches}
    coord = distributed.coordinator()
    if coord is None:
        return _run_one_process(config, workdir, force, approaches, cfgs, S,
                                strategy)
    try:
        return _run_multi_process(coord, config, workdir, force, approaches,
                                  cfgs, S, strategy)
    except BaseException as e:
        coord.fail(f"{type(e).__name__}: {e}")
        raise


def _grid(config, approaches, cfgs, S, done) -> list[tuple]:
    """``(pair, dataset, model, approach, variant, missing seeds)`` per
    (pair, approach) unit, in grid order (pairs by name, approaches in
    config order)."""
    grid = []
    for pname, pcfg in _pair_items(config):
        ds_name, m_name = pcfg.train.dataset.name, pcfg.train.model.name
        for a in approaches:
            var = cell_variant(cfgs[a], pcfg, config)
            missing = [s for s in range(S) if store_lib.make_key(
                ds_name, m_name, a, s, var) not in done]
            grid.append((pname, ds_name, m_name, a, var, missing))
    return grid


def _grid_records(grid, S, latest) -> list[dict]:
    order = [store_lib.make_key(g[1], g[2], g[3], s, g[4]) for g in grid
             for s in range(S)]
    return [latest[k] for k in order if k in latest]


def _run_units(units, config, workdir, store, S, strategy, progress,
               loaded) -> int:
    """Computes the units (grid entries with missing seeds), appending each
    unit's records to ``store`` in one write; returns how many records
    superseded older ones."""
    combos = _ensemble_names(config)
    budget = float(config.time_budget_s or 0.0) or None
    root = jax.random.key(int(config.seed))
    keys = seed_keys(config, S)
    superseded = 0
    for pname, ds_name, m_name, a, var, missing in units:
        pcfg = config.pairs[pname]
        if pname not in loaded:
            loaded[pname] = _load_pair(pcfg, workdir, data_lib, train_lib,
                                       checkpoint, fixers)
        model, variables, dataset, problem = loaded[pname]
        if _ensembles_for(config, a, combos):
            _ensembles_need_memory(dataset)  # before any fixing
        spec = fixers.get(a)
        recs = _run_approach(
            spec, model, variables, dataset, problem, pcfg, config, keys,
            budget, strategy, _ensembles_for(config, a, combos),
            jax.random.fold_in(root, STREAM_EVAL), progress, var)
        # Every seed of the approach was fixed again (deterministic per
        # seed key) and evaluated together, on one shared PGD sample.
        # Seeds recorded before are superseded by these records, so all
        # seeds of a cell share the sample whatever their number
        # (issue 11 item 5: raising num_seeds used to keep old seeds'
        # ASR measured on the old, smaller sample).
        superseded += len(recs) - len(missing)
        store.append_many(recs)
        for r in recs:
            m = r["metrics"]
            logging.info(
                "%srecorded %s: %s%s | acc %s rr %s nfr %s asr %s",
                progress.prefix, r["key"], r["status"],
                f" ({r['reason']})" if r["reason"] else "",
                _f(m.get("acc")), _f(m.get("rr")), _f(m.get("nfr")),
                _f(m.get("asr")))
    return superseded


def _log_plan(config, approaches, S, grid, where, prefix=""):
    todo = sum(S for g in grid if g[5])
    logging.info("%sstudy %s: %d pairs x %d approaches x %d seeds; %d "
                 "cells to compute, %d already in %s", prefix,
                 config.get("name", ""), len(config.pairs), len(approaches),
                 S, todo, len(grid) * S - todo, where)
    for g in grid:
        if not g[5]:
            logging.info("%sskip %s/%s/%s: all %d seeds recorded", prefix,
                         g[1], g[2], g[3], S)


def _run_one_process(config, workdir, force, approaches, cfgs, S, strategy):
    store = store_lib.Store(workdir)
    with store.lock():
        checkpoint.atomic_write_json(os.path.join(workdir, "config.json"),
                                     fileio.json_safe(config.to_dict()))
        if store_lib.shard_paths(workdir):
            # Shards of a killed multi-process run: their records count.
            store.merge_shards()
        done = set() if force else store.completed_keys()
        grid = _grid(config, approaches, cfgs, S, done)
        _log_plan(config, approaches, S, grid, store.path)
        units = [g for g in grid if g[5]]
        # An approach with any missing seed runs all S seeds (the seed axis
        # is batched); progress counts those runs.
        progress = _cell_progress(S * len(units))
        superseded = _run_units(units, config, workdir, store, S, strategy,
                                progress, {})
        if force or superseded:
            removed = store.compact()
            if removed:
                logging.info("compacted %s: %d superseded records removed",
                             store.path, removed)
    return _grid_records(grid, S, store.records())


def _run_multi_process(coord, config, workdir, force, approaches, cfgs, S,
                       strategy):
    """The multi-process run (see :mod:`dlfix_jax.study.distributed`)."""
    me, n = coord.index, coord.count
    prefix = f"[process {me}/{n}] "
    with contextlib.ExitStack() as held:
        # 1. Setup: process 0 holds the main lock for the whole run, merges
        # an earlier run's shards and writes config.json; the others wait.
        if me == 0:
            main = store_lib.Store(workdir)
            held.enter_context(main.lock())
            main.merge_shards()
            checkpoint.atomic_write_json(os.path.join(workdir, "config.json"),
                                         fileio.json_safe(config.to_dict()))
            coord.publish("setup", "ok")
        else:
            coord.receive("setup")
            main = store_lib.Store(workdir, repair=False)
        # 2. Plan: the same on every process (all read the merged file,
        # which nobody writes before step 5).
        done = set() if force else main.completed_keys()
        grid = _grid(config, approaches, cfgs, S, done)
        units = [g for g in grid if g[5]]
        digest = distributed.plan_hash([(g[0], g[3], g[4], g[5])
                                        for g in grid] + [n, bool(force)])
        if me == 0:
            coord.publish("plan", digest)
            _log_plan(config, approaches, S, grid, main.path, prefix)
        elif coord.receive("plan") != digest:
            raise RuntimeError(
                f"process {me}'s study plan differs from process 0's (a "
                "different config, code version or fixer registry); every "
                "process must run the same study")
        mine = distributed.assign(units, n)[me]
        logging.info("%s%d of %d units (pair, approach) are this process's: "
                     "%s", prefix, len(mine), len(units),
                     ", ".join(f"{g[1]}/{g[2]}/{g[3]}" for g in mine) or "-")
        # 3. Base models: each trains (or loads) its share, then all wait,
        # so no base model is trained by two processes at once.
        loaded: dict = {}
        need = sorted({g[0] for g in units
                       if not pair_base(config.pairs[g[0]])})
        for pname in distributed.assign(need, n)[me]:
            loaded[pname] = _load_pair(config.pairs[pname], workdir,
                                       data_lib, train_lib, checkpoint,
                                       fixers)
        coord.barrier("base")
        # 4. Fixing into this process's shard.
        shard = store_lib.Store(workdir, shard=me)
        with shard.lock():
            _run_units(mine, config, workdir, shard, S, strategy,
                       _cell_progress(S * len(mine), prefix), loaded)
        coord.barrier("fixed")
        # 5. Process 0 merges every shard into results.jsonl.
        if me == 0:
            res = main.merge_shards()
            if res["duplicates"]:
                logging.warning("%skeys recorded by several shards: %s",
                                prefix, res["duplicates"])
            coord.publish("merged", "ok")
        else:
            coord.receive("merged")
    return _grid_records(grid, S, main.records())


def _f(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def pair_base(pcfg) -> str:
    """The pair's ``base`` (a training workdir or a Keras .h5 to fix as it
    is), or "" when the study trains its own base model."""
    return str(pcfg.get("base") or "")


def with_base(config, base: str):
    """``config`` with its single pair's ``base`` set to ``base``."""
    if len(config.pairs) != 1:
        raise ValueError(f"--base needs a study config with one pair; this "
                         f"one has {len(config.pairs)}: "
                         f"{sorted(config.pairs)}")
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for pair in config.pairs.values():
            pair.base = base
    return config

def base_fingerprint(path: str) -> str:
    """Cached :func:`_fingerprint` of ``path`` as it is now (size, mtime)."""
    st = os.stat(path)
    return _fingerprint(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _fingerprint(path: str, size: int, mtime_ns: int) -> str:
    """A content hash of a brought base model (the .h5 file, or a workdir's
    final ``variables.msgpack`` and model description), so a replaced model
    file makes new cells."""
    if os.path.isdir(path):
        files = [os.path.join(path, n) for n in (checkpoint.VARIABLES_FILE,
                                                 checkpoint.MODEL_FILE,
                                                 checkpoint.METRICS_FILE)]
    else:
        files = [path]
    h = hashlib.sha256()
    for f in files:
        if os.path.isfile(f):
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def _load_pair(pcfg, workdir, data_lib, train_lib, checkpoint, fixers):
    """Trains or loads the pair's base model (``pcfg.base``: a brought
    workdir or Keras .h5, never retrained); returns (model, variables,
    dataset, problem)."""
    tcfg = pcfg.train
    dataset = data_lib.load(tcfg.dataset.name, data_dir=tcfg.dataset.data_dir,
                            seed=tcfg.dataset.seed)
    base = pair_base(pcfg)
    if base:
        model, variables, history = checkpoint.load_model(base, history=True)
        if model.num_classes != dataset.num_classes:
            raise ValueError(
                f"base model {base!r} has {model.num_classes} classes but "
                f"dataset {dataset.name!r} has {dataset.num_classes}")
        logging.info("base model %s: brought (not retrained)%s", base,
                     f", {len(history)} history epochs" if history else "")
        problem = fixers.make_problem(model, variables, dataset,
                                      history=tuple(history) if history
                                      else None)
        return model, variables, dataset, problem
    base_dir = os.path.join(workdir, "base",
                            f"{tcfg.dataset.name}_{tcfg.model.name}")
    res = train_lib.train_and_evaluate(tcfg, base_dir, dataset=dataset)
    logging.info("base model %s: %s (test accuracy %.4f)", base_dir,
                 "loaded" if res.loaded else "trained",
                 res.metrics["test_accuracy"])
    target = res.model.abstract_variables()
    history = None
    if checkpoint.history_epochs(base_dir):
        history = checkpoint.load_history(base_dir, target=target)
    problem = fixers.make_problem(res.model, res.variables, dataset,
                                  history=history)
    return res.model, res.variables, dataset, problem


def _run_approach(spec, model, variables, dataset, problem, pcfg, config,
                  keys, budget, strategy, combos, eval_key, progress,
                  variant=None) -> list[dict]:
    """Every seed's record of one approach on one pair."""
    ds_name, m_name = pcfg.train.dataset.name, pcfg.train.model.name
    S = len(keys)
    started = _now()
    overrides = config.fixers.get(spec.name) if "fixers" in config else None
    cfg = fixer_config(spec, overrides)
    recs = [_base_record(ds_name, m_name, spec, s, "ok", None, cfg, started,
                         variant)
            for s in range(S)]
    reason = spec.applicable(fixers_base.problem_info(
        model, dataset, len(problem.history) if problem.history else 0))
    if reason:
        for r in recs:
            r.update(status="unadaptable", reason=str(reason),
                     finished=_now())
        logging.info("%s/%s/%s: unadaptable (%s) %s", ds_name, m_name,
                     spec.name, reason, progress.step(S))
        return recs

    mode = seeds_lib.fixer_seed_mode(strategy, spec.vmappable)
    if strategy == "vmap" and not spec.vmappable:
        logging.info("fixer %s is not vmappable; running sequentially",
                     spec.name)
    logging.info("%s/%s/%s: fixing %d seeds (%s)", ds_name, m_name,
                 spec.name, S, mode)

    def on_seed(s, out):
        logging.info("%s/%s/%s seed %d: %s in %s%s %s", ds_name, m_name,
                     spec.name, s, "fixed" if out["status"] == "ok"
                     else "FAILED", progress_lib.format_duration(out["time_s"]),
                     f" ({out['reason']})" if out["reason"] else "",
                     progress.step())

    if mode == "vmap":
        outs = run_vmapped(spec, problem, cfg, keys, budget)
        for s, out in enumerate(outs):
            on_seed(s, out)
    else:
        outs = run_sequential(spec, problem, cfg, keys, budget, on_seed)

    for r, out in zip(recs, outs):
        r["status"], r["reason"] = out["status"], out["reason"]
        r["metrics"].update(time_s=out["time_s"],
                            time_compile_s=out["time_compile_s"],
                            time_execute_s=out["time_execute_s"])
        r["info"] = info_summary(out["info"], spec=spec)
        r["execution"] = {"mode": mode, "backend": jax.default_backend(),
                          "seeds_in_call": S if mode == "vmap" else 1}
        if "batch_time_s" in out:
            r["execution"].update(batch_time_s=out["batch_time_s"],
                                  batch_compile_s=out.get("batch_compile_s"))

    ok = [s for s, o in enumerate(outs) if o["status"] == "ok"]
    fixed = [outs[s]["variables"] for s in ok]
    if ok:
        bs = int(config.eval_batch_size)
        why = check_corrupted(model, fixed, dataset,
                              float(config.corrupt_margin), bs)
        good = [s for s, w in zip(ok, why) if w is None]
        bad = [(s, w) for s, w in zip(ok, why) if w is not None]
        if good:
            ms = evaluate_fixed(eval_key, model, variables,
                                [outs[s]["variables"] for s in good], dataset,
                                pcfg, config)
            for s, m in zip(good, ms):
                recs[s]["metrics"].update(m)
        if bad:
            ms = evaluate_fixed(eval_key, model, variables,
                                [outs[s]["variables"] for s, _ in bad],
                                dataset, pcfg, config, asr=False)
            for (s, w), m in zip(bad, ms):
                recs[s].update(status="corrupted", reason=w)
                recs[s]["metrics"].update(m)
        if combos and good:
            ens = evaluate_ensembles(
                jax.random.fold_in(eval_key, STREAM_ENSEMBLE), model,
                variables, [outs[s]["variables"] for s in good], dataset,
                combos, pcfg, config)
            for s, e in zip(good, ens):
                recs[s]["ensembles"] = e
    finished = _now()
    for r in recs:
        r["finished"] = finished
    return recs
