"""The fixer interface: problems, results and the registry.

A fixer is a **pure** function ``fix(key, problem, config) -> FixResult``
registered by name with its level (model / layer / neuron), source paper,
default config (an ``ml_collections.ConfigDict``), applicability check and
whether it may be ``vmap``-ed over keys. The same key gives the same fixed
model; no global state is read or written.

``problem`` bundles the model (static), the original variables, the
train / valid / repair splits, the failing and passing repair inputs
(precomputed with the original model) and, when there is one, the training
history (per-epoch variables, oldest first).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from dlfix_jax.models import base as models_base

LEVELS = ("model", "layer", "neuron")


@struct.dataclass
class Data:
    """Device-side copy of a split: x, y and optional group."""

    x: jax.Array
    y: jax.Array
    group: jax.Array | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @classmethod
    def from_split(cls, split) -> "Data":
        g = None if split.group is None else jnp.asarray(split.group)
        return cls(jnp.asarray(split.x), jnp.asarray(split.y, jnp.int32), g)

    def take(self, idx) -> "Data":
        g = None if self.group is None else self.group[idx]
        return Data(self.x[idx], self.y[idx], g)


@struct.dataclass
class Problem:
    """What a fixer gets. A pytree: arrays are leaves, the model is static.

    Attributes:
      model: the :class:`~dlfix_jax.models.Model` (static).
      variables: the original variables.
      train, valid, repair: the dataset's splits.
      failing: repair inputs the original model misclassifies (I_neg).
      passing: repair inputs it classifies correctly (I_pos).
      history: per-epoch variables from base-model training, oldest first
        (the last entry is the final model), or None when the model has no
        training history (a model brought from elsewhere).
    """

    model: models_base.Model = struct.field(pytree_node=False)
    variables: dict
    train: Data
    valid: Data
    repair: Data
    failing: Data
    passing: Data
    history: tuple | None = None

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def apply(self, variables, x, **kw):
        return self.model.apply(variables, x, **kw)


def predict_batched(model: models_base.Model, variables, x, batch_size: int = 1024
                    ) -> np.ndarray:
    """Predicted labels of ``x`` in batches, as a numpy array."""
    fn = jax.jit(lambda v, a: jnp.argmax(model.apply(v, a), -1))
    out = [np.asarray(fn(variables, x[i:i + batch_size]))
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0,), np.int32)


def make_problem(model: models_base.Model, variables, dataset, history=None,
                 batch_size: int = 1024) -> Problem:
    """Builds a :class:`Problem`, splitting the repair set by the original
    model's predictions into failing and passing inputs."""
    pred = predict_batched(model, variables, dataset.repair.x, batch_size)
    wrong = pred != dataset.repair.y
    return Problem(
        model=model, variables=variables,
        train=Data.from_split(dataset.train), valid=Data.from_split(dataset.valid),
        repair=Data.from_split(dataset.repair),
        failing=Data.from_split(dataset.repair.take(np.nonzero(wrong)[0])),
        passing=Data.from_split(dataset.repair.take(np.nonzero(~wrong)[0])),
        history=None if history is None else tuple(history))


@struct.dataclass
class FixResult:
    """A fixed model's variables and what the fixer did (``info``: e.g.
    localised weights, iterations, fitness trace, early-stop reason)."""

    variables: dict
    info: dict = struct.field(default_factory=dict)


class FixFn(Protocol):
    def __call__(self, key: jax.Array, problem: Problem,
                 config: ml_collections.ConfigDict) -> FixResult: ...


ApplicableFn = Callable[[models_base.Model, Any], "str | None"]


def always_applicable(model, dataset) -> None:
    del model, dataset
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
      applicable: ``applicable(model, dataset) -> None | reason``.
      vmappable: ``fix`` has static shapes and no host callbacks, so
        ``jax.vmap(fix, in_axes=(0, None, None))`` over keys is valid.
      abbrev: the study's table abbreviation ("AR").
    """

    name: str
    level: str
    paper: str
    fix: FixFn
    default_config: Callable[[], ml_collections.ConfigDict]
    applicable: ApplicableFn = always_applicable
    vmappable: bool = False
    abbrev: str = ""

    def config(self, **overrides) -> ml_collections.ConfigDict:
        cfg = self.default_config()
        cfg.update(overrides)
        return cfg


_REGISTRY: dict[str, FixerSpec] = {}


def register(name: str, *, level: str, paper: str,
             default_config: Callable[[], ml_collections.ConfigDict],
             applicable: ApplicableFn = always_applicable,
             vmappable: bool = False, abbrev: str = ""):
    """Decorator registering ``fix`` under ``name``; a second name raises."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")

    def deco(fix: FixFn) -> FixFn:
        if name in _REGISTRY:
            raise ValueError(f"fixer {name!r} registered twice")
        _REGISTRY[name] = FixerSpec(name, level, paper, fix, default_config,
                                    applicable, vmappable, abbrev)
        return fix

    return deco


def get(name: str) -> FixerSpec:
    if name not in _REGISTRY:
        raise KeyError(f"unknown fixer {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def names() -> list[str]:
    return sorted(_REGISTRY)
