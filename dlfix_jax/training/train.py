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
Steps are jitted one by one (a ``lax.scan`` over steps was ~8x slower for
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
from dlfix_jax.training import checkpoint

# Named PRNG streams: fold_in(root, id). Adding a stream never shifts others.
INIT, SHUFFLE, DROPOUT = 0, 1, 2


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


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def make_train_chunk(model: models.Model, tx: optax.GradientTransformation):
    """A function running ``k`` training steps, each one jitted call.

    ``chunk(state, xs, ys, steps, dropout_key) -> (state, (loss, correct))``
    with ``xs`` (k, B, H, W, C), ``ys`` (k, B), ``steps`` (k,) global step
    numbers (for the dropout keys) and ``state = (params, batch_stats,
    opt_state)``; ``loss`` and ``correct`` are (k,) arrays.

    The steps are dispatched from Python rather than folded into one
    ``lax.scan``: on XLA:CPU a VGG16 step inside a scan (while loop) ran ~8x
    slower than the same step jitted on its own (measured: 34 s vs 4 s CPU
    at batch 32), and one step per call compiles once for any ``k``.
    """

    def step(dropout_key, state, x, y, step_no):
        params, batch_stats, opt_state = state

        def loss_fn(p):
            variables = {"params": p}
            if batch_stats:
                variables["batch_stats"] = batch_stats
            logits, new_stats = model.apply(
                variables, x, train=True,
                rngs={"dropout": jax.random.fold_in(dropout_key, step_no)})
            return jnp.mean(_cross_entropy(logits, y)), (logits, new_stats)

        (loss, (logits, new_stats)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        correct = jnp.sum(jnp.argmax(logits, -1) == y)
        return (params, new_stats if batch_stats else batch_stats,
                opt_state), (loss, correct)

    step_fn = jax.jit(step)

    def chunk(state, xs, ys, steps, dropout_key):
        losses, corrects = [], []
        for i in range(len(steps)):
            state, (loss, correct) = step_fn(dropout_key, state, xs[i], ys[i],
                                             np.int32(steps[i]))
            losses.append(loss)
            corrects.append(correct)
        return state, (jnp.stack(losses), jnp.stack(corrects))

    return chunk


def _model_key(model: models.Model) -> tuple:
    """A hashable key of a model's structure (Model objects compare by
    identity, and every ``models.get`` builds a new one)."""
    return (model.name, model.num_classes, tuple(model.input_shape),
            repr(model.module))


_PREDICT_FNS: dict = {}


def _predict_fn(model: models.Model):
    key = _model_key(model)
    if key not in _PREDICT_FNS:
        _PREDICT_FNS[key] = jax.jit(
            lambda v, x: jnp.argmax(model.apply(v, x), -1))
    return _PREDICT_FNS[key]


_CHUNK_FNS: dict = {}


def _cached_train_chunk(model, train_cfg, steps_per_epoch: int):
    """``make_train_chunk`` for the model and optimizer config, reused
    across calls so a second run of the same config does not recompile."""
    key = (_model_key(model), json.dumps(config_to_dict(train_cfg),
                                         sort_keys=True), steps_per_epoch)
    if key not in _CHUNK_FNS:
        tx = make_optimizer(train_cfg, steps_per_epoch)
        _CHUNK_FNS[key] = (tx, make_train_chunk(model, tx))
    return _CHUNK_FNS[key]


def predict(model: models.Model, variables: dict, x: np.ndarray,
            batch_size: int = 1000) -> np.ndarray:
    """Predicted labels for ``x`` in batches of a fixed size (the last batch
    is zero-padded so only one shape is compiled)."""
    fn = _predict_fn(model)
    n = len(x)
    out = np.empty((n,), np.int32)
    batch_size = max(1, min(batch_size, n))
    for start in range(0, n, batch_size):
        xb = np.asarray(x[start:start + batch_size], np.float32)
        m = len(xb)
        if m < batch_size:
            xb = np.concatenate(
                [xb, np.zeros((batch_size - m,) + xb.shape[1:], xb.dtype)])
        out[start:start + m] = np.asarray(fn(variables, xb))[:m]
    return out


def accuracy(model, variables, split, batch_size=1000) -> float:
    """Fraction of ``split`` classified correctly."""
    if len(split) == 0:
        return float("nan")
    return float(np.mean(predict(model, variables, split.x, batch_size)
                         == np.asarray(split.y)))


def epoch_batches(key: jax.Array, n: int, batch_size: int) -> np.ndarray:
    """(steps, batch_size) example indices of one epoch (see module doc)."""
    perm = np.asarray(jax.random.permutation(key, n))
    steps = math.ceil(n / batch_size)
    pad = steps * batch_size - n
    if pad:
        perm = np.concatenate([perm, np.resize(perm, pad)])
    return perm.reshape(steps, batch_size)


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
        eval_batch_size, log_every_steps).
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
        target = jax.eval_shape(model.init, jax.random.key(0))
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

    root = jax.random.key(config.seed)
    variables = model.init(jax.random.fold_in(root, INIT))
    logging.info("model %s: %s parameters", model.name,
                 f"{models.count_params(variables):,}")
    tcfg = config.train
    batch_size = int(tcfg.batch_size)
    n_train = len(ds.train)
    steps_per_epoch = math.ceil(n_train / batch_size)
    tx, chunk_fn = _cached_train_chunk(model, tcfg, steps_per_epoch)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    state = (params, batch_stats, tx.init(params))
    per_call = max(1, int(tcfg.get("steps_per_call", 50) or 50))
    eval_bs = int(config.get("eval_batch_size", 1000))
    log_every = int(config.get("log_every_steps", 100) or 0)
    shuffle_key = jax.random.fold_in(root, SHUFFLE)
    dropout_key = jax.random.fold_in(root, DROPOUT)
    x_train, y_train = ds.train.x, np.asarray(ds.train.y, np.int32)

    def current(st):
        v = {"params": st[0]}
        if st[1]:
            v["batch_stats"] = st[1]
        return v

    manager = checkpoint.history_manager(workdir)
    history = []
    step = 0
    train_time = 0.0
    try:
        for epoch in range(1, int(tcfg.epochs) + 1):
            idx = epoch_batches(jax.random.fold_in(shuffle_key, epoch),
                                n_train, batch_size)
            t0 = time.time()
            loss_sum, correct_sum, seen = 0.0, 0, 0
            for s0 in range(0, len(idx), per_call):
                bidx = idx[s0:s0 + per_call]
                k = len(bidx)
                xs = np.asarray(x_train[bidx.reshape(-1)], np.float32)
                xs = xs.reshape((k, batch_size) + xs.shape[1:])
                ys = y_train[bidx]
                steps = np.arange(step, step + k, dtype=np.int32)
                state, (losses, correct) = chunk_fn(state, xs, ys, steps,
                                                    dropout_key)
                losses = np.asarray(losses)
                if not np.all(np.isfinite(losses)):
                    raise FloatingPointError(
                        f"non-finite training loss at steps {step}..."
                        f"{step + k - 1} of epoch {epoch}")
                loss_sum += float(losses.sum())
                correct_sum += int(np.asarray(correct).sum())
                seen += k * batch_size
                prev, step = step, step + k
                if log_every and step // log_every > prev // log_every:
                    logging.info(
                        "epoch %d step %d: loss %.4f, %.0f examples/s",
                        epoch, step, float(losses[-1]),
                        seen / max(time.time() - t0, 1e-9))
            jax.block_until_ready(state)
            dt = time.time() - t0
            train_time += dt
            epoch_vars = current(state)
            checkpoint.save_epoch(manager, epoch, epoch_vars)
            valid_acc = accuracy(model, epoch_vars, ds.valid, eval_bs)
            rec = {"epoch": epoch, "step": step,
                   "loss": loss_sum / len(idx),
                   "train_batch_accuracy": correct_sum / seen,
                   "valid_accuracy": valid_acc,
                   "examples_per_s": seen / dt, "epoch_time_s": dt}
            history.append(rec)
            logging.info(
                "epoch %d/%d: loss %.4f, train(batch) acc %.4f, valid acc "
                "%.4f, %.0f examples/s, %.1fs", epoch, int(tcfg.epochs),
                rec["loss"], rec["train_batch_accuracy"], valid_acc,
                rec["examples_per_s"], dt)
        manager.wait_until_finished()
    finally:
        manager.close()

    variables = current(state)
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
