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
Same config, same machine -> bitwise the same variables.

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
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from dlfix_jax import data as data_lib
from dlfix_jax import models
from dlfix_jax import predict as predict_lib
from dlfix_jax import rng
from dlfix_jax.data import source as source_lib
from dlfix_jax.training import checkpoint
from dlfix_jax.training import loop

# Named PRNG streams: fold_in(root, id) (dlfix_jax.rng).
INIT, SHUFFLE, DROPOUT = rng.INIT, rng.SHUFFLE, rng.DROPOUT


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
    """

    model: models.Model
    variables: dict
    metrics: dict
    workdir: str
    loaded: bool = False


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
    metrics = checkpoint.read_json(path)
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
        checkpoints are removed first).
      dataset: an already loaded dataset to use instead of loading
        ``config.dataset`` (tests, study runners); it must be the one the
        config names.

    Returns:
      A :class:`TrainResult`.

    Raises:
      ValueError: ``workdir`` holds a completed run of a different config
        (and not ``force``), or the config names an unknown optimizer.
    """
    workdir = os.path.abspath(workdir)
    cfg_dict = config_to_dict(config)
    done = None if force else _completed(workdir)
    if done is not None:
        if done.get("config") != cfg_dict:
            raise ValueError(
                f"{workdir!r} already holds a completed run with a different "
                f"config ({'; '.join(_diff(done.get('config', {}), cfg_dict))}"
                f"); use another workdir or force=True (--force)")
        model = checkpoint.model_from_workdir(workdir)
        target = model.abstract_variables()
        variables = checkpoint.load_variables(
            os.path.join(workdir, checkpoint.VARIABLES_FILE), target)
        logging.info("loaded completed run from %s (test accuracy %.4f)",
                     workdir, done["test_accuracy"])
        return TrainResult(model, variables, done, workdir, loaded=True)

    os.makedirs(workdir, exist_ok=True)
    ckpt_dir = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
    if os.path.isdir(ckpt_dir):  # stale or forced: start a clean history
        shutil.rmtree(ckpt_dir)
    metrics_path = os.path.join(workdir, checkpoint.METRICS_FILE)
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    checkpoint.atomic_write_json(
        os.path.join(workdir, checkpoint.CONFIG_FILE), cfg_dict)

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
    train_src = source_lib.Source(ds.train, "train")
    epochs = int(tcfg.epochs)

    manager = checkpoint.history_manager(workdir)
    history = []
    train_time = 0.0
    try:
        for epoch in range(1, epochs + 1):
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
    checkpoint.atomic_write_json(metrics_path, metrics)
    logging.info("done in %.1fs: train %.4f, valid %.4f, test %.4f -> %s",
                 metrics["time_s"], acc["train"], acc["valid"], acc["test"],
                 workdir)
    return TrainResult(model, variables, metrics, workdir, loaded=False)
