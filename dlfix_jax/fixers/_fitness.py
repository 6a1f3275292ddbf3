"""Cached-activation fitness: score candidate weights of one Dense layer
without re-running the layers before it.

A search over some entries of one Dense layer's kernel changes nothing
upstream, so the layer's input ``h`` (and its original output and the
logits) are computed **once** per input (:func:`cache_layer`). A candidate
``v`` (k,) for the kernel entries at ``(rows, cols)`` then changes the
layer's output by ``h[:, rows] @ ((v - w0)[:, None] * onehot(cols))``:

* for the logits layer, that *is* the change of the logits (one matmul per
  candidate; the whole population is one batched matmul);
* for a hidden layer the rest of the network (the tail of
  :func:`~dlfix_jax.models.base.split_at`) runs on the changed output.

:func:`candidate_logits` builds ``v -> logits`` (traceable, vmappable) and
:func:`correct_score` is the Arachne-family per-set score
``N_correct + sum_{wrong} 1 / (CE + 1)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dlfix_jax.models import base as models_base


@dataclasses.dataclass(frozen=True, eq=False)
class LayerCache:
    """What :func:`cache_layer` computed for one set of inputs.

    Attributes:
      layer: the Dense layer's name.
      h: (N, d) its input.
      out: (N, units) its original output (pre-activation).
      logits: (N, C) the model's original logits.
      tail: the model after the layer (None: the layer's output is the
        logits), and ``tail_vars`` its variables.
    """

    layer: str
    h: np.ndarray
    out: np.ndarray
    logits: np.ndarray
    tail: models_base.Model | None = None
    tail_vars: dict | None = None

    def __len__(self) -> int:
        return len(self.h)

    def take(self, idx) -> "LayerCache":
        return dataclasses.replace(self, h=self.h[idx], out=self.out[idx],
                                   logits=self.logits[idx])


def is_logits_layer(model: models_base.Model, layer: str) -> bool:
    """Whether ``layer``'s output reaches the logits unchanged (only
    dropout layers after it)."""
    if not model.is_sequential:
        return True  # callers check the last parametric layer themselves
    names = [s.name for s in model.layers]
    after = model.layers[names.index(layer) + 1:]
    return all(s.kind == "dropout" for s in after)


def cache_layer(model: models_base.Model, variables: dict, layer: str, x,
                batch_size: int = 1024) -> LayerCache:
    """Runs the model once over ``x`` and keeps ``layer``'s input, output
    and the logits (host float32).

    Raises:
      ValueError: the layer's input is not a flat feature vector.
    """
    fn = models_base.jitted_apply(model, (layer,))
    hs, outs, zs = [], [], []
    for i in range(0, len(x), batch_size):
        z, acts = fn(variables, x[i:i + batch_size])
        hs.append(np.asarray(acts[layer]["input"], np.float32))
        outs.append(np.asarray(acts[layer]["output"], np.float32))
        zs.append(np.asarray(z, np.float32))
    kernel = models_base.get_layer_params(variables["params"], layer)["kernel"]
    d, units = np.shape(kernel)[0], np.shape(kernel)[-1]
    if not hs:
        h = np.zeros((0, d), np.float32)
        out = np.zeros((0, units), np.float32)
        z = np.zeros((0, model.num_classes), np.float32)
    else:
        h, out, z = np.concatenate(hs), np.concatenate(outs), np.concatenate(zs)
    if h.ndim != 2:
        raise ValueError(f"input of {layer!r} has shape {h.shape[1:]}, "
                         "expected a flat feature vector (a Dense layer)")
    tail = tail_vars = None
    if not is_logits_layer(model, layer):
        _, tail = models_base.split_at(model, layer, variables)
        _, tail_vars = models_base.split_variables_at(model, layer, variables)
    return LayerCache(layer, h, out, z, tail, tail_vars)


def candidate_logits(cache: LayerCache, rows, cols, w0):
    """``v (k,) -> (N, C)`` logits with the kernel entries ``(rows, cols)``
    of the cached layer set to ``v`` (originally ``w0``). Traceable."""
    rows = jnp.asarray(rows)
    cols = jnp.asarray(cols)
    w0 = jnp.asarray(w0, jnp.float32)
    units = cache.out.shape[1]
    onehot = jax.nn.one_hot(cols, units, dtype=jnp.float32)   # (k, units)
    hs = jnp.asarray(cache.h)[:, rows]                         # (N, k)
    if cache.tail is None:
        z = jnp.asarray(cache.logits)

        def logits(v):
            return z + hs @ ((v - w0)[:, None] * onehot)
        return logits

    out = jnp.asarray(cache.out)
    tail, tail_vars = cache.tail, cache.tail_vars

    def logits(v):
        return tail.apply(tail_vars, out + hs @ ((v - w0)[:, None] * onehot))
    return logits


def cross_entropy_and_correct(z, y):
    """Per-example CE and correctness of logits ``z`` for labels ``y``."""
    lse = jax.nn.logsumexp(z, axis=-1)
    loss = lse - jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0]
    return loss, jnp.argmax(z, axis=-1) == y


def correct_score(z, y):
    """``N_correct + sum_{misclassified} 1 / (CE + 1)`` (Arachne's per-set
    fitness term)."""
    loss, ok = cross_entropy_and_correct(z, y)
    return jnp.sum(ok) + jnp.sum(jnp.where(ok, 0.0, 1.0 / (loss + 1.0)))


def sample_with_replacement(key, n: int, *arrays):
    """``arrays`` (equal leading size) at ``n`` rows drawn with replacement
    with ``key`` (eAI's positive sampling); unchanged when ``n <= 0``."""
    if n <= 0:
        return arrays
    sel = jax.random.choice(key, arrays[0].shape[0], (n,), replace=True)
    return tuple(a[sel] for a in arrays)
