"""Batched prediction: the one cached kernel per model structure.

Every part of the library that predicts labels or logits of one model goes
through here (stacks of models go through :mod:`dlfix_jax.seed_axis`, which
maps these same per-model functions over a seed axis). One cache policy:
``functools.lru_cache`` keyed by the :class:`~dlfix_jax.models.Model`, which
hashes by structure, so a second call, a fresh ``models.get(...)`` of the
same architecture, or another module asking for the same kernel all reuse
one compilation. Inputs are cut into batches of a fixed size; the last one
is zero-padded, so one shape is compiled per batch size.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dlfix_jax.data import source as source_lib


@functools.lru_cache(maxsize=None)
def model_logits(model) -> Callable:
    """The per-model function ``(variables, x) -> float32 logits``."""
    def logits(variables, x):
        return model.apply(variables, x).astype(jnp.float32)
    return logits


@functools.lru_cache(maxsize=None)
def model_labels(model) -> Callable:
    """The per-model function ``(variables, x) -> (labels, finite)`` where
    ``finite`` tells whether all logits of an input were finite."""
    def labels(variables, x):
        z = model.apply(variables, x)
        finite = jnp.all(jnp.isfinite(z), axis=-1)
        return jnp.argmax(z, axis=-1).astype(jnp.int32), finite
    return labels


@functools.lru_cache(maxsize=None)
def _jit_logits(model):
    return jax.jit(model_logits(model))


@functools.lru_cache(maxsize=None)
def _jit_labels(model):
    return jax.jit(model_labels(model))


def pad(xb: np.ndarray, batch_size: int) -> np.ndarray:
    """Pads a batch to ``batch_size`` rows with zeros (one compiled shape)."""
    if len(xb) == batch_size:
        return xb
    extra = np.zeros((batch_size - len(xb),) + np.shape(xb)[1:],
                     np.asarray(xb).dtype)
    return np.concatenate([np.asarray(xb), extra])


def _run(fn, variables, x, batch_size: int):
    x = np.asarray(x, np.float32) if not isinstance(x, jax.Array) else x
    n = len(x)
    if n == 0:
        return None
    bs = max(1, min(int(batch_size), n))
    outs = []
    for start in range(0, n, bs):
        xb = x[start:start + bs]
        m = len(xb)
        out = fn(variables, jnp.asarray(pad(np.asarray(xb), bs)))
        outs.append(jax.tree_util.tree_map(lambda a: np.asarray(a)[:m], out))
    return jax.tree_util.tree_map(lambda *o: np.concatenate(o), *outs)


def logits(model, variables, x, batch_size: int = 256) -> np.ndarray:
    """(N, C) float32 logits of ``x``."""
    out = _run(_jit_logits(model), variables, x, batch_size)
    return (np.zeros((0, model.num_classes), np.float32) if out is None
            else out)


def predict_finite(model, variables, x, batch_size: int = 256
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,) int32, finite (N,) bool) of ``x``."""
    out = _run(_jit_labels(model), variables, x, batch_size)
    if out is None:
        return np.zeros((0,), np.int32), np.zeros((0,), bool)
    return out


def predict(model, variables, x, batch_size: int = 256) -> np.ndarray:
    """(N,) int32 predicted labels of ``x``."""
    return predict_finite(model, variables, x, batch_size)[0]


def accuracy(model, variables, data, batch_size: int = 256) -> float:
    """Fraction of ``data`` classified correctly (NaN when empty).

    ``data`` is a Split, a :class:`~dlfix_jax.data.source.Source` (streamed
    ones are read batch by batch) or a device-side ``Data``.
    """
    if isinstance(data, source_lib.Source) and not data.in_memory:
        right = seen = 0
        for b in data.ordered(batch_size):
            right += int(np.sum(predict(model, variables, b.x, batch_size)
                                == np.asarray(b.y)))
            seen += len(b)
        return right / seen if seen else float("nan")
    if isinstance(data, source_lib.Source):
        data = data.split()
    y = np.asarray(data.y)
    if len(y) == 0:
        return float("nan")
    return float(np.mean(predict(model, variables, data.x, batch_size) == y))


def device_accuracy(model, variables, x: jax.Array, y: jax.Array,
                    batch_size: int = 1000) -> jax.Array:
    """Top-1 accuracy (fraction) of ``variables`` on device arrays; traceable
    (usable inside a jitted or vmapped fixer). Batches run under
    ``lax.map``; padded rows carry label -1 and never count."""
    n = x.shape[0]
    bs = max(1, min(batch_size, n))
    nb = -(-n // bs)
    extra = nb * bs - n
    if extra:
        x = jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)])
        y = jnp.concatenate([y, -jnp.ones((extra,), y.dtype)])
    xb = x.reshape((nb, bs) + x.shape[1:])
    yb = y.reshape(nb, bs)

    def one(args):
        xi, yi = args
        return jnp.sum(jnp.argmax(model.apply(variables, xi), -1) == yi)

    return jnp.sum(jax.lax.map(one, (xb, yb))) / n
