"""Bring your own model: import a Keras ``.h5`` Sequential model.

``load(path) -> (model, variables)`` reads a Keras HDF5 file with ``h5py``
only (no TensorFlow or Keras import, nothing unpickled) and returns a
sequential :class:`~dlfix_jax.models.base.Model` plus its variables
``{"params": ..., "batch_stats": ...}``, keyed by the Keras layer names, with
exactly the tree structure ``model.init`` produces. Its predictions equal
Keras's (tests check 1e-5 on probabilities and logits).

Why: the study's base models are TF 2.3-era Keras ``.h5`` files, which Keras 3
itself no longer loads; this importer lets the fixers run on them and on any
user model of the same kind.

Layouts read (both found in the wild):

* **tf.keras 2.x** (TF 2.3-era artifacts, and ``tf_keras`` today): root
  attribute ``model_config`` (Keras-2 JSON; ``config`` is ``{"name",
  "layers"}`` or, in very old files, the bare layer list), weights at
  ``model_weights/<layer>/<layer>/kernel:0``, each layer group with a
  ``weight_names`` attribute (byte strings in old files).
* **Keras 3 legacy ``.h5``** (``model.save("x.h5")`` in Keras 3): Keras-3
  ``model_config`` (``kernel_size`` lists, dtype policies as dicts, an
  ``InputLayer`` with ``batch_shape``, ``build_input_shape``), weights at
  ``model_weights/<layer>/sequential/<layer>/kernel``.

Weights are found through each layer group's ``weight_names`` attribute
(falling back to the datasets in the group when it is absent), matched by
base name (``kernel``, ``bias``, ``gamma``, ``beta``, ``moving_mean``,
``moving_variance``; a ``:0`` suffix is dropped), never by hard-coded paths.
Files holding only weights (``save_weights``) are rejected with a clear error.

Supported layers (``channels_last`` only; float32 only):

============================ ==============================================
Keras                        ours (:mod:`dlfix_jax.models.layers` kind)
============================ ==============================================
InputLayer                   input shape only (no layer)
Conv2D                       ``conv`` (kernel, strides, padding valid/same,
                             use_bias; dilation 1, groups 1)
Dense                        ``dense``
MaxPooling2D                 ``maxpool`` (pool_size, strides, padding)
AveragePooling2D             ``avgpool`` (same padding excludes padded cells,
                             as Keras does)
GlobalAveragePooling2D       ``gap`` (keepdims False)
Flatten                      ``flatten`` (NHWC reshape = Keras
                             channels_last flatten order)
Dropout                      ``dropout`` (rate; noise_shape None)
BatchNormalization           ``bn`` (last axis; gamma/beta/moving stats,
                             epsilon, momentum, center/scale)
Activation / ReLU            ``relu`` (plain ReLU only); a linear
                             Activation adds no layer
Softmax                      only as the last layer (see below)
============================ ==============================================

A fused activation (``Conv2D(..., activation="relu")``) becomes a separate
``relu`` layer named ``<layer>_relu`` so that a Dense or Conv layer's output is
its pre-activation, as everywhere in :mod:`dlfix_jax.models.base`.

Softmax: a softmax on the last layer (fused ``activation="softmax"``, an
``Activation("softmax")`` or a ``Softmax`` layer) is *recorded* as
``model.output_softmax = True`` and not applied: our ``apply`` returns the
logits before it; evaluation that must reproduce the study applies the
softmax itself. A softmax anywhere else is an error, as is any other
activation, layer class, data format, dtype or option we do not implement:
the error names the layer (class and name) and lists what is supported.

Untrusted files: before anything is read, every link in the file is
visited (without following soft or external links) and the file is
refused if it holds an **external link** (``h5py.ExternalLink``: an object
in another file), a dataset with **external storage** (its bytes live in
other, arbitrary local files) or a **virtual dataset** (a view of other
files' datasets): any of them would let a model file read arbitrary local
files into its weights. Weights must be numeric datasets. A damaged file
(truncated, bit flips) gives a one-line :class:`KerasImportError` naming
the file, never another exception type.

The input shape comes from the ``InputLayer`` (``batch_input_shape`` /
``batch_shape``), else the first layer's ``batch_input_shape``, else the
model's ``build_input_shape``; ``load(path, input_shape=...)`` overrides it.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Sequence

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from dlfix_jax import fileio
from dlfix_jax.models import base
from dlfix_jax.models import zoo
from dlfix_jax.models.layers import LayerSpec, spec

SUPPORTED_LAYERS = ("InputLayer", "Conv2D", "Dense", "MaxPooling2D",
                    "AveragePooling2D", "GlobalAveragePooling2D", "Flatten",
                    "Dropout", "BatchNormalization", "Activation", "ReLU",
                    "Softmax")
SUPPORTED_ACTIVATIONS = ("linear", "relu", "softmax (last layer only)")

# Keras 2 aliases of the same classes.
_ALIASES = {"Convolution2D": "Conv2D", "MaxPool2D": "MaxPooling2D",
            "AvgPool2D": "AveragePooling2D",
            "GlobalAvgPool2D": "GlobalAveragePooling2D"}


class KerasImportError(ValueError):
    """A Keras file, layer or option that the importer does not support."""


# --------------------------------------------------------------------------
# Reading the file.


def _text(value) -> str:
    """An HDF5 string attribute as ``str`` (old files store bytes)."""
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8")
    return str(value)


def _weight_names(group: h5py.Group) -> list[str]:
    """Dataset paths (relative to ``group``) of a layer's weights."""
    if "weight_names" in group.attrs:
        return [_text(n) for n in np.atleast_1d(group.attrs["weight_names"])]
    names: list[str] = []
    group.visititems(lambda n, obj: names.append(n)
                     if isinstance(obj, h5py.Dataset) else None)
    return names


def _base_name(weight_name: str) -> str:
    """``"sequential/conv2d/kernel:0"`` -> ``"kernel"``."""
    return weight_name.rsplit("/", 1)[-1].split(":", 1)[0]


def _read_weights(weights_root: h5py.Group, layer: str, cls: str
                  ) -> dict[str, np.ndarray]:
    """``{base name: array}`` of the weights of layer ``layer``."""
    if layer not in weights_root:
        return {}
    group = weights_root[layer]
    out: dict[str, np.ndarray] = {}
    for name in _weight_names(group):
        if name not in group:
            raise KerasImportError(
                f"{cls} layer {layer!r}: weight {name!r} listed in "
                f"weight_names is missing from the file")
        key = _base_name(name)
        if key in out:
            raise KerasImportError(
                f"{cls} layer {layer!r}: two weights named {key!r}")
        dset = group[name]
        if not isinstance(dset, h5py.Dataset) or dset.dtype.kind not in "fiu":
            raise KerasImportError(
                f"{cls} layer {layer!r}: weight {name!r} is not a numeric "
                f"dataset")
        out[key] = np.asarray(dset[()], dtype=np.float32)
    return out


def _refuse_foreign_storage(f: h5py.File, path: str) -> None:
    """Refuses external links, external storage and virtual datasets
    (module docstring): each would read other local files into weights.

    ``visititems_links`` visits every link once, without following soft or
    external links, so this also terminates on cyclic hard links. (The
    callback returns the problem, which stops the visit; raising inside an
    h5py callback would surface as a SystemError.)
    """
    refuse = "refusing a model file that reads other files"

    def check(name, link):
        try:
            return _foreign(name, link)
        except Exception as e:  # noqa: BLE001 - must not escape the callback
            return (f"object {name!r} cannot be read ({type(e).__name__}: "
                    f"{' '.join(str(e).split())[:200]}); damaged file?")

    def _foreign(name, link):
        if isinstance(link, h5py.ExternalLink):
            return (f"{name!r} is an external link to "
                    f"{link.filename}:{link.path}; {refuse}")
        if not isinstance(link, h5py.HardLink):
            return None  # soft links point inside this file
        obj = f[name]
        if isinstance(obj, h5py.Dataset):
            if obj.is_virtual:
                return (f"dataset {name!r} is a virtual dataset (a view of "
                        f"other files); {refuse}")
            if obj.external:
                files = ", ".join(sorted({_text(e[0]) for e in obj.external}))
                return (f"dataset {name!r} uses external storage ({files}); "
                        f"{refuse}")
        return None

    problem = f.visititems_links(check)
    if problem is not None:
        raise KerasImportError(f"{path}: {problem}")


def _model_config(f: h5py.File, path: str) -> dict:
    if "model_config" not in f.attrs:
        if "layer_names" in f.attrs:
            raise KerasImportError(
                f"{path}: holds only weights (saved with save_weights); the "
                f"importer needs a full model saved with model.save('x.h5')")
        raise KerasImportError(
            f"{path}: no 'model_config' attribute; not a Keras .h5 model")
    return json.loads(_text(f.attrs["model_config"]))


# --------------------------------------------------------------------------
# Translating the config.


def _layers_of(config: dict, path: str) -> list[dict]:
    cls = config.get("class_name")
    if cls != "Sequential":
        raise KerasImportError(
            f"{path}: model class {cls!r} is not supported; only Sequential "
            f"models can be imported")
    cfg = config["config"]
    return list(cfg if isinstance(cfg, list) else cfg["layers"])


def _activation_name(act) -> str:
    """Activation name from a Keras 2 string or a Keras 3 serialised dict."""
    if act is None:
        return "linear"
    if isinstance(act, dict):
        inner = act.get("config")
        act = inner if isinstance(inner, str) else act.get("class_name")
    return str(act).lower()


def _check_dtype(cfg: dict, where: str) -> None:
    dtype = cfg.get("dtype")
    if isinstance(dtype, dict):
        dtype = dtype.get("config", {}).get("name", dtype.get("class_name"))
    if dtype not in (None, "float32"):
        raise KerasImportError(
            f"{where}: dtype {dtype!r} is not supported; only float32")


def _check_channels_last(cfg: dict, where: str) -> None:
    # A missing/None data_format means Keras's global default, channels_last.
    fmt = cfg.get("data_format")
    if fmt not in (None, "channels_last"):
        raise KerasImportError(
            f"{where}: data_format {fmt!r} is not supported; only "
            f"channels_last")


def _pair(value, where: str, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise KerasImportError(f"{where}: {what} {value} is not 2-D")
    return value


def _padding(value, where: str) -> str:
    if value not in ("valid", "same"):
        raise KerasImportError(
            f"{where}: padding {value!r} is not supported; valid or same")
    return value.upper()


def _unsupported(where: str, what: str) -> KerasImportError:
    return KerasImportError(f"{where}: {what} is not supported")


def _input_shape(layers: list[dict], config: dict
                 ) -> tuple[int | None, ...] | None:
    for lay in layers[:1]:
        cfg = lay["config"]
        for key in ("batch_input_shape", "batch_shape"):
            if cfg.get(key) is not None:
                return tuple(cfg[key][1:])
    cfg = config.get("config")
    if isinstance(cfg, dict) and cfg.get("build_input_shape") is not None:
        return tuple(cfg["build_input_shape"][1:])
    return None


def _translate(layers: list[dict], path: str):
    """Keras layer configs -> (LayerSpecs, per-spec Keras source, softmax).

    Returns the LayerSpecs, a dict ``spec name -> (Keras class, Keras layer
    name)`` for the layers that own weights, and whether the model ends in a
    softmax.
    """
    specs: list[LayerSpec] = []
    sources: dict[str, tuple[str, str]] = {}
    taken = {lay["config"].get("name") for lay in layers}
    output_softmax = False

    def fused(name: str, act, where: str, last: bool) -> None:
        nonlocal output_softmax
        act = _activation_name(act)
        if act == "linear":
            return
        if act == "relu":
            relu_name = f"{name}_relu"
            i = 1
            while relu_name in taken:
                relu_name, i = f"{name}_relu_{i}", i + 1
            taken.add(relu_name)
            specs.append(spec("relu", relu_name))
            return
        if act == "softmax":
            if not last:
                raise KerasImportError(
                    f"{where}: softmax is only supported on the last layer "
                    f"(recorded as output_softmax, not applied)")
            output_softmax = True
            return
        raise KerasImportError(
            f"{where}: activation {act!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ACTIVATIONS)}")

    for idx, lay in enumerate(layers):
        cls = _ALIASES.get(lay["class_name"], lay["class_name"])
        cfg = lay["config"]
        name = cfg.get("name", f"layer{idx}")
        where = f"{path}: {cls} layer {name!r}"
        last = idx == len(layers) - 1
        if cls not in SUPPORTED_LAYERS:
            raise KerasImportError(
                f"{where} is not supported; supported layers: "
                f"{', '.join(SUPPORTED_LAYERS)}")
        if "/" in name:
            raise KerasImportError(f"{where}: '/' in a layer name is not "
                                   f"supported (it separates module paths)")
        _check_dtype(cfg, where)
        if cls == "InputLayer":
            if cfg.get("sparse") or cfg.get("ragged"):
                raise _unsupported(where, "a sparse or ragged input")
            if idx != 0:
                raise _unsupported(where, "an InputLayer after the first "
                                   "layer")
            continue
        if cls == "Conv2D":
            _check_channels_last(cfg, where)
            dilation = _pair(cfg.get("dilation_rate", 1), where,
                             "dilation_rate")
            if dilation != (1, 1):
                raise _unsupported(where, "dilation_rate != 1")
            if cfg.get("groups", 1) != 1:
                raise _unsupported(where, "groups != 1")
            specs.append(spec(
                "conv", name, features=int(cfg["filters"]),
                kernel=_pair(cfg["kernel_size"], where, "kernel_size"),
                strides=_pair(cfg.get("strides", 1), where, "strides"),
                padding=_padding(cfg.get("padding", "valid"), where),
                use_bias=bool(cfg.get("use_bias", True))))
            sources[name] = (cls, name)
            fused(name, cfg.get("activation"), where, last)
        elif cls == "Dense":
            if cfg.get("lora_rank"):
                raise _unsupported(where, "LoRA (lora_rank)")
            specs.append(spec("dense", name, features=int(cfg["units"]),
                              use_bias=bool(cfg.get("use_bias", True))))
            sources[name] = (cls, name)
            fused(name, cfg.get("activation"), where, last)
        elif cls in ("MaxPooling2D", "AveragePooling2D"):
            _check_channels_last(cfg, where)
            window = _pair(cfg.get("pool_size", 2), where, "pool_size")
            strides = cfg.get("strides")
            strides = window if strides is None else _pair(strides, where,
                                                           "strides")
            kind = "maxpool" if cls.startswith("Max") else "avgpool"
            specs.append(spec(kind, name, window=window, strides=strides,
                              padding=_padding(cfg.get("padding", "valid"),
                                               where)))
        elif cls == "GlobalAveragePooling2D":
            _check_channels_last(cfg, where)
            if cfg.get("keepdims"):
                raise _unsupported(where, "keepdims=True")
            specs.append(spec("gap", name))
        elif cls == "Flatten":
            _check_channels_last(cfg, where)
            specs.append(spec("flatten", name))
        elif cls == "Dropout":
            if cfg.get("noise_shape") is not None:
                raise _unsupported(where, "a noise_shape")
            specs.append(spec("dropout", name, rate=float(cfg["rate"])))
        elif cls == "BatchNormalization":
            for opt in ("renorm", "virtual_batch_size", "adjustment"):
                if cfg.get(opt):
                    raise _unsupported(where, f"option {opt!r}")
            specs.append(spec("bn", name,
                              momentum=float(cfg.get("momentum", 0.99)),
                              epsilon=float(cfg.get("epsilon", 1e-3)),
                              use_scale=bool(cfg.get("scale", True)),
                              use_bias=bool(cfg.get("center", True))))
            sources[name] = (cls, name)
        elif cls == "Activation":
            act = _activation_name(cfg.get("activation"))
            if act == "relu":
                specs.append(spec("relu", name))
            elif act != "linear":
                fused(name, act, where, last)
        elif cls == "ReLU":
            if cfg.get("max_value") is not None:
                raise _unsupported(where, f"max_value={cfg['max_value']!r}")
            for opt in ("negative_slope", "threshold"):
                if cfg.get(opt) not in (None, 0):
                    raise _unsupported(where, f"{opt}={cfg[opt]!r}")
            specs.append(spec("relu", name))
        elif cls == "Softmax":
            if cfg.get("axis", -1) != -1:
                raise _unsupported(where, f"axis={cfg['axis']!r}")
            fused(name, "softmax", where, last)
    return specs, sources, output_softmax


def _check_bn_axes(layers: list[dict], input_rank: int, path: str) -> None:
    """BatchNormalization must normalise over the last (channel) axis."""
    rank = input_rank + 1  # with the batch axis
    for lay in layers:
        cls = _ALIASES.get(lay["class_name"], lay["class_name"])
        cfg = lay["config"]
        if cls in ("Flatten", "GlobalAveragePooling2D"):
            rank = 2
        elif cls == "BatchNormalization":
            axis = cfg.get("axis", -1)
            if isinstance(axis, list) and len(axis) == 1:
                axis = axis[0]
            if axis not in (-1, rank - 1):
                raise KerasImportError(
                    f"{path}: BatchNormalization layer {cfg.get('name')!r}: "
                    f"axis {cfg.get('axis')!r} is not supported; only the "
                    f"last axis (channels_last)")


# --------------------------------------------------------------------------
# Weights -> variables.


def _expect(weights: dict, needed: Sequence[str], where: str) -> None:
    missing = [k for k in needed if k not in weights]
    extra = sorted(set(weights) - set(needed))
    if missing or extra:
        raise KerasImportError(
            f"{where}: weights found {sorted(weights)}, expected "
            f"{list(needed)} (missing {missing}, unexpected {extra})")


def _layer_variables(s: LayerSpec, weights: dict, where: str):
    """(params, batch_stats) of one layer in Flax naming."""
    o = s.opts
    if s.kind in ("conv", "dense"):
        needed = ("kernel", "bias") if o.get("use_bias", True) else ("kernel",)
        _expect(weights, needed, where)
        params = {"kernel": weights["kernel"]}
        if "bias" in needed:
            params["bias"] = weights["bias"]
        return params, None
    # bn
    needed = ((("gamma",) if o["use_scale"] else ())
              + (("beta",) if o["use_bias"] else ())
              + ("moving_mean", "moving_variance"))
    _expect(weights, needed, where)
    params = {}
    if o["use_scale"]:
        params["scale"] = weights["gamma"]
    if o["use_bias"]:
        params["bias"] = weights["beta"]
    stats = {"mean": weights["moving_mean"], "var": weights["moving_variance"]}
    return params, stats


def _variables(specs, sources, weights_root, path) -> dict[str, Any]:
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for s in specs:
        if s.name not in sources:
            continue
        cls, layer = sources[s.name]
        where = f"{path}: {cls} layer {layer!r}"
        weights = _read_weights(weights_root, layer, cls)
        p, b = _layer_variables(s, weights, where)
        if p:
            params[s.name] = p
        if b is not None:
            stats[s.name] = b
    variables: dict[str, Any] = {}
    if params:
        variables["params"] = params
    if stats:
        variables["batch_stats"] = stats
    return jax.tree_util.tree_map(jnp.asarray, variables)


def _check_against_init(model: base.Model, variables: dict, path: str) -> None:
    """Same tree structure and shapes as ``model.init``, else a clear error."""
    want = jax.eval_shape(model.init, jax.random.key(0))
    want_flat = {jax.tree_util.keystr(k): v.shape for k, v in
                 jax.tree_util.tree_flatten_with_path(want)[0]}
    got_flat = {jax.tree_util.keystr(k): v.shape for k, v in
                jax.tree_util.tree_flatten_with_path(variables)[0]}
    if want_flat != got_flat:
        bad = sorted(k for k in set(want_flat) | set(got_flat)
                     if want_flat.get(k) != got_flat.get(k))
        detail = "; ".join(f"{k}: file {got_flat.get(k)}, model "
                           f"{want_flat.get(k)}" for k in bad[:6])
        raise KerasImportError(
            f"{path}: weights do not fit the architecture "
            f"(input shape {model.input_shape}): {detail}")
    if (jax.tree_util.tree_structure(want)
            != jax.tree_util.tree_structure(variables)):
        raise KerasImportError(f"{path}: variable tree differs from init's")


# --------------------------------------------------------------------------
# Public API.


def load(path: str | os.PathLike, input_shape: Sequence[int] | None = None
         ) -> tuple[base.Model, dict[str, Any]]:
    """Loads a Keras ``.h5`` Sequential model as (Model, variables).

    Args:
      path: a file written by ``model.save("x.h5")`` in tf.keras 2.x /
        ``tf_keras`` or Keras 3.
      input_shape: (H, W, C) to use instead of the one stored in the file
        (needed only when the file has none or has unknown dimensions).

    Returns:
      ``(model, variables)``: ``model.name`` is ``"keras:<file name>"``,
      ``model.output_softmax`` says whether Keras applied a softmax at the end
      (our ``apply`` returns the logits before it); ``variables`` is
      ``{"params": ..., "batch_stats": ...}`` keyed by Keras layer names
      (``batch_stats`` only with BatchNormalization).

    Raises:
      KerasImportError: for an unsupported model class, layer, activation,
        option, data format or dtype (naming the layer), weights that do
        not fit the architecture, external links / external storage /
        virtual datasets, or a damaged file.
      FileNotFoundError: when ``path`` does not exist.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no Keras .h5 file at {path}")
    try:
        return _load(path, input_shape)
    except KerasImportError:
        raise
    except _DAMAGED as e:  # what h5py, json and the translation raise on a
        # damaged file (truncated, flipped bytes, nonsense config values)
        detail = " ".join(str(e).split())[:300]
        raise KerasImportError(
            f"{path}: damaged or unreadable Keras .h5 file "
            f"({type(e).__name__}: {detail})") from e


_DAMAGED = (OSError, KeyError, ValueError, TypeError, AttributeError,
            IndexError, RuntimeError, RecursionError, OverflowError,
            UnicodeDecodeError)


def _load(path: str, input_shape):
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise KerasImportError(
            f"{path}: not a readable HDF5 file ({e})") from e
    with f:
        _refuse_foreign_storage(f, path)
        config = _model_config(f, path)
        layers = _layers_of(config, path)
        if not layers:
            raise KerasImportError(
                f"{path}: the Sequential model has no layers")
        specs, sources, output_softmax = _translate(layers, path)
        shape = (tuple(input_shape) if input_shape is not None
                 else _input_shape(layers, config))
        if shape is None or any(d is None for d in shape):
            raise KerasImportError(
                f"{path}: input shape {shape} is unknown or has unknown "
                f"dimensions; pass load(path, input_shape=(H, W, C))")
        shape = tuple(int(d) for d in shape)
        _check_bn_axes(layers, len(shape), path)
        weights_root = f["model_weights"] if "model_weights" in f else f
        variables = _variables(specs, sources, weights_root, path)
    module_name = f"keras:{os.path.basename(path)}"
    # num_classes from the output shape of the translated layers.
    probe = zoo.sequential(module_name, specs, shape, 0)
    out = jax.eval_shape(
        lambda: probe.module.apply(probe.init(jax.random.key(0)),
                                   jnp.zeros((1,) + shape)))
    if out.ndim != 2:
        raise KerasImportError(
            f"{path}: model output has shape {out.shape[1:]} per example; a "
            f"classifier must end in a vector of class scores")
    model = zoo.sequential(module_name, specs, shape, int(out.shape[-1]),
                           output_softmax=output_softmax)
    _check_against_init(model, variables, path)
    return model, variables


# --------------------------------------------------------------------------
# Export: our sequential models back to a Keras .h5 file.

# tf.keras 2.x layout (``model_weights/<layer>/<layer>/<weight>:0``): tf_keras
# writes it and Keras 3's legacy-h5 loader reads it, so one file serves both.
_EXPORT_KERAS_VERSION = "2.15.0"


def _export_layer(s: LayerSpec, activation: str | None) -> dict:
    """Keras-2 ``{"class_name", "config"}`` of one layer spec."""
    o = s.opts
    common = {"name": s.name, "trainable": True, "dtype": "float32"}
    if s.kind == "conv":
        pad = o.get("padding", "VALID")
        if not isinstance(pad, str):
            raise KerasImportError(
                f"layer {s.name!r}: explicit padding {pad!r} has no Keras "
                f"equivalent; only VALID / SAME can be exported")
        return {"class_name": "Conv2D", "config": dict(
            common, filters=int(o["features"]),
            kernel_size=[int(v) for v in o["kernel"]],
            strides=[int(v) for v in o.get("strides", (1, 1))],
            padding=pad.lower(), data_format="channels_last",
            dilation_rate=[1, 1], groups=1,
            activation=activation or "linear",
            use_bias=bool(o.get("use_bias", True)))}
    if s.kind == "dense":
        return {"class_name": "Dense", "config": dict(
            common, units=int(o["features"]),
            activation=activation or "linear",
            use_bias=bool(o.get("use_bias", True)))}
    if s.kind == "bn":
        return {"class_name": "BatchNormalization", "config": dict(
            common, axis=-1, momentum=float(o.get("momentum", 0.99)),
            epsilon=float(o.get("epsilon", 1e-3)),
            center=bool(o.get("use_bias", True)),
            scale=bool(o.get("use_scale", True)))}
    if s.kind == "relu":
        return {"class_name": "Activation",
                "config": dict(common, activation="relu")}
    if s.kind in ("maxpool", "avgpool"):
        window = [int(v) for v in o["window"]]
        strides = o.get("strides")
        return {"class_name": ("MaxPooling2D" if s.kind == "maxpool"
                               else "AveragePooling2D"),
                "config": dict(common, pool_size=window,
                               strides=[int(v) for v in strides] if strides
                               else window,
                               padding=o.get("padding", "VALID").lower(),
                               data_format="channels_last")}
    if s.kind == "gap":
        return {"class_name": "GlobalAveragePooling2D",
                "config": dict(common, data_format="channels_last",
                               keepdims=False)}
    if s.kind == "flatten":
        return {"class_name": "Flatten",
                "config": dict(common, data_format="channels_last")}
    if s.kind == "dropout":
        return {"class_name": "Dropout", "config": dict(
            common, rate=float(o["rate"]), noise_shape=None, seed=None)}
    raise KerasImportError(f"layer {s.name!r}: kind {s.kind!r} cannot be "
                           f"exported")


def _export_weights(s: LayerSpec, variables: dict) -> list[tuple[str, Any]]:
    """``[(Keras weight base name, array)]`` of one layer, in Keras order."""
    if s.kind in ("conv", "dense"):
        p = variables["params"][s.name]
        out = [("kernel", p["kernel"])]
        if s.opts.get("use_bias", True):
            out.append(("bias", p["bias"]))
        return out
    if s.kind == "bn":
        p = variables.get("params", {}).get(s.name, {})
        b = variables["batch_stats"][s.name]
        out = []
        if s.opts.get("use_scale", True):
            out.append(("gamma", p["scale"]))
        if s.opts.get("use_bias", True):
            out.append(("beta", p["bias"]))
        return out + [("moving_mean", b["mean"]),
                      ("moving_variance", b["var"])]
    return []


def _string_array(names: Sequence[str]):
    if not names:
        return np.asarray([], dtype=np.float64)  # as tf.keras writes it
    return np.asarray([n.encode("utf-8") for n in names])


def export_h5(model: base.Model, variables: dict[str, Any],
              path: str | os.PathLike) -> None:
    """Writes a sequential ``model`` with ``variables`` as a Keras ``.h5``.

    The file has the tf.keras 2.x layout (what ``tf_keras`` writes), which
    ``tf_keras.models.load_model`` and Keras 3's ``keras.models.load_model``
    both read; their predictions equal ours within float32 round-off (the
    probabilities when ``model.output_softmax``, else the logits). Layer
    names are kept (a ``relu`` layer becomes ``Activation("relu")``), so
    :func:`load` gives back the same layers and variables. A softmax is
    written when ``model.output_softmax`` is set: fused into a last Dense
    layer, else as an ``Activation("softmax")`` layer. Written with h5py
    only (no TensorFlow, nothing pickled), atomically.

    Raises:
      KerasImportError: the model is not sequential, or has a layer or
        option Keras cannot express (explicit padding amounts).
    """
    path = os.fspath(path)
    if not model.is_sequential:
        raise KerasImportError(
            f"model {model.name!r} is not sequential; only sequential models "
            f"can be exported to Keras .h5")
    specs = list(model.layers)
    layer_cfgs = [{"class_name": "InputLayer", "config": {
        "batch_input_shape": [None] + [int(v) for v in model.input_shape],
        "dtype": "float32", "sparse": False, "ragged": False,
        "name": "input_1"}}]
    names = {s.name for s in specs}
    for i, s in enumerate(specs):
        last = i == len(specs) - 1
        act = ("softmax" if last and model.output_softmax
               and s.kind == "dense" else None)
        layer_cfgs.append(_export_layer(s, act))
    if model.output_softmax and specs[-1].kind != "dense":
        name, k = "softmax", 1
        while name in names:
            name, k = f"softmax_{k}", k + 1
        layer_cfgs.append({"class_name": "Activation", "config": {
            "name": name, "trainable": True, "dtype": "float32",
            "activation": "softmax"}})
    config = {"class_name": "Sequential",
              "config": {"name": "sequential", "layers": layer_cfgs}}
    weights = {s.name: _export_weights(s, variables) for s in specs}
    layer_names = [c["config"]["name"] for c in layer_cfgs[1:]]

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.attrs["backend"] = "tensorflow"
        f.attrs["keras_version"] = _EXPORT_KERAS_VERSION
        f.attrs["model_config"] = json.dumps(config)
        g = f.create_group("model_weights")
        g.attrs["backend"] = "tensorflow"
        g.attrs["keras_version"] = _EXPORT_KERAS_VERSION
        g.attrs["layer_names"] = _string_array(layer_names)
        for name in layer_names:
            lg = g.create_group(name)
            ws = weights.get(name, [])
            lg.attrs["weight_names"] = _string_array(
                [f"{name}/{w}:0" for w, _ in ws])
            if ws:
                inner = lg.create_group(name)
                for w, arr in ws:
                    inner.create_dataset(f"{w}:0",
                                         data=np.asarray(arr, np.float32))
        g.create_group("top_level_model_weights").attrs[
            "weight_names"] = _string_array([])
    fileio.atomic_write_bytes(path, buf.getvalue())
