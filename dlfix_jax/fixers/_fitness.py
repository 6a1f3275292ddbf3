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

Candidates over entries of **several** Dense kernels of a sequential model
(:func:`tail_setup`, :func:`tail_logits`) change the earliest one's cached
output the same low-rank way and run the rest of the model with the other
entries scattered into its kernels. The low-rank term costs ``N k1 units``
per candidate against ``N d units`` for re-running that layer's matmul, so
it pays when that layer holds fewer than ``d`` genes; otherwise the layer's
matmul is re-run (:data:`LOW_RANK_MAX_FRACTION`). NeuRecover, Arachne's
``localisation="all"`` and GenMuNN use it (GenMuNN's 1% of every kernel is
173 genes in the study LeNet5's 144-input layer: the full form there).

:func:`candidate_logits` builds ``v -> logits`` (traceable, vmappable) and
:func:`correct_score` is the Arachne-family per-set score
``N_correct + sum_{wrong} 1 / (CE + 1)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dlfix_jax import masks
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


LOW_RANK_MAX_FRACTION = 1.0
""":func:`tail_setup` takes the low-rank form when the earliest layer holds
fewer genes than this fraction of its input width (``k1 < d``: fewer
multiply-adds per candidate, ``N k1 units`` against ``N d units``).
Measured on 2 CPU cores (``python -m benchmarks.tail_fitness``; the study's
MNIST LeNet5, ``d`` = 144 inputs, 120 units; 5,000 inputs, a population of
100 under ``lax.map``): low rank / full = 0.59 at ``k1`` = 0.02 d, 0.70 at
0.2 d, 0.78 at 0.4 d, 0.89 at 0.6 d, 0.93 at 0.8 d, 1.05 at d, 1.43 at
1.7 d (BENCHMARKS.md). GPU/TPU: the same rule by the count of
multiply-adds, not measured there."""


@struct.dataclass
class TailSetup:
    """How a candidate over kernel entries of several Dense layers is scored
    from the cached input ``h`` and output ``out`` of the earliest one
    (:func:`tail_setup`). A pytree: arrays are leaves (pass it to a jitted
    function as an argument); the tail model, leaf positions and the form
    are static.

    Attributes:
      first_genes: (k1,) positions in the candidate of the earliest layer's
        entries when ``low_rank``, whose change enters as ``out + h[:, rows]
        @ ((v - w0) onehot(cols))`` (as :func:`candidate_logits`); empty
        otherwise.
      rows, cols, w0: those entries' kernel positions and original values
        (empty when not ``low_rank``).
      rest_genes: (k2,) positions of the other entries (every entry when not
        ``low_rank``), scattered into ``tail_vars`` at :attr:`rest_idx`.
      rest_flat: per leaf of ``tail_vars["params"]`` with genes, their flat
        positions.
      tail_vars: the variables of ``tail``.
      layer: (static) the earliest layer holding genes, whose cached input
        and output :func:`tail_logits` takes.
      rest_leaves: (static) those leaves' positions in ``tail_vars``.
      tail: (static) the model after the earliest layer (``low_rank``) or
        from it on (it then re-runs that layer's matmul on ``h``).
      low_rank: (static) which form.
    """

    first_genes: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    w0: np.ndarray
    rest_genes: np.ndarray
    rest_flat: tuple
    tail_vars: dict
    layer: str = struct.field(pytree_node=False)
    rest_leaves: tuple = struct.field(pytree_node=False)
    tail: models_base.Model = struct.field(pytree_node=False)
    low_rank: bool = struct.field(pytree_node=False)

    @property
    def rest_idx(self) -> masks.Indices:
        return masks.Indices(self.rest_leaves, tuple(self.rest_flat),
                             int(sum(f.size for f in self.rest_flat)))


def tail_setup(model: models_base.Model, variables: dict, mask, layers,
               low_rank: bool | None = None) -> TailSetup:
    """The host part of :func:`tail_logits` over the entries of ``mask``
    (kernel entries of the Dense layers ``layers`` of a sequential model).
    The candidate's order is ``masks.indices_of(mask)``; the earliest layer
    holding genes is the one whose input and output are cached.
    ``low_rank``: the form (None: low rank when that layer holds fewer
    genes than :data:`LOW_RANK_MAX_FRACTION` times its input width; both
    forms give the same logits up to rounding).

    Raises:
      ValueError: ``mask`` selects nothing.
      AssertionError: the tail's gene order differs from the model's (a bug).
    """
    params = variables["params"]
    g_idx = masks.indices_of(mask)
    if g_idx.size == 0:
        raise ValueError("tail_setup: the mask selects no kernel entry")
    genes_layer, rows, cols = masks.gene_coords(params, layers, g_idx)
    w0 = np.asarray(masks.gather(params, g_idx), np.float32)
    names = [s.name for s in model.layers]
    first = min({layers[i] for i in genes_layer}, key=names.index)
    at = names.index(first)
    is_first = np.asarray([layers[i] == first for i in genes_layer], bool)
    if low_rank is None:
        d = np.shape(models_base.get_layer_params(params, first)["kernel"])[0]
        low_rank = bool(is_first.sum() < LOW_RANK_MAX_FRACTION * d)
    rest_mask = jax.tree_util.tree_map(np.asarray, mask)
    if low_rank:  # ``first``'s genes enter as the low-rank term
        rest_mask = models_base.set_layer_params(
            rest_mask, first, jax.tree_util.tree_map(
                np.zeros_like, models_base.get_layer_params(rest_mask, first)))
        cut = first
    else:         # the tail re-runs ``first`` (the whole model if it is first)
        cut = names[at - 1] if at else None
    if cut is None:
        tail, tail_vars = model, variables
    else:
        _, tail = models_base.split_at(model, cut, variables)
        _, tail_vars = models_base.split_variables_at(model, cut, variables)
    is_rest = ~is_first if low_rank else np.ones_like(is_first)
    rest_idx = masks.indices_of(models_base.split_variables(
        {"params": rest_mask}, [s.name for s in tail.layers])
        .get("params", {}))
    g_rest = masks.indices_of(rest_mask)
    if (rest_idx.size != g_rest.size or len(rest_idx.flat) != len(g_rest.flat)
            or not all(np.array_equal(a, b)
                       for a, b in zip(rest_idx.flat, g_rest.flat))):
        raise AssertionError("_fitness.tail_setup: tail and model gene "
                             "orders differ")
    sel = np.flatnonzero(~is_rest).astype(np.int32)
    return TailSetup(
        first_genes=sel, rows=rows[sel], cols=cols[sel], w0=w0[sel],
        rest_genes=np.flatnonzero(is_rest).astype(np.int32),
        rest_flat=tuple(rest_idx.flat), tail_vars=tail_vars, layer=first,
        rest_leaves=tuple(rest_idx.leaves), tail=tail, low_rank=low_rank)


def tail_logits(setup: TailSetup, h, out):
    """``v (k,) -> (N, C)`` logits of the model with the entries of
    :func:`tail_setup` set to ``v``, from the cached input ``h`` (N, d) and
    output ``out`` (N, units; unused unless ``setup.low_rank``) of
    ``setup.layer``. Traceable, vmappable."""
    rest_idx = setup.rest_idx
    g2 = jnp.asarray(setup.rest_genes)
    if setup.low_rank:
        onehot = jax.nn.one_hot(jnp.asarray(setup.cols), out.shape[1],
                                dtype=jnp.float32)
        hs = jnp.asarray(h)[:, jnp.asarray(setup.rows)]
        base_in = jnp.asarray(out)
        w0 = jnp.asarray(setup.w0)
        g1 = jnp.asarray(setup.first_genes)
    else:
        base_in = jnp.asarray(h)

    def logits(v):
        o = base_in
        if setup.low_rank:
            o = o + hs @ ((v[g1] - w0)[:, None] * onehot)
        tv = setup.tail_vars
        if rest_idx.size:
            tv = masks.scatter_variables(tv, rest_idx, v[g2])
        return setup.tail.apply(tv, o).astype(jnp.float32)

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
