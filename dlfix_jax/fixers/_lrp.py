"""Layer-wise relevance propagation (LRP) with HUDD's rules, as custom VJPs.

Relevance is propagated from the output to the input of a **sequential**
model; each layer of :mod:`dlfix_jax.models.layers` is wrapped in a
``jax.custom_vjp`` whose backward pass is its LRP rule, so one ``jax.vjp``
of the wrapped model gives the relevance at the input of every layer at
once (zero "probe" inputs added after each layer collect the cotangents).

Rules, read from HUDD (``SNTSVV/HUDD-Toolset@f87ae46 dnnModels.py``:
``Linear/Conv2d/MaxPool2d/ReLU/Dropout.relprop``), with ``X`` the layer's
input, ``Y`` its output, ``R`` the relevance at its output and
``EPS = 1e-9``:

* ``dense`` — **z+ rule**: ``R_in = X * ((R / (X W+ + EPS)) W+^T)`` with
  ``W+ = max(W, 0)``; the bias is not used.
* ``conv``, ``maxpool`` — **z rule** with stabiliser: ``R_in = X *
  gradprop(R / (Y + EPS))`` where ``gradprop`` is the layer's VJP at ``X``
  (transposed convolution; for max pooling, routing to the window's
  maximum, i.e. max-unpooling with the argmax indices). ``Y`` includes the
  bias, as in the original.
* ``relu``, ``dropout`` — relevance passes unchanged; ``flatten`` reshapes.
* Our extensions for kinds the original has no layer of (HUDD's models are
  AlexNet and a keypoint net): ``avgpool``, ``gap`` and ``bn`` (inference
  mode, an affine map per channel) use the same z rule.

The relevance at the output is the predicted class's logit, zero for every
other class (``HeatmapModule.generateHeatMap``). A layer's heatmap is the
relevance at its **input** (``self.HM = R`` after ``relprop``).

Differences from the original: overlapping max-pool windows add the
contributions routed to one input (the VJP), where torch's ``max_unpool2d``
keeps one of them; for the tiling windows of our models both are equal.

Non-sequential models (ResNet18, DenseNet121) are not supported: their
additions and concatenations need relevance rules the original does not
define (:func:`supports` says why).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dlfix_jax import predict as predict_lib
from dlfix_jax.models import base as models_base
from dlfix_jax.models import layers as layers_lib

EPS = 1e-9
PASS_THROUGH = ("relu", "dropout", "flatten")
Z_RULE = ("conv", "maxpool", "avgpool", "gap", "bn")


def supports(model) -> str | None:
    """None when LRP can run on ``model``, else the reason it cannot."""
    if not model.is_sequential:
        return (f"LRP (HUDD's heatmaps) is implemented for sequential models "
                f"only; {model.name!r} has residual additions or "
                "concatenations, for which the original defines no relevance "
                "rule")
    kinds = {s.kind for s in model.layers}
    bad = kinds - set(PASS_THROUGH) - set(Z_RULE) - {"dense"}
    if bad:
        return f"no LRP rule for layer kinds {sorted(bad)}"
    return None


def _apply_layer(spec, lv, x):
    return layers_lib.Sequential((spec,)).apply(lv, x, train=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def lrp_layer(spec, lv, x):
    """The layer ``spec`` (variables ``lv``) on ``x``; its VJP maps the
    relevance at the output to the relevance at the input."""
    return _apply_layer(spec, lv, x)


def _lrp_fwd(spec, lv, x):
    y = _apply_layer(spec, lv, x)
    return y, (lv, x, y)


def relevance_in(spec, lv, x, y, r):
    """The LRP rule of one layer: relevance at its input (module docstring)."""
    if spec.kind in ("relu", "dropout"):
        return r
    if spec.kind == "flatten":
        return r.reshape(x.shape)
    if spec.kind == "dense":
        w = jnp.maximum(lv["params"][spec.name]["kernel"], 0.0)
        z = x @ w + EPS
        return x * ((r / z) @ w.T)
    if spec.kind in Z_RULE:
        s = r / (y + EPS)
        _, vjp = jax.vjp(lambda a: _apply_layer(spec, lv, a), x)
        return x * vjp(s)[0]
    raise ValueError(f"no LRP rule for layer kind {spec.kind!r}")


def _lrp_bwd(spec, res, r):
    lv, x, y = res
    zeros = jax.tree_util.tree_map(jnp.zeros_like, lv)
    return zeros, relevance_in(spec, lv, x, y, r)


lrp_layer.defvjp(_lrp_fwd, _lrp_bwd)


def relevances(model, variables, x):
    """Relevance at the input of every layer (traceable).

    Returns:
      ``(rel, logits)``: ``rel`` is a tuple with one array per layer of
      ``model.layers`` (the relevance at that layer's input, same shape as
      the input), ``logits`` the model's output.
    """
    specs = model.layers
    lvs = [models_base.split_variables(variables, [s.name]) for s in specs]
    outs, h = [], x
    for s, lv in zip(specs, lvs):
        h = _apply_layer(s, lv, h)
        outs.append(jnp.zeros_like(h))

    def wrapped(a, probes):
        h = a
        for s, lv, p in zip(specs, lvs, probes):
            h = lrp_layer(s, lv, h) + p
        return h

    logits, vjp = jax.vjp(wrapped, x, tuple(outs))
    top = jnp.argmax(logits, -1)
    r_out = jax.nn.one_hot(top, logits.shape[-1], dtype=logits.dtype) * logits
    r_x, r_probes = vjp(r_out)
    return (r_x,) + tuple(r_probes[:-1]), logits


def distinct_layers(model) -> list[int]:
    """Indices of the layers whose input relevance is a distinct heatmap.

    Relevance passes unchanged through relu, dropout and flatten, so the
    inputs of consecutive layers after one of them carry the same heatmap;
    the first layer of each such group is kept (HUDD's AlexNet list keeps
    the ReLU, the first of ReLU -> MaxPool). The group of the model's input
    (pixel relevance) is left out: HUDD's layer selection excludes it
    (``Helper.selectLayer`` sets layer 0's score to 1e9).
    """
    keep, group, last_group = [], 0, 0
    for i, s in enumerate(model.layers):
        if group != last_group:
            keep.append(i)
            last_group = group
        if s.kind not in PASS_THROUGH:
            group += 1
    return keep


@functools.lru_cache(maxsize=None)
def _heatmap_kernel(model, layers: tuple[int, ...]):
    def fn(variables, x):
        rel, _ = relevances(model, variables, x)
        return tuple(rel[i].reshape(x.shape[0], -1) for i in layers)
    return jax.jit(fn)


def heatmaps(model, variables, x, layers, batch_size: int = 256
             ) -> list[np.ndarray]:
    """Flattened heatmaps ``(N, D_i)`` (float32, host) of ``x`` at the input
    of each layer index in ``layers``, in batches of ``batch_size`` (the
    last one zero-padded: one compiled shape)."""
    layers = tuple(int(i) for i in layers)
    fn = _heatmap_kernel(model, layers)
    n = len(x)
    bs = max(1, min(int(batch_size), n))
    parts = [[] for _ in layers]
    for start in range(0, n, bs):
        xb = np.asarray(x[start:start + bs], np.float32)
        m = len(xb)
        out = fn(variables, jnp.asarray(predict_lib.pad(xb, bs)))
        for j, o in enumerate(out):
            parts[j].append(np.asarray(o)[:m])
    return [np.concatenate(p) if p else np.zeros((0, 0), np.float32)
            for p in parts]
