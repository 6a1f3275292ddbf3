"""Sequential layer specs and the small linen modules they build.

A sequential model is a tuple of :class:`LayerSpec` (kind, name, options).
Every layer, parameter-free ones included, is a named linen submodule, so
``Model.apply(..., capture=...)`` can report the input and output of any of
them by name, and the spec doubles as the description that piecewise-linear
fixers (RA) and the Keras importer work with.

Kinds and options:

=========== =================================================================
``conv``    features, kernel (h, w), strides (1, 1), padding "VALID"|"SAME",
            use_bias True
``dense``   features, use_bias True
``bn``      momentum 0.99, epsilon 1e-3 (Keras defaults), use_scale/use_bias
``relu``    (none)
``maxpool`` window (h, w), strides (default = window), padding "VALID"
``avgpool`` window (h, w), strides (default = window), padding "VALID"
``gap``     global average pooling over H, W
``flatten`` (none)
``dropout`` rate
=========== =================================================================

A Dense layer's output is its pre-activation; a ``relu`` layer that follows
it has its own name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

KINDS = ("conv", "dense", "bn", "relu", "maxpool", "avgpool", "gap", "flatten",
         "dropout")
PIECEWISE_LINEAR_KINDS = ("conv", "dense", "bn", "relu", "maxpool", "avgpool",
                          "gap", "flatten", "dropout")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer of a sequential model: kind, unique name and options."""

    kind: str
    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(
                f"unknown layer kind {self.kind!r} for layer {self.name!r}; "
                f"known kinds: {', '.join(KINDS)}")

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)


def spec(kind: str, name: str, **options) -> LayerSpec:
    """Builds a :class:`LayerSpec`; list options become tuples (hashable)."""
    items = tuple(sorted(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))
    return LayerSpec(kind, name, items)


class Relu(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(x)


class Flatten(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x.reshape((x.shape[0], -1))


class GlobalAvgPool(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.mean(x, axis=(1, 2))


class Pool(nn.Module):
    kind: str = "max"
    window: tuple[int, int] = (2, 2)
    strides: tuple[int, int] | None = None
    padding: str = "VALID"

    @nn.compact
    def __call__(self, x):
        strides = self.strides or self.window
        if self.kind == "max":
            return nn.max_pool(x, self.window, strides, self.padding)
        # Keras AveragePooling2D with SAME padding excludes the padded cells.
        return nn.avg_pool(x, self.window, strides, self.padding,
                           count_include_pad=False)


class Sequential(nn.Module):
    """A linen module built from a tuple of :class:`LayerSpec`."""

    layers: tuple[LayerSpec, ...]

    @nn.compact
    def __call__(self, x, train: bool = False):
        for s in self.layers:
            x = _layer(s, x, train)
        return x


def _layer(s: LayerSpec, x, train: bool):
    """Creates (inside a compact parent) and applies the module of one layer."""
    o = s.opts
    if s.kind == "conv":
        return nn.Conv(o["features"], tuple(o["kernel"]),
                       strides=tuple(o.get("strides", (1, 1))),
                       padding=o.get("padding", "VALID"),
                       use_bias=o.get("use_bias", True), name=s.name)(x)
    if s.kind == "dense":
        return nn.Dense(o["features"], use_bias=o.get("use_bias", True),
                        name=s.name)(x)
    if s.kind == "bn":
        return nn.BatchNorm(momentum=o.get("momentum", 0.99),
                            epsilon=o.get("epsilon", 1e-3),
                            use_scale=o.get("use_scale", True),
                            use_bias=o.get("use_bias", True),
                            name=s.name)(x, use_running_average=not train)
    if s.kind == "relu":
        return Relu(name=s.name)(x)
    if s.kind in ("maxpool", "avgpool"):
        strides = o.get("strides")
        return Pool(kind=s.kind[:3], window=tuple(o["window"]),
                    strides=tuple(strides) if strides else None,
                    padding=o.get("padding", "VALID"), name=s.name)(x)
    if s.kind == "gap":
        return GlobalAvgPool(name=s.name)(x)
    if s.kind == "flatten":
        return Flatten(name=s.name)(x)
    if s.kind == "dropout":
        return nn.Dropout(o["rate"], name=s.name)(x, deterministic=not train)
    raise ValueError(f"unknown layer kind {s.kind!r}")


def check_unique_names(layers: Sequence[LayerSpec]) -> None:
    names = [s.name for s in layers]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate layer names: {dup}")
