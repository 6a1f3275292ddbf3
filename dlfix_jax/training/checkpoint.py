"""Saving and loading model variables, training histories and whole models.

Formats (never pickle):

* **Final variables**: one file, ``flax.serialization.msgpack_serialize`` of
  the variables dict (``{"params": ..., "batch_stats": ...}``), written
  atomically (temporary file + ``os.replace``). :func:`save_variables` /
  :func:`load_variables`.
* **Training history**: one orbax checkpoint per epoch under
  ``<workdir>/checkpoints/<epoch>`` (epochs numbered from 1), written by an
  ``orbax.checkpoint.CheckpointManager`` with ``StandardSave``. This is the
  history NeuRecover needs. :func:`history_manager` / :func:`load_history`.
* **Resume state** (``<workdir>/resume.msgpack``, written by
  :mod:`dlfix_jax.training.train` after each epoch, removed when the run
  completes): optimiser state and step of the last complete epoch.
* **A model**: :func:`load_model` takes a training workdir of ours
  (``metrics.json`` or ``config.json`` + ``variables.msgpack``), a fixed
  model written by ``dlfix fix`` (``<workdir>/<approach>/seed<s>``:
  ``model.json`` + ``variables.msgpack``, :func:`save_model`) or a Keras
  ``.h5`` file (through :mod:`dlfix_jax.models.keras_h5`). It reads no
  epoch checkpoint unless asked (``history=``), so evaluating a model never
  depends on its history; damaged checkpoints, variables or JSON files
  raise :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from dlfix_jax import fileio
from dlfix_jax import models

VARIABLES_FILE = "variables.msgpack"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.json"


class CheckpointError(Exception):
    """A path is not a model, workdir or variables file we can read. The
    message names the path and what was expected there."""


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (:func:`dlfix_jax.fileio.
    atomic_write_bytes`), so a reader never sees a half-written file."""
    fileio.atomic_write_bytes(path, data)


def atomic_write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as indented, valid JSON to ``path`` atomically
    (:func:`dlfix_jax.fileio.atomic_write_json`: non-finite floats become
    ``null``, never a bare ``NaN``)."""
    fileio.atomic_write_json(path, obj)


def _to_numpy(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def save_variables(path: str, variables: dict) -> None:
    """Saves a variables pytree to ``path`` (msgpack, atomic)."""
    data = serialization.msgpack_serialize(
        serialization.to_state_dict(_to_numpy(variables)))
    atomic_write_bytes(path, data)


def load_variables(path: str, target: Any = None) -> dict:
    """Loads variables saved by :func:`save_variables`.

    Args:
      path: the msgpack file.
      target: optional pytree of the expected structure (e.g.
        ``model.init(...)`` or a ``jax.eval_shape`` of it); when given, the
        result has exactly its structure and a mismatch raises.

    Returns:
      The variables as a nested dict of ``jax.Array``.

    Raises:
      CheckpointError: ``path`` is missing or not a msgpack variables file,
        or does not match ``target``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no variables file at {path!r} (expected a "
                              f"msgpack file written by save_variables)")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        state = serialization.msgpack_restore(raw)
    except Exception as e:  # msgpack raises several unrelated types
        raise CheckpointError(
            f"{path!r} is not a msgpack variables file: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path!r} does not hold a variables dict")
    if target is not None:
        _check_structure(path, target, state)
        try:
            state = serialization.from_state_dict(target, state)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path!r} does not match the target "
                                  f"structure: {e}") from e
    try:
        return jax.tree_util.tree_map(jnp.asarray, state)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path!r} holds a leaf that is not an "
                              f"array: {e}") from e


def _check_structure(path, target, state) -> None:
    want = jax.tree_util.tree_flatten_with_path(
        serialization.to_state_dict(target))[0]
    got = dict(jax.tree_util.tree_flatten_with_path(state)[0])
    for p, leaf in want:
        if p not in got:
            raise CheckpointError(
                f"{path!r} lacks {jax.tree_util.keystr(p)} of the target")
        if tuple(np.shape(got[p])) != tuple(np.shape(leaf)):
            raise CheckpointError(
                f"{path!r}: {jax.tree_util.keystr(p)} has shape "
                f"{np.shape(got[p])}, target has {np.shape(leaf)}")


# --------------------------------------------------------------------------
# Per-epoch history (orbax).


def history_manager(workdir: str, create: bool = True):
    """The orbax ``CheckpointManager`` of ``<workdir>/checkpoints``.

    Keeps every checkpoint (``max_to_keep=None``): the whole history is the
    point. Saving is asynchronous; callers call ``wait_until_finished()``
    (and ``close()``) before reading back or exiting.
    """
    import jax
    import orbax.checkpoint as ocp  # heavy dependency: history only
    directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    # A history belongs to one process: in a multi-process study each
    # process trains / reads its own base models alone (orbax would otherwise
    # synchronise every JAX process and refuse host-local arrays).
    me = jax.process_index()
    if create:  # orbax refuses create=True together with active_processes
        os.makedirs(directory, exist_ok=True)
    return ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=None, create=False,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me})))


def save_epoch(manager, epoch: int, variables: dict) -> None:
    """Saves the variables after ``epoch`` (1-based) to the history."""
    import orbax.checkpoint as ocp  # heavy dependency: history only
    import jax
    manager.save(epoch, args=ocp.args.StandardSave(jax.device_get(variables)))


def history_epochs(workdir: str) -> list[int]:
    """Epoch numbers with a finished checkpoint, ascending."""
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        return []
    manager = history_manager(workdir, create=False)
    try:
        return sorted(int(s) for s in manager.all_steps())
    finally:
        manager.close()


def load_history(workdir: str, target: Any = None,
                 last: int | None = None) -> list[dict]:
    """Per-epoch variables of a training run, oldest first.

    Args:
      workdir: a training workdir (holding ``checkpoints/<epoch>``).
      target: optional pytree giving structure, dtypes and shapes.
      last: load only the last ``last`` epochs (NeuRecover needs two);
        None loads all.

    Returns:
      One variables dict per saved epoch (epoch 1 first; the last is the
      final model).

    Raises:
      CheckpointError: there is no checkpoint under ``workdir/checkpoints``.
    """
    import orbax.checkpoint as ocp  # heavy dependency: history only
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        raise CheckpointError(
            f"no training history at {directory!r} (expected orbax "
            f"checkpoints checkpoints/<epoch> written by "
            f"dlfix_jax.training.train)")
    manager = history_manager(workdir, create=False)
    try:
        steps = sorted(manager.all_steps())
        if last is not None:
            steps = steps[-last:] if last > 0 else []
        if not steps and last is None:
            raise CheckpointError(f"{directory!r} holds no finished checkpoint")
        out = []
        for s in steps:
            try:
                out.append(manager.restore(
                    s, args=ocp.args.StandardRestore(target)))
            except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise
                # many types for a damaged checkpoint
                detail = " ".join(str(e).split())[:300]
                raise CheckpointError(
                    f"epoch checkpoint {os.path.join(directory, str(s))!r} "
                    f"is damaged or unreadable ({type(e).__name__}: "
                    f"{detail})") from e
        return out
    finally:
        manager.close()


def load_epoch(workdir: str, epoch: int, target: Any = None) -> dict:
    """The variables saved after ``epoch`` (1-based) of a training run.

    Raises:
      CheckpointError: that epoch has no finished checkpoint, or it is
        damaged.
    """
    import orbax.checkpoint as ocp  # heavy dependency: history only
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if epoch not in history_epochs(workdir):
        raise CheckpointError(f"no finished checkpoint of epoch {epoch} in "
                              f"{directory!r}")
    manager = history_manager(workdir, create=False)
    try:
        return manager.restore(epoch, args=ocp.args.StandardRestore(target))
    except Exception as e:  # noqa: BLE001 - see load_history
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(
            f"epoch checkpoint {os.path.join(directory, str(epoch))!r} is "
            f"damaged or unreadable ({type(e).__name__}: {detail})") from e
    finally:
        manager.close()


# --------------------------------------------------------------------------
# Whole models.


def read_json(path: str) -> dict:
    """A JSON object from ``path``; CheckpointError naming the file when it
    is unreadable or not a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path!r} is not readable JSON: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path!r} does not hold a JSON object")
    return obj


def model_from_workdir(workdir: str):
    """Rebuilds the :class:`~dlfix_jax.models.Model` of a training workdir.

    Reads ``metrics.json`` (which records the model name, number of classes
    and input shape); without it, ``config.json``'s ``model.name`` with the
    model's default classes and input shape.
    """
    metrics_path = os.path.join(workdir, METRICS_FILE)
    config_path = os.path.join(workdir, CONFIG_FILE)
    if os.path.isfile(metrics_path):
        info = read_json(metrics_path).get("model", {})
        if "name" in info:
            return models.get(info["name"], num_classes=info["num_classes"],
                              input_shape=tuple(info["input_shape"]))
    if os.path.isfile(config_path):
        cfg = read_json(config_path)
        try:
            name = cfg["model"]["name"]
        except (KeyError, TypeError) as e:
            raise CheckpointError(
                f"{config_path!r} has no model.name") from e
        return models.get(name)
    raise CheckpointError(
        f"{workdir!r} is not a training workdir: it has neither "
        f"{METRICS_FILE} nor {CONFIG_FILE}")


def model_to_json(model) -> dict:
    """A JSON description of ``model``'s architecture (no weights).

    Sequential models (the zoo's and every Keras import) are stored layer by
    layer, so :func:`model_from_json` rebuilds them without their source
    file; other models by their registered zoo name.
    """
    d = {"name": model.name, "num_classes": int(model.num_classes),
         "input_shape": [int(v) for v in model.input_shape],
         "output_softmax": bool(model.output_softmax), "layers": None}
    if model.is_sequential:
        d["layers"] = [{"kind": s.kind, "name": s.name,
                        "options": {k: _lists(v) for k, v in s.options}}
                       for s in model.layers]
    elif model.name not in models.names():
        raise ValueError(f"model {model.name!r} is neither sequential nor a "
                         f"registered zoo model; it cannot be described")
    return d


def _lists(v):
    return [_lists(x) for x in v] if isinstance(v, (tuple, list)) else v


def model_from_json(d: dict, where: str = "model.json"):
    """Inverse of :func:`model_to_json`; CheckpointError when malformed."""
    try:
        shape = tuple(int(v) for v in d["input_shape"])
        if d.get("layers") is None:
            return models.get(d["name"], num_classes=int(d["num_classes"]),
                              input_shape=shape)
        specs = [models.spec(lay["kind"], lay["name"],
                             **{k: _tuples(v) for k, v in
                                lay["options"].items()})
                 for lay in d["layers"]]
        return models.sequential(d["name"], specs, shape,
                                 int(d["num_classes"]),
                                 output_softmax=bool(d["output_softmax"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where!r} is not a model description "
                              f"written by save_model: {e}") from e


def _tuples(v):
    """JSON lists back to (nested) tuples, as layer options hold them."""
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def save_model(directory: str, model, variables: dict) -> None:
    """Writes ``directory/model.json`` (architecture) and
    ``directory/variables.msgpack``: a directory :func:`load_model` reads
    back on its own (the per-seed output of ``dlfix fix``)."""
    os.makedirs(directory, exist_ok=True)
    save_variables(os.path.join(directory, VARIABLES_FILE), variables)
    atomic_write_json(os.path.join(directory, MODEL_FILE),
                      model_to_json(model))


def _seed_dirs(path: str) -> list[str]:
    seeds = []
    for name in os.listdir(path):
        sub = os.path.join(path, name)
        if (name.startswith("seed") and name[4:].isdigit()
                and os.path.isfile(os.path.join(sub, VARIABLES_FILE))):
            seeds.append((int(name[4:]), sub))
    return [p for _, p in sorted(seeds)]


def fixed_model_dirs(path: str) -> list[str]:
    """The fixed models under a ``dlfix fix`` output directory.

    ``<workdir>/<approach>`` gives its ``seed0``, ``seed1``, ... in seed
    order; ``<workdir>`` gives those of every approach in it (by approach
    name; ``base`` is not a fixed model). Anything else (a model directory,
    a file, a missing path) gives ``[path]``.
    """
    path = os.fspath(path)
    if not os.path.isdir(path) or os.path.isfile(
            os.path.join(path, VARIABLES_FILE)):
        return [path]
    seeds = _seed_dirs(path)
    if not seeds:
        for name in sorted(os.listdir(path)):
            sub = os.path.join(path, name)
            if os.path.isdir(sub) and name != "base":
                seeds.extend(_seed_dirs(sub))
    return seeds or [path]


def _keras_native_error(path: str) -> CheckpointError:
    return CheckpointError(
        f"{path!r} is a native Keras .keras archive, which dlfix_jax does not "
        f"read; save the model as HDF5 in Keras "
        f"(keras.models.load_model(path).save('model.h5')) and pass the .h5")


def load_model(path: str, history: bool | int = False):
    """Loads a model from a training workdir of ours or a Keras ``.h5`` file.

    Args:
      path: a directory written by
        :func:`dlfix_jax.training.train.train_and_evaluate` (``dlfix
        train``), a fixed model's directory written by :func:`save_model`
        (``dlfix fix``: ``<workdir>/<approach>/seed<s>``), or a Keras HDF5
        file (``.h5``/``.hdf5``). A native ``.keras`` archive is refused
        with a message saying to save it as ``.h5``.
      history: False (default) loads no epoch checkpoint, so evaluating
        a model never reads (or is broken by) its training history; True
        loads every epoch's checkpoint, an int ``k`` the last ``k`` (big
        models: each epoch is a full copy).

    Returns:
      ``(model, variables, history)`` where ``history`` is the per-epoch
      variables (oldest first) of a workdir, or None for a Keras file or a
      workdir without checkpoints.

    Raises:
      CheckpointError: ``path`` does not exist, or is neither a workdir with
        ``variables.msgpack`` nor an ``.h5`` file, or an asked-for epoch
        checkpoint is damaged.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(
            f"model path {path!r} does not exist (expected a training workdir "
            f"with {VARIABLES_FILE} and {METRICS_FILE}, or a Keras .h5 file)")
    if os.path.isfile(path):
        if path.lower().endswith(".keras") and not _is_hdf5(path):
            raise _keras_native_error(path)
        if path.lower().endswith((".h5", ".hdf5")) or _is_hdf5(path):
            from dlfix_jax.models import keras_h5  # h5py: .h5 paths only
            model, variables = keras_h5.load(path)
            return model, variables, None
        raise CheckpointError(
            f"{path!r} is a file but not a Keras HDF5 model (.h5); pass a "
            f"training workdir or a .h5 file")
    var_path = os.path.join(path, VARIABLES_FILE)
    if not os.path.isfile(var_path):
        seeds = fixed_model_dirs(path)
        hint = (f"; it holds fixed models, pass one of them, e.g. "
                f"{seeds[0]!r}" if seeds != [path] else "")
        raise CheckpointError(
            f"{path!r} is a directory without {VARIABLES_FILE}: not a "
            f"finished training workdir (train with `dlfix train "
            f"--config=... --workdir={path}`) nor a fixed model written by "
            f"`dlfix fix`{hint}")
    model_path = os.path.join(path, MODEL_FILE)
    if os.path.isfile(model_path):
        model = model_from_json(read_json(model_path), model_path)
    else:
        model = model_from_workdir(path)
    target = jax.eval_shape(model.init, jax.random.key(0))
    variables = load_variables(var_path, target=target)
    hist = None
    if history is not False and history_epochs(path):
        last = None if history is True else int(history)
        hist = load_history(path, target=target, last=last)
    return model, variables, hist


def _is_hdf5(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"
