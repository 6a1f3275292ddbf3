"""The fixer interface: problems, results, specs and the registry.

A fixer is a **pure** function ``fix(key, problem, config) -> FixResult``
registered by name (:data:`FIXERS`) with its level (model / layer / neuron),
source paper, default config (an ``ml_collections.ConfigDict``), an
applicability check and whether it may be ``vmap``-ed over keys. The same
key gives the same fixed model; no global state is read or written.

* :class:`Problem` bundles the model (static), the original variables, the
  train and valid splits as samplers (:class:`~dlfix_jax.data.source.Source`,
  in memory or streamed), the repair split and its failing and passing
  inputs on the device (precomputed with the original model) and, when there
  is one, the training history (per-epoch variables, oldest first).
* :class:`ProblemInfo` is what ``applicable(info)`` sees, cheap and static:
  the model, the number of classes, split sizes, whether a history, groups
  or streamed training data exist. A fixer that cannot work on a problem
  returns the reason (the study records *unadaptable*).
* :class:`FixResult` carries the fixed variables, the **mask** of what a
  layer- or neuron-level fixer may have changed (``None`` for model-level
  fixers, which may change everything), and ``info``: JSON-summarisable
  numbers and arrays only; categorical outcomes are integer codes whose
  names the spec's ``codes`` table gives (:func:`summarize_info`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from dlfix_jax import fileio
from dlfix_jax import masks
from dlfix_jax import predict as predict_lib
from dlfix_jax import registry
from dlfix_jax.data.source import Data, Source, as_source
from dlfix_jax.models import base as models_base

LEVELS = ("model", "layer", "neuron")


@dataclasses.dataclass(frozen=True)
class ProblemInfo:
    """Static facts about a problem, for ``applicable``.

    Attributes:
      model: the :class:`~dlfix_jax.models.Model`.
      num_classes: number of classes.
      dataset: dataset name ("" when unknown).
      n_train, n_valid, n_repair, n_failing: split sizes (n_failing: the
        repair inputs the original misclassifies; -1 when not known yet).
      history_len: epochs in the training history (0: none).
      has_groups: the splits carry sensitive-attribute groups.
      streaming: the training split is streamed (not in memory).
    """

    model: models_base.Model
    num_classes: int
    dataset: str = ""
    n_train: int = 0
    n_valid: int = 0
    n_repair: int = 0
    n_failing: int = -1
    history_len: int = 0
    has_groups: bool = False
    streaming: bool = False

    @property
    def has_history(self) -> bool:
        return self.history_len > 0


@struct.dataclass
class Problem:
    """What a fixer gets. A pytree: arrays are leaves; the model and the
    samplers are static.

    Attributes:
      model: the :class:`~dlfix_jax.models.Model` (static).
      variables: the original variables.
      train, valid: samplers over the training and validation splits
        (static; ``.device()`` gives an in-memory split on the device).
      repair: the whole repair split (device).
      failing: repair inputs the original model misclassifies (I_neg).
      passing: repair inputs it classifies correctly (I_pos).
      history: per-epoch variables from base-model training, oldest first
        (the last entry is the final model), or None when the model has no
        training history (a model brought from elsewhere).
      dataset: the dataset's name (static, "" when unknown).
      mean, std: per-channel constants of the inputs' normalisation (static
        tuples): raw pixels in [0, 1] are ``x * std + mean`` (identity for
        MNIST-like data). Image augmentations work in that pixel space.
    """

    model: models_base.Model = struct.field(pytree_node=False)
    variables: dict
    train: Source = struct.field(pytree_node=False)
    valid: Source = struct.field(pytree_node=False)
    repair: Data
    failing: Data
    passing: Data
    history: tuple | None = None
    dataset: str = struct.field(pytree_node=False, default="")
    mean: tuple = struct.field(pytree_node=False, default=(0.0,))
    std: tuple = struct.field(pytree_node=False, default=(1.0,))

    def to_pixels(self, x):
        """Normalised inputs -> pixels in [0, 1] (``x * std + mean``)."""
        return x * jnp.asarray(self.std) + jnp.asarray(self.mean)

    def from_pixels(self, p):
        """Pixels in [0, 1] -> the model's normalised inputs."""
        return (p - jnp.asarray(self.mean)) / jnp.asarray(self.std)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def apply(self, variables, x, **kw):
        return self.model.apply(variables, x, **kw)

    @property
    def info(self) -> ProblemInfo:
        return ProblemInfo(
            model=self.model, num_classes=self.num_classes,
            dataset=self.dataset, n_train=len(self.train),
            n_valid=len(self.valid), n_repair=len(self.repair),
            n_failing=len(self.failing),
            history_len=len(self.history) if self.history else 0,
            has_groups=self.repair.group is not None,
            streaming=not self.train.in_memory)


def problem_info(model, dataset, history_len: int = 0) -> ProblemInfo:
    """The :class:`ProblemInfo` of a (model, dataset) pair before the
    problem is built (``n_failing`` unknown)."""
    def n(split):
        try:
            return len(split)
        except TypeError:
            return -1
    train_src = as_source(dataset.train)
    return ProblemInfo(
        model=model, num_classes=model.num_classes,
        dataset=getattr(dataset, "name", ""), n_train=n(dataset.train),
        n_valid=n(dataset.valid), n_repair=n(dataset.repair),
        history_len=int(history_len),
        has_groups=getattr(dataset.repair, "group", None) is not None,
        streaming=not train_src.in_memory)


def make_problem(model: models_base.Model, variables, dataset, history=None,
                 batch_size: int = 1024) -> Problem:
    """Builds a :class:`Problem`, splitting the repair set by the original
    model's predictions into failing and passing inputs.

    The training and validation splits stay on the host as samplers; the
    repair split (small) goes to the device.

    Raises:
      ValueError: the original variables hold non-finite values or its
        logits on the repair split are non-finite (every fixer would
        search or train on NaNs), or the repair split is streamed.
    """
    check_finite(variables, "the original model's variables")
    repair = dataset.repair
    if not hasattr(repair, "x"):
        raise ValueError("the repair split is streamed; a Problem needs it in "
                         "memory (take a subset: repair.take(n))")
    pred, finite = predict_lib.predict_finite(model, variables, repair.x,
                                              batch_size)
    if not finite.all():
        raise ValueError(
            f"the original model outputs non-finite logits (NaN/Inf "
            f"activations) on {int((~finite).sum())} of {len(finite)} repair "
            f"inputs; no fixer can rank or train on them")
    wrong = pred != np.asarray(repair.y)
    return Problem(
        model=model, variables=variables,
        train=as_source(dataset.train, "train"),
        valid=as_source(dataset.valid, "valid"),
        repair=Data.from_split(repair),
        failing=Data.from_split(repair.take(np.nonzero(wrong)[0])),
        passing=Data.from_split(repair.take(np.nonzero(~wrong)[0])),
        history=None if history is None else tuple(history),
        dataset=getattr(dataset, "name", ""),
        mean=_stat(getattr(dataset, "mean", None), 0.0),
        std=_stat(getattr(dataset, "std", None), 1.0))


def _stat(v, default: float) -> tuple:
    if v is None:
        return (float(default),)
    return tuple(float(a) for a in np.asarray(v, np.float64).reshape(-1))


def check_finite(tree, what: str) -> None:
    """Raises ``ValueError`` naming ``what`` when a float leaf holds NaN/Inf."""
    bad = []
    for path, a in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.inexact):
            if not bool(np.all(np.isfinite(np.asarray(a)))):
                bad.append(jax.tree_util.keystr(path))
    if bad:
        raise ValueError(f"{what} hold non-finite values (NaN/Inf) in "
                         f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")


@struct.dataclass
class FixResult:
    """A fixed model's variables, what may have changed, and what the fixer
    did.

    Attributes:
      variables: the fixed variables (same structure as the original).
      mask: element mask over ``variables["params"]`` of the entries the
        fixer may have changed (layer and neuron level; every entry outside
        it is bit-for-bit the original), or None (model level).
      info: numbers and arrays (iterations, traces, stop codes, sizes).
    """

    variables: dict
    mask: Any = None
    info: dict = struct.field(default_factory=dict)


class FixFn(Protocol):
    def __call__(self, key: jax.Array, problem: Problem,
                 config: ml_collections.ConfigDict) -> FixResult: ...


ApplicableFn = Callable[[ProblemInfo], "str | None"]


def always_applicable(info: ProblemInfo) -> None:
    del info
    return None


@dataclasses.dataclass(frozen=True)
class FixerSpec:
    """A registered fixer.

    Attributes:
      name: registry name ("arachne").
      level: "model", "layer" or "neuron".
      paper: source paper, e.g. "Sohn, Kang, Yoo; TOSEM 2023".
      fix: the pure fix function.
      default_config: returns a fresh default ConfigDict.
      applicable: ``applicable(info: ProblemInfo) -> None | reason``.
      vmappable: ``fix`` has static shapes and no host callbacks, so
        ``jax.vmap(fix, in_axes=(0, None, None))`` over keys is valid.
      abbrev: the study's table abbreviation ("AR").
      codes: ``{info key: names}``: an integer code ``c`` in ``info[key]``
        means ``names[c]``.
      check_config: ``config -> None``, raising ``ValueError`` with one
        line naming a bad value (run before any work).
    """

    name: str
    level: str
    paper: str
    fix: FixFn
    default_config: Callable[[], ml_collections.ConfigDict]
    applicable: ApplicableFn = always_applicable
    vmappable: bool = False
    abbrev: str = ""
    codes: Mapping[str, tuple[str, ...]] = dataclasses.field(
        default_factory=dict)
    check_config: Callable[[ml_collections.ConfigDict], None] | None = None

    def config(self, overrides=None) -> ml_collections.ConfigDict:
        """The default config with ``overrides`` (see :func:`fixer_config`)."""
        return fixer_config(self, overrides)


FIXERS: registry.Registry[FixerSpec] = registry.Registry("fixer")


def spec(name: str, fix: FixFn, *, level: str, paper: str,
         default_config: Callable[[], ml_collections.ConfigDict],
         applicable: ApplicableFn = always_applicable,
         vmappable: bool = False, abbrev: str = "",
         codes: Mapping[str, tuple[str, ...]] | None = None,
         check_config=None) -> FixerSpec:
    """Builds a :class:`FixerSpec` (checks the level)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    return FixerSpec(name, level, paper, fix, default_config, applicable,
                     vmappable, abbrev, dict(codes or {}), check_config)


def register(name: str, **kw):
    """Decorator registering ``fix`` under ``name`` (keywords as
    :func:`spec`); a second registration of a name raises."""
    def deco(fix: FixFn) -> FixFn:
        FIXERS.add(name, spec(name, fix, **kw))
        return fix
    return deco


def get(name: str) -> FixerSpec:
    return FIXERS.get(name)


def names() -> list[str]:
    return FIXERS.names()


# ---------------------------------------------------------------------------
# Configs: the one override rule.


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fixer_config(spec_: FixerSpec, overrides=None
                 ) -> ml_collections.ConfigDict:
    """The fixer's default config updated with ``overrides``.

    ``overrides`` is a mapping (nested or with dotted keys) or a ConfigDict.
    Every key must exist in the default config (a typo would otherwise run
    the default silently), and values are converted to the default's type
    (an int where a float is expected is fine; a string where a number is
    expected is not). Then ``spec.check_config`` runs.

    Raises:
      KeyError: an override names a key the default config lacks.
      ValueError / TypeError: a value of the wrong type or out of range.
    """
    cfg = spec_.default_config()
    if overrides:
        ov = (overrides.to_dict() if hasattr(overrides, "to_dict")
              else dict(overrides))
        for key, value in _flatten(ov).items():
            node, parts = cfg, key.split(".")
            for p in parts[:-1]:
                if p not in node:
                    raise KeyError(f"fixer {spec_.name!r} has no config key "
                                   f"{key!r}; its keys: {sorted(cfg.keys())}")
                node = node[p]
            if parts[-1] not in node:
                raise KeyError(f"fixer {spec_.name!r} has no config key "
                               f"{key!r}; its keys: {sorted(cfg.keys())}")
            old = node[parts[-1]]
            node[parts[-1]] = _coerce(spec_.name, key, old, value)
    if spec_.check_config is not None:
        spec_.check_config(cfg)
    return cfg


def _coerce(name: str, key: str, old, value):
    """``value`` converted to the type of the default ``old``."""
    if old is None or value is None:
        return value
    if isinstance(old, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false",
                                                         "1", "0"):
            return value.lower() in ("true", "1")
        raise TypeError(f"fixer {name!r}: {key} expects a bool, got "
                        f"{value!r}")
    if isinstance(old, (int, float)) and not isinstance(old, bool):
        if isinstance(value, bool):
            raise TypeError(f"fixer {name!r}: {key} expects a number, got "
                            f"{value!r}")
        try:
            num = float(value) if isinstance(value, str) else value
        except ValueError:
            raise TypeError(f"fixer {name!r}: {key} expects a number, got "
                            f"{value!r}") from None
        if isinstance(old, int):
            if float(num) != int(float(num)):
                raise TypeError(f"fixer {name!r}: {key} expects an integer, "
                                f"got {value!r}")
            return int(float(num))
        return float(num)
    if isinstance(old, str) and not isinstance(value, str):
        raise TypeError(f"fixer {name!r}: {key} expects a string, got "
                        f"{value!r}")
    return value


def check_ranges(config, **rules) -> None:
    """Validates config values: ``rules`` maps a key to ``(lo, hi)`` (either
    may be None; inclusive) or to a tuple of allowed values (a set).

    Raises:
      ValueError: one line naming the key, the value and the rule.
    """
    for key, rule in rules.items():
        v = config[key]
        if isinstance(rule, (set, frozenset)):
            if v not in rule:
                raise ValueError(f"config {key}={v!r} is not one of "
                                 f"{sorted(rule)}")
            continue
        lo, hi = rule
        if not isinstance(v, (int, float)) or v != v:
            raise ValueError(f"config {key}={v!r} is not a number")
        if lo is not None and v < lo:
            raise ValueError(f"config {key}={v!r} must be >= {lo}")
        if hi is not None and v > hi:
            raise ValueError(f"config {key}={v!r} must be <= {hi}")


# ---------------------------------------------------------------------------
# Results.


def summarize_info(spec_: FixerSpec | None, info: Any,
                   max_list: int = 64) -> Any:
    """A JSON-safe, size-bounded summary of ``FixResult.info``.

    Arrays with more than ``max_list`` elements become ``{shape, dtype, min,
    max, mean}``; an integer code under a key of ``spec.codes`` gains a
    ``<key>_name`` entry.
    """
    codes = dict(spec_.codes) if spec_ is not None else {}

    def rec(v):
        if isinstance(v, dict):
            return {str(k): rec(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            if len(v) > max_list:
                return {"len": len(v), "head": rec(list(v[:8]))}
            return [rec(x) for x in v]
        if hasattr(v, "shape") and hasattr(v, "dtype"):
            try:
                a = np.asarray(v)
            except Exception:  # noqa: BLE001 - typed PRNG keys and the like
                return str(v)
            if a.size > max_list:
                out = {"shape": list(a.shape), "dtype": str(a.dtype)}
                if a.dtype.kind in "biuf" and a.size:
                    f = a.astype(np.float64)
                    finite = f[np.isfinite(f)]
                    if finite.size:
                        out.update(min=float(finite.min()),
                                   max=float(finite.max()),
                                   mean=float(finite.mean()))
                return out
            return fileio.json_safe(a)
        return fileio.json_safe(v)

    out = rec(dict(info)) if isinstance(info, Mapping) else rec(info)
    if isinstance(out, dict):
        for key, table in codes.items():
            v = out.get(key)
            if isinstance(v, int) and 0 <= v < len(table):
                out[f"{key}_name"] = table[v]
            elif isinstance(v, list) and all(isinstance(c, int) for c in v):
                out[f"{key}_name"] = [table[c] if 0 <= c < len(table)
                                      else str(c) for c in v]
    return out


def mask_count(mask, params=None) -> int:
    """Selected entries of a result's mask (0 for None)."""
    return 0 if mask is None else masks.count(mask, params)
