"""Base-model training: ``train_and_evaluate(config, workdir) -> TrainResult``.

What it does, for a config from ``experiments/configs/<dataset>_<model>.py``:

1. Loads ``config.dataset.name`` (``dlfix_jax.data.load``) and builds
   ``config.model.name`` for the dataset's classes and input shape.
2. Trains with optax (``config.train.optimizer``: ``adam`` (default),
   ``adamw``, ``sgd`` or ``momentum``; optional cosine decay and weight
   decay) on softmax cross-entropy. BatchNorm statistics are carried
   functionally in the variables; dropout gets a key per step.
3. After every epoch: logs loss, examples/s and validation accuracy
   (absl logging) and saves the variables as an orbax checkpoint
   ``workdir/checkpoints/<epoch>`` (the training history NeuRecover needs).
4. Writes ``workdir/variables.msgpack`` (the final variables),
   ``workdir/config.json`` and, last and atomically, ``workdir/metrics.json``
   with train/valid/test accuracy, seed, epochs, time, per-epoch records,
   the model's name/classes/input shape and the config.

Randomness: one root key ``jax.random.key(config.seed)``; named streams are
``fold_in(root, INIT | SHUFFLE | DROPOUT)``; epoch ``e``'s permutation uses
``fold_in(shuffle, e)`` and step ``s``'s dropout ``fold_in(dropout, s)``.
Same config, same machine -> bitwise the same variables (also across a
kill and resume).

Batches: each epoch is one permutation of the training set cut into batches
of ``config.train.batch_size``; the last partial batch is filled up with
the first examples of the same permutation, so every example is seen at
least once per epoch and every batch has the same shape (one compile).
Steps are the shared loop's (:mod:`dlfix_jax.training.loop`), jitted one by one (a
``lax.scan`` over steps was ~8x slower for
VGG16 on XLA:CPU); ``config.train.steps_per_call`` steps are dispatched
between host-side loss checks.

The final variables are those after the last epoch (no best-on-validation
selection), as in an ordinary ``model.fit``.

Rerunning on a workdir that holds a completed run with the same config
loads it (logged as "loaded") instead of retraining; a completed run with a
different config raises unless ``force=True``.

Reliability (issue 11):

* The config is validated first (:func:`validate_config`: one clear
  ``ValueError`` line per bad key, e.g. ``epochs=-1``, a learning rate
  outside ``(0, MAX_LEARNING_RATE]``, an unknown optimizer), and the data
  are loaded and the model built, before anything in the workdir is removed
  (so ``force=True`` with a config error or missing data deletes nothing).
* Non-finite training inputs are refused up front; a non-finite loss raises
  ``FloatingPointError`` (the shared loop's host check).
* ``workdir/train.lock`` is ``flock``-ed (:func:`workdir_lock`, as the study
  store locks its results): shared while loading a completed run, exclusive
  while training, so a second run on a workdir being trained is refused
  (``RuntimeError``) before it touches anything.
* After every epoch, once its checkpoint is committed, ``workdir/resume.msgpack``
  records the optimiser state, step, per-epoch records and training time.
  A run killed before ``metrics.json`` resumes after its last complete
  epoch, bit-identical to an uninterrupted run (the data order and dropout
  keys are functions of the epoch and step); with no usable resume state,
  another config in the workdir, or ``force``, it restarts cleanly. Which
  one is logged and recorded as ``metrics["resumed_from_epoch"]`` /
  ``TrainResult.resumed_from`` (0 = fresh start). The file is removed once
  the run is complete. Cost: one extra write of the optimiser state per
  epoch (for Adam, twice the parameters).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import os
import shutil
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import serialization

from dlfix_jax import data as data_lib
from dlfix_jax import models
from dlfix_jax import predict as predict_lib
from dlfix_jax import rng
from dlfix_jax.data import source as source_lib
from dlfix_jax.training import checkpoint
from dlfix_jax.training import loop

# Named PRNG streams: fold_in(root, id) (dlfix_jax.rng).
INIT, SHUFFLE, DROPOUT = rng.INIT, rng.SHUFFLE, rng.DROPOUT

OPTIMIZERS = ("adam", "adamw", "sgd", "momentum")
SCHEDULES = ("constant", "cosine")
# Our choice: no config here uses more than 0.1 (SGD with momentum); above
# 1.0 every optimiser here diverges or saturates on these models, and the
# issue saw lr=1e3 "train" to 9-22% and report complete.
MAX_LEARNING_RATE = 1.0
LOCK_FILE = "train.lock"
RESUME_FILE = "resume.msgpack"


@dataclasses.dataclass
class TrainResult:
    """Outcome of :func:`train_and_evaluate`.

    Attributes:
      model: the trained :class:`~dlfix_jax.models.Model`.
      variables: its final variables.
      metrics: the content of ``workdir/metrics.json``.
      workdir: where everything was written.
      loaded: True when an existing completed run was loaded instead of
        trained.
      resumed_from: the epoch an interrupted run was resumed after (0: a
        fresh start, or loaded).
    """

    model: models.Model
    variables: dict
    metrics: dict
    workdir: str
    loaded: bool = False
    resumed_from: int = 0


def config_to_dict(config) -> dict:
    """A JSON-normalised plain dict of a ConfigDict (or dict)."""
    if isinstance(config, (ml_collections.ConfigDict,
                           ml_collections.FrozenConfigDict)):
        config = config.to_dict()
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def make_optimizer(train_cfg, steps_per_epoch: int
                   ) -> optax.GradientTransformation:
    """The optax optimizer named by ``train_cfg.optimizer``.

    Keys read: optimizer, learning_rate, epochs, and optionally
    weight_decay (L2 added to the gradient for sgd/momentum/adam, decoupled
    for adamw), momentum (default 0.9), schedule ("constant" or "cosine"),
    warmup_epochs.
    """
    lr = float(train_cfg.learning_rate)
    schedule = train_cfg.get("schedule", "constant") or "constant"
    total = int(train_cfg.epochs) * steps_per_epoch
    warmup = int(float(train_cfg.get("warmup_epochs", 0) or 0)
                 * steps_per_epoch)
    if schedule == "constant":
        lr_fn = (optax.linear_schedule(0.0, lr, warmup) if warmup
                 else optax.constant_schedule(lr))
        if warmup:
            lr_fn = optax.join_schedules(
                [lr_fn, optax.constant_schedule(lr)], [warmup])
    elif schedule == "cosine":
        lr_fn = optax.warmup_cosine_decay_schedule(
            0.0 if warmup else lr, lr, warmup, max(total, warmup + 1))
    else:
        raise ValueError(f"unknown train.schedule {schedule!r}; "
                         f"known: constant, cosine")
    wd = float(train_cfg.get("weight_decay", 0.0) or 0.0)
    name = train_cfg.get("optimizer", "adam")
    momentum = float(train_cfg.get("momentum", 0.9) or 0.0)
    if name == "adam":
        tx = optax.adam(lr_fn)
    elif name == "adamw":
        return optax.adamw(lr_fn, weight_decay=wd)
    elif name == "sgd":
        tx = optax.sgd(lr_fn)
    elif name == "momentum":
        tx = optax.sgd(lr_fn, momentum=momentum, nesterov=True)
    else:
        raise ValueError(f"unknown train.optimizer {name!r}; known: adam, "
                         f"adamw, sgd, momentum")
    if wd:
        tx = optax.chain(optax.add_decayed_weights(wd), tx)
    return tx


@functools.lru_cache(maxsize=64)
def _cached_optimizer(cfg_json: str, steps_per_epoch: int
                      ) -> optax.GradientTransformation:
    """One optimizer object per (config, steps per epoch), so the training
    step (``loop.make_step``, cached on it) compiles once per config."""
    return make_optimizer(ml_collections.ConfigDict(json.loads(cfg_json)),
                          steps_per_epoch)


def train_step(model: models.Model, train_cfg, steps_per_epoch: int):
    """``(tx, step)`` of a training config: the shared loop's cross-entropy
    step (:func:`dlfix_jax.training.loop.make_step`), cached."""
    tx = _cached_optimizer(json.dumps(config_to_dict(train_cfg),
                                      sort_keys=True), steps_per_epoch)
    return tx, loop.make_step(loop.xent(model), tx)


def predict(model: models.Model, variables: dict, x: np.ndarray,
            batch_size: int = 1000) -> np.ndarray:
    """Predicted labels (:func:`dlfix_jax.predict.predict`)."""
    return predict_lib.predict(model, variables, x, batch_size)


def accuracy(model, variables, split, batch_size=1000) -> float:
    """Fraction of ``split`` classified correctly."""
    return predict_lib.accuracy(model, variables, split, batch_size)


epoch_batches = source_lib.epoch_indices


def _completed(workdir: str) -> dict | None:
    path = os.path.join(workdir, checkpoint.METRICS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        metrics = checkpoint.read_json(path)
    except checkpoint.CheckpointError:
        return None  # a damaged metrics.json is not a completed run
    if metrics.get("status") != "complete" or not os.path.isfile(
            os.path.join(workdir, checkpoint.VARIABLES_FILE)):
        return None
    return metrics


def _diff(a: dict, b: dict, prefix="") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} != {vb!r}")
    return out


# ---------------------------------------------------------------------------
# Config validation (before anything in the workdir is touched).


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v))


def validate_config(config, dataset_given: bool = False) -> None:
    """Checks a training config up front; one clear line per problem.

    Checked: ``seed`` and ``dataset.seed`` ints; ``dataset.name`` a known
    loader (unless a ``dataset`` object is passed to
    :func:`train_and_evaluate`); ``model.name`` a registered model;
    ``train.epochs >= 1``, ``train.batch_size >= 1``,
    ``0 < train.learning_rate <= MAX_LEARNING_RATE``, ``train.optimizer``
    in :data:`OPTIMIZERS`, ``train.schedule`` in :data:`SCHEDULES`,
    ``train.weight_decay >= 0``, ``0 <= train.momentum < 1``,
    ``0 <= train.warmup_epochs <= train.epochs``,
    ``train.steps_per_call >= 1`` and ``eval_batch_size >= 1`` (optional
    keys only when present); every number finite.

    Raises:
      ValueError: ``bad training config: <key> ...``.
    """
    c = config_to_dict(config)

    def bad(msg):
        raise ValueError(f"bad training config: {msg}")

    def section(name):
        sec = c.get(name)
        if not isinstance(sec, dict):
            bad(f"{name} must be a section, got {sec!r}")
        return sec

    for key, v in (("seed", c.get("seed")),
                   ("dataset.seed", section("dataset").get("seed", 0))):
        if not _is_int(v):
            bad(f"{key} must be an int, got {v!r}")
    dname = section("dataset").get("name")
    if not dataset_given and dname not in data_lib.names():
        bad(f"dataset.name {dname!r} is unknown; known: {data_lib.names()}")
    mname = section("model").get("name")
    if mname not in models.names():
        bad(f"model.name {mname!r} is unknown; known: {models.names()}")
    t = section("train")
    for key in ("epochs", "batch_size"):
        v = t.get(key)
        if not _is_int(v) or v < 1:
            bad(f"train.{key} must be an int >= 1, got {v!r}")
    lr = t.get("learning_rate")
    if not _is_number(lr) or not 0 < lr <= MAX_LEARNING_RATE:
        bad(f"train.learning_rate must be a number in (0, "
            f"{MAX_LEARNING_RATE:g}], got {lr!r}")
    opt = t.get("optimizer", "adam")
    if opt not in OPTIMIZERS:
        bad(f"train.optimizer {opt!r} is unknown; known: "
            f"{', '.join(OPTIMIZERS)}")
    sched = t.get("schedule", "constant") or "constant"
    if sched not in SCHEDULES:
        bad(f"train.schedule {sched!r} is unknown; known: "
            f"{', '.join(SCHEDULES)}")
    ranges = {"weight_decay": (0.0, math.inf, "a number >= 0"),
              "momentum": (0.0, 1.0, "a number in [0, 1)"),
              "warmup_epochs": (0.0, float(t["epochs"]),
                                f"a number in [0, epochs={t['epochs']}]")}
    for key, (lo, hi, what) in ranges.items():
        v = t.get(key)
        if v is None:
            continue
        ok = _is_number(v) and lo <= v <= hi
        if key == "momentum":
            ok = ok and v < hi
        if not ok:
            bad(f"train.{key} must be {what}, got {v!r}")
    for key, v in (("train.steps_per_call", t.get("steps_per_call")),
                   ("eval_batch_size", c.get("eval_batch_size"))):
        if v is not None and (not _is_int(v) or v < 1):
            bad(f"{key} must be an int >= 1, got {v!r}")


# ---------------------------------------------------------------------------
# Workdir lock and resume state.


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[Callable[[], None]]:
    """A shared ``flock`` on ``workdir/train.lock`` (as the study store
    locks its results); yields ``exclusive()``, which upgrades it before
    anything is written. The kernel releases it when the process dies.

    Readers of a completed run hold it shared (several may load at once);
    a trainer holds it exclusive, so a second run on a workdir being
    trained is refused before it touches anything.

    Raises:
      RuntimeError: another process is training in ``workdir``.
    """
    fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT,
                 0o644)

    def take(mode):
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except OSError as e:
            raise RuntimeError(
                f"another process is training in {workdir} (lock "
                f"{LOCK_FILE} is held); wait for it to finish or use "
                f"another workdir") from e

    try:
        take(fcntl.LOCK_SH)
        yield lambda: take(fcntl.LOCK_EX)
    finally:
        os.close(fd)  # closing releases the flock


def _save_resume(workdir: str, epoch: int, state: loop.TrainState,
                 history: list[dict], train_time: float) -> None:
    """What a killed run needs to continue bit-identically after ``epoch``
    (its variables are the epoch checkpoint): the optimiser state, the
    step, the per-epoch records and the training time."""
    data = serialization.msgpack_serialize({
        "epoch": epoch, "step": int(state.step),
        "opt_state": serialization.to_state_dict(
            jax.tree_util.tree_map(np.asarray, state.opt_state)),
        "history_json": json.dumps(history), "train_time_s": train_time})
    checkpoint.atomic_write_bytes(os.path.join(workdir, RESUME_FILE), data)


def _resume_point(workdir: str, cfg_dict: dict, epochs: int
                  ) -> tuple[int, dict | None, str]:
    """``(epoch, resume record, why not)``: the last complete epoch a killed
    run of the same config can continue from, or ``(0, None, reason)``."""
    cfg_path = os.path.join(workdir, checkpoint.CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        return 0, None, "new workdir"
    try:
        old = checkpoint.read_json(cfg_path)
    except checkpoint.CheckpointError:
        return 0, None, "its config.json is unreadable"
    if old != cfg_dict:
        return 0, None, "it held a run of another config"
    path = os.path.join(workdir, RESUME_FILE)
    if not os.path.isfile(path):
        return 0, None, "no epoch of the previous run was complete"
    try:
        with open(path, "rb") as f:
            rec = serialization.msgpack_restore(f.read())
        epoch = int(rec["epoch"])
        rec["history"] = json.loads(rec["history_json"])
        saved = checkpoint.history_epochs(workdir)
    except Exception as e:  # noqa: BLE001 - any damage means: start over
        return 0, None, f"its resume state is unreadable ({type(e).__name__})"
    if not 1 <= epoch <= epochs or saved[:epoch] != list(range(1, epoch + 1)):
        return 0, None, (f"the checkpoint of epoch {epoch} is missing "
                         f"(saved: {saved})")
    return epoch, rec, ""


def _clear_run(workdir: str) -> None:
    """Removes every output of a previous run (under the exclusive lock)."""
    ckpt_dir = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
    if os.path.isdir(ckpt_dir):
        shutil.rmtree(ckpt_dir)
    for name in (checkpoint.METRICS_FILE, checkpoint.VARIABLES_FILE,
                 RESUME_FILE):
        path = os.path.join(workdir, name)
        if os.path.exists(path):
            os.remove(path)


def _drop_epochs_after(workdir: str, epoch: int) -> None:
    """Removes epoch checkpoints after ``epoch`` (saved by a killed run
    after its last resume state)."""
    ckpt_dir = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
    for name in os.listdir(ckpt_dir):
        head = name.split(".", 1)[0]  # "<step>" or an orbax "<step>.*tmp*"
        if head.isdigit() and (int(head) > epoch or "." in name):
            path = os.path.join(ckpt_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)


def train_and_evaluate(config, workdir: str, *, force: bool = False,
                       dataset: data_lib.Dataset | None = None
                       ) -> TrainResult:
    """Trains ``config.model.name`` on ``config.dataset.name`` into ``workdir``.

    Args:
      config: a ConfigDict as returned by an ``experiments/configs`` file
        (keys: seed, dataset.{name, data_dir, seed}, model.name,
        train.{epochs, batch_size, learning_rate, optimizer, ...},
        eval_batch_size).
      workdir: output directory (created).
      force: retrain even when ``workdir`` holds a completed run (its
        outputs are removed first, after the config and data are checked).
      dataset: an already loaded dataset to use instead of loading
        ``config.dataset`` (tests, study runners); it must be the one the
        config names.

    Order: the config is validated, the workdir locked, the data loaded
    and the model built before anything in the workdir is removed. A
    workdir holding an interrupted run of the same config (killed, no
    complete ``metrics.json``) resumes after its last complete epoch
    (bit-identical to an uninterrupted run); otherwise the run restarts
    cleanly. Either is logged and recorded (``TrainResult.resumed_from``,
    ``metrics["resumed_from_epoch"]``, 0 = a fresh start).

    Returns:
      A :class:`TrainResult`.

    Raises:
      ValueError: a bad config (:func:`validate_config`), a ``dataset``
        that is not the config's, non-finite training inputs, or a workdir
        holding a completed run of a different config (and not ``force``).
      RuntimeError: another process is training in ``workdir``.
      FloatingPointError: the loss became non-finite.
    """
    workdir = os.path.abspath(workdir)
    validate_config(config, dataset_given=dataset is not None)
    if dataset is not None and dataset.name != config.dataset.name:
        raise ValueError(f"dataset {dataset.name!r} given but config names "
                         f"{config.dataset.name!r}")
    cfg_dict = config_to_dict(config)
    os.makedirs(workdir, exist_ok=True)
    with workdir_lock(workdir) as exclusive:
        done = None if force else _completed(workdir)
        if done is not None:
            if done.get("config") != cfg_dict:
                raise ValueError(
                    f"{workdir!r} already holds a completed run with a "
                    f"different config ("
                    f"{'; '.join(_diff(done.get('config', {}), cfg_dict))}"
                    f"); use another workdir or force=True (--force)")
            model = checkpoint.model_from_workdir(workdir)
            target = model.abstract_variables()
            variables = checkpoint.load_variables(
                os.path.join(workdir, checkpoint.VARIABLES_FILE), target)
            logging.info("loaded completed run from %s (test accuracy %.4f)",
                         workdir, done["test_accuracy"])
            return TrainResult(model, variables, done, workdir, loaded=True)
        exclusive()
        return _train(config, cfg_dict, workdir, force, dataset)


def _train(config, cfg_dict, workdir, force, dataset) -> TrainResult:
    """The training run of :func:`train_and_evaluate` (under the lock)."""
    t_start = time.time()
    ds = dataset or data_lib.load(config.dataset.name,
                                  data_dir=config.dataset.data_dir,
                                  seed=config.dataset.seed)
    if ds.name != config.dataset.name:
        raise ValueError(f"dataset {ds.name!r} given but config names "
                         f"{config.dataset.name!r}")
    logging.info("data: %s", ds.summary())
    model = models.get(config.model.name, num_classes=ds.num_classes,
                       input_shape=ds.input_shape)
    train_src = source_lib.Source(ds.train, "train")
    if train_src.in_memory:
        bad = ~np.isfinite(np.asarray(ds.train.x)).reshape(
            len(ds.train), -1).all(axis=1)
        if bad.any():
            raise ValueError(
                f"the {ds.name} training inputs hold non-finite values "
                f"(NaN/Inf) in {int(bad.sum()):,} of {len(ds.train):,} rows; "
                f"fix the data")

    root = rng.root(config.seed)
    variables = model.init(rng.stream(root, rng.INIT))
    logging.info("model %s: %s parameters", model.name,
                 f"{models.count_params(variables):,}")
    tcfg = config.train
    batch_size = int(tcfg.batch_size)
    n_train = len(ds.train)
    steps_per_epoch = math.ceil(n_train / batch_size)
    tx, step_fn = train_step(model, tcfg, steps_per_epoch)
    state = loop.init_state(variables, tx)
    per_call = max(1, int(tcfg.get("steps_per_call", 50) or 50))
    eval_bs = int(config.get("eval_batch_size", 1000))
    shuffle_key = rng.stream(root, rng.SHUFFLE)
    dropout_key = rng.stream(root, rng.DROPOUT)
    epochs = int(tcfg.epochs)

    # Everything is checked: now resume an interrupted run or start clean.
    start, rec, why = ((0, None, "forced retraining") if force
                       else _resume_point(workdir, cfg_dict, epochs))
    history: list[dict] = []
    train_time = 0.0
    if start:
        _drop_epochs_after(workdir, start)
        target = jax.eval_shape(lambda: variables)
        epoch_vars = checkpoint.load_epoch(workdir, start, target)
        opt_state = serialization.from_state_dict(
            jax.eval_shape(tx.init, variables["params"]), rec["opt_state"])
        opt_state = jax.tree_util.tree_map(jnp.asarray, opt_state)
        other = {k: v for k, v in epoch_vars.items() if k != "params"}
        state = loop.TrainState(epoch_vars["params"], other, opt_state,
                                jnp.int32(int(rec["step"])))
        history = list(rec["history"])
        train_time = float(rec["train_time_s"])
        logging.info("resuming %s after epoch %d/%d (its last complete "
                     "epoch checkpoint)", workdir, start, epochs)
    else:
        if os.path.exists(os.path.join(workdir, checkpoint.CONFIG_FILE)):
            logging.info("starting %s from scratch: %s", workdir, why)
        _clear_run(workdir)
        checkpoint.atomic_write_json(
            os.path.join(workdir, checkpoint.CONFIG_FILE), cfg_dict)

    manager = checkpoint.history_manager(workdir)
    try:
        for epoch in range(start + 1, epochs + 1):
            t0 = time.time()
            res = loop.fit(
                dropout_key, None,
                train_src.epoch(jax.random.fold_in(shuffle_key, epoch),
                                batch_size),
                step_fn=step_fn, state=state, num_steps=steps_per_epoch,
                check_every=per_call, desc=f"epoch {epoch}/{epochs}")
            state = res.state
            jax.block_until_ready(state)
            dt = time.time() - t0
            train_time += dt
            epoch_vars = state.variables
            checkpoint.save_epoch(manager, epoch, epoch_vars)
            valid_acc = accuracy(model, epoch_vars, ds.valid, eval_bs)
            seen = steps_per_epoch * batch_size
            rec = {"epoch": epoch, "step": int(state.step),
                   "loss": res.totals["loss"] / steps_per_epoch,
                   "train_batch_accuracy": res.totals["correct"] / seen,
                   "valid_accuracy": valid_acc,
                   "examples_per_s": seen / dt, "epoch_time_s": dt}
            history.append(rec)
            logging.info(
                "epoch %d/%d: loss %.4f, train(batch) acc %.4f, valid acc "
                "%.4f, %.0f examples/s, %.1fs", epoch, epochs,
                rec["loss"], rec["train_batch_accuracy"], valid_acc,
                rec["examples_per_s"], dt)
            # The resume state may only name a committed checkpoint.
            manager.wait_until_finished()
            _save_resume(workdir, epoch, state, history, train_time)
        manager.wait_until_finished()
    finally:
        manager.close()

    variables = state.variables
    step = int(state.step)
    checkpoint.save_variables(
        os.path.join(workdir, checkpoint.VARIABLES_FILE), variables)
    acc = {name: accuracy(model, variables, split, eval_bs)
           for name, split in ds.splits.items()}
    metrics = {
        "status": "complete",
        "train_accuracy": acc["train"],
        "valid_accuracy": acc["valid"],
        "repair_accuracy": acc["repair"],
        "test_accuracy": acc["test"],
        "seed": int(config.seed),
        "epochs": int(tcfg.epochs),
        "steps": step,
        "train_time_s": train_time,
        "time_s": time.time() - t_start,
        "resumed_from_epoch": start,
        "history": history,
        "model": {"name": config.model.name, "num_classes": model.num_classes,
                  "input_shape": list(model.input_shape),
                  "num_params": models.count_params(variables)},
        "dataset": {"name": ds.name, "source": ds.source,
                    "sizes": {k: len(v) for k, v in ds.splits.items()},
                    "normalization": ds.normalization},
        "versions": {"jax": jax.__version__, "optax": optax.__version__},
        "config": cfg_dict,
    }
    metrics_path = os.path.join(workdir, checkpoint.METRICS_FILE)
    checkpoint.atomic_write_json(metrics_path, metrics)
    resume_path = os.path.join(workdir, RESUME_FILE)
    if os.path.exists(resume_path):
        os.remove(resume_path)  # a completed run needs no resume state
    logging.info("done in %.1fs: train %.4f, valid %.4f, test %.4f -> %s",
                 metrics["time_s"], acc["train"], acc["valid"], acc["test"],
                 workdir)
    return TrainResult(model, variables, metrics, workdir, loaded=False,
                       resumed_from=start)
