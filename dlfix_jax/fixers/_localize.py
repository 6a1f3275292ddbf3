"""Fault localisation blocks shared by the neuron-level fixers.

Scores over a layer's weights (or units) that fixers rank to decide what
to change, and the selection helpers that turn scores into a mask:

* :func:`dense_gradient` — ``|dL/dW|`` of a Dense logits layer from its
  cached inputs (closed form, host numpy; Arachne's gradient loss);
* :func:`grad_scores` — ``|dL/dkernel|`` of any layer through the model
  (jax autodiff; hidden layers, conv layers);
* :func:`forward_impact` — Arachne's forward impact of each weight of a
  Dense kernel (coinse's L1 row normalisation);
* :func:`pareto_front` — the non-dominated points when maximising two
  scores;
* :func:`bidirectional` — Arachne's localisation: the top ``N_g`` weights by
  gradient, then their Pareto front over (gradient, forward impact);
* :func:`top_k` and :func:`to_weight_mask` — the k best entries of a score
  array and their element mask.

Host-side functions run outside ``jit`` on concrete data, so their outputs
(sizes ``k``) are Python ints and the searches downstream have static
shapes. CARE's causal effects and NeuRecover's history deltas live with
their fixers (one owner: the fixer that defines them) unless two fixers
share them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dlfix_jax import masks
from dlfix_jax.models import base as models_base


def dense_gradient(kernel: np.ndarray, bias: np.ndarray, h: np.ndarray,
                   y: np.ndarray) -> np.ndarray:
    """``|d sum_n CE(h_n W + b, y_n) / dW|`` (d, C) for a Dense logits layer
    (float64 on the host)."""
    w = kernel.astype(np.float64)
    h = h.astype(np.float64)
    z = h @ w + bias.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return np.abs(h.T @ p)


@functools.lru_cache(maxsize=64)
def _grad_kernel(model, layer: str, leaf: str):
    """Jitted ``d sum CE / d params[layer][leaf]`` (one per model, layer and
    leaf: a second call with the same shapes compiles nothing)."""

    def loss(w, variables, xb, yb):
        params = variables["params"]
        lp = dict(models_base.get_layer_params(params, layer))
        lp[leaf] = w
        v = dict(variables)
        v["params"] = models_base.set_layer_params(params, layer, lp)
        z = model.apply(v, xb)
        lse = jax.nn.logsumexp(z, axis=-1)
        return jnp.sum(lse - jnp.take_along_axis(z, yb[:, None], -1)[:, 0])

    return jax.jit(jax.grad(loss))


def grad_scores(model, variables, layer: str, x, y, *, leaf: str = "kernel",
                batch_size: int = 256) -> np.ndarray:
    """``|d sum_n CE(f(x_n), y_n) / d params[layer][leaf]|`` through the
    whole model (inference mode), accumulated over batches of ``x``."""
    target = models_base.get_layer_params(variables["params"], layer)[leaf]
    g = _grad_kernel(model, layer, leaf)
    total = np.zeros(np.shape(target), np.float64)
    x = np.asarray(x)
    y = np.asarray(y, np.int32)
    for i in range(0, len(x), batch_size):
        total += np.asarray(g(target, variables,
                              jnp.asarray(x[i:i + batch_size]),
                              jnp.asarray(y[i:i + batch_size])), np.float64)
    return np.abs(total)


def forward_impact(kernel: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Arachne's forward impact (front part) of a Dense kernel (d, C):
    ``mean_n |h_ni w_ij| / sum_i' |h_ni' w_i'j|``.

    Computed without the (N, d, C) tensor: the denominator is
    ``(|h| @ |w|)[n, j]``.
    """
    w = kernel.astype(np.float64)
    ah, aw = np.abs(h.astype(np.float64)), np.abs(w)
    denom = ah @ aw                                          # (N, C)
    inv = np.where(denom > 0, 1.0 / np.where(denom > 0, denom, 1.0), 0.0)
    return aw * (ah.T @ inv) / max(len(h), 1)               # (d, C)


def pareto_front(g: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Boolean mask of the points not dominated when maximising (g, f).

    p is dominated iff some q has g_q >= g_p, f_q >= f_p, one strictly.

    Raises:
      ValueError: a score is NaN (non-finite weights or activations upstream:
        no point can be ranked). Each pass of the loop consumes at least one
        point, so it always terminates (``NaN == NaN`` is false, which made
        an earlier version spin forever on a NaN score).
    """
    g, f = np.asarray(g), np.asarray(f)
    if np.isnan(g).any() or np.isnan(f).any():
        raise ValueError(
            f"pareto_front: the scores hold NaN ({int(np.isnan(g).sum())} "
            f"of g, {int(np.isnan(f).sum())} of f); the model or its "
            f"activations are non-finite")
    order = np.lexsort((-f, -g))  # g descending, then f descending
    gs, fs = g[order], f[order]
    keep = np.zeros(len(g), bool)
    best_f_higher_g = -np.inf   # max f over points with strictly larger g
    i = 0
    while i < len(gs):
        j = i + 1  # the group of equal g: always at least point i
        while j < len(gs) and gs[j] == gs[i]:
            j += 1
        grp_max = fs[i]  # sorted descending within the group
        for t in range(i, j):
            keep[order[t]] = fs[t] == grp_max and fs[t] > best_f_higher_g
        best_f_higher_g = max(best_f_higher_g, grp_max)
        i = j
    return keep


def bidirectional(grad: np.ndarray, fi: np.ndarray, num_candidates: int
                  ) -> np.ndarray:
    """Arachne's selection: flat positions (sorted) of the Pareto front over
    (grad, fi) among the ``num_candidates`` largest gradients (all when
    ``num_candidates <= 0`` or larger than the array)."""
    flat_g, flat_f = grad.ravel(), fi.ravel()
    n = flat_g.size
    ng = n if num_candidates <= 0 else min(n, int(num_candidates))
    cand = np.argsort(-flat_g, kind="stable")[:ng]
    on_front = pareto_front(flat_g[cand], flat_f[cand])
    return np.sort(cand[on_front])


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Flat positions of the ``k`` largest scores (ties: lower position
    first), sorted ascending."""
    flat = np.asarray(scores).ravel()
    k = min(int(k), flat.size)
    return np.sort(np.argsort(-flat, kind="stable")[:k])


def to_weight_mask(params, layer: str, flat_positions: np.ndarray,
                   shape) -> tuple[np.ndarray, masks.Mask]:
    """(k, ndim) kernel indices of flat positions and their element mask."""
    idx = np.stack(np.unravel_index(np.asarray(flat_positions, np.int64),
                                    shape), axis=1).astype(np.int32)
    return idx, masks.weight_mask(params, layer, idx)
