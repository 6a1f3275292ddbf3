"""Boolean mask pytrees over parameters: selection, gather/scatter, optax.

Every layer- and neuron-level fixer changes only a declared part of the
parameters. This module is the one place that says which part: a **mask** is
a pytree with the structure of ``params`` whose leaves are either

* bool arrays shaped like the matching parameter (an *element mask*), or
* Python bools (a *leaf mask*: the whole leaf is in or out).

Constructors follow the addressing scheme of :mod:`dlfix_jax.models.base`:
a layer is a ``/``-path (``"dense3"``), a neuron is ``(layer, unit)`` (Dense
column ``j`` with ``bias[j]``; Conv output channel ``j`` with ``bias[j]``),
a weight is ``(layer, kernel index tuple)``.

Every write goes through one ``jnp.where`` select (or a ``.at[].set`` on the
selected positions only), so unselected parameters stay bit-for-bit equal.
``optax.masked`` alone is *not* a freeze: it passes the raw update through
for unmasked leaves, and it rejects element masks; :func:`restrict` /
:func:`zero_outside` below give exact zeros outside an element mask.

Everything over arrays is jit-compatible with static shapes; the only
host-side function is :func:`indices_of`, which turns a concrete mask into
static integer positions (``k`` known before tracing).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dlfix_jax.models import base as models_base

Mask = Any  # pytree of bool arrays / Python bools matching params


def _is_bool_leaf(x) -> bool:
    return isinstance(x, (bool, np.bool_))


def _tree_map(fn, mask, *rest):
    """tree_map over a mask whose leaves may be Python bools."""
    return jax.tree_util.tree_map(fn, mask, *rest, is_leaf=_is_bool_leaf)


# ---------------------------------------------------------------------------
# Constructors
# ---------------------------------------------------------------------------

def empty_mask(params) -> Mask:
    """An element mask selecting nothing (all-False arrays)."""
    return jax.tree_util.tree_map(lambda p: np.zeros(np.shape(p), bool), params)


def full_mask(params) -> Mask:
    """An element mask selecting every parameter."""
    return jax.tree_util.tree_map(lambda p: np.ones(np.shape(p), bool), params)


def _with_layer(params, layer: str, fn) -> Mask:
    """empty mask except the leaves of ``layer``, set to ``fn(name, leaf)``."""
    lp = models_base.get_layer_params(params, layer)  # clear KeyError
    sub = {k: fn(k, v) for k, v in lp.items()}
    return models_base.set_layer_params(empty_mask(params), layer, sub)


def layer_mask(params, layer: str) -> Mask:
    """Selects every parameter (kernel, bias, ...) of ``layer``."""
    return _with_layer(params, layer, lambda k, v: np.ones(np.shape(v), bool))


def unit_mask(params, layer: str, units: Sequence[int]) -> Mask:
    """Selects neurons of ``layer``: ``kernel[..., j]`` and ``bias[j]``.

    For a Dense layer unit ``j`` is output column ``j``; for a Conv layer it is
    output channel ``j``. Other leaves of the layer (none for Dense/Conv) are
    selected along their last axis too.

    Raises:
      ValueError: a unit index is outside ``[0, features)``.
    """
    units = np.asarray(units, np.int64).reshape(-1)

    def fn(name, v):
        shape = np.shape(v)
        n = shape[-1]
        if units.size and (units.min() < 0 or units.max() >= n):
            raise ValueError(f"unit indices {units.tolist()} out of range for "
                             f"{layer}/{name} with {n} units")
        m = np.zeros(shape, bool)
        m[..., units] = True
        return m

    return _with_layer(params, layer, fn)


def weight_mask(params, layer: str, indices) -> Mask:
    """Selects individual kernel entries of ``layer``.

    Args:
      params: the parameter tree.
      layer: layer name.
      indices: (k, kernel.ndim) integer array (or a list of index tuples);
        row ``r`` addresses ``kernel[tuple(indices[r])]``.

    Raises:
      ValueError: the indices have the wrong rank or are out of range.
    """
    kernel = models_base.get_layer_params(params, layer)["kernel"]
    shape = np.shape(kernel)
    idx = np.asarray(indices, np.int64)
    if idx.size == 0:
        idx = np.zeros((0, len(shape)), np.int64)
    if idx.ndim != 2 or idx.shape[1] != len(shape):
        raise ValueError(f"weight indices must have {len(shape)} columns for "
                         f"{layer}/kernel of shape {shape}, got {idx.shape}")
    if idx.size and (np.any(idx < 0) or np.any(idx >= np.array(shape))):
        raise ValueError(f"weight indices out of range for {layer}/kernel "
                         f"of shape {shape}")

    def fn(name, v):
        m = np.zeros(np.shape(v), bool)
        if name == "kernel" and idx.size:
            m[tuple(idx.T)] = True
        return m

    return _with_layer(params, layer, fn)


def kernel_entries_mask(params, layers: Sequence[str], lay, idx) -> Mask:
    """The mask of kernel entries ``idx[j]`` = (row, col) of Dense kernel
    ``layers[lay[j]]`` (entries of several layers at once)."""
    lay, idx = np.asarray(lay), np.asarray(idx)
    mask = empty_mask(params)
    for i, name in enumerate(layers):
        sel = lay == i
        if np.any(sel):
            mask = mask_or(mask, weight_mask(params, name, idx[sel]))
    return mask


def per_gene(params, layers: Sequence[str], fn, idx: "Indices") -> np.ndarray:
    """A (k,) host vector in ``idx`` order whose entries for layer ``l``'s
    kernel are ``fn(l, i, kernel)`` (an array shaped like the kernel)."""
    tree = jax.tree_util.tree_map(lambda p: np.zeros(np.shape(p), np.float32),
                                  params)
    for i, name in enumerate(layers):
        lp = dict(models_base.get_layer_params(tree, name))
        k = np.asarray(models_base.get_layer_params(params, name)["kernel"])
        lp["kernel"] = np.asarray(fn(name, i, k), np.float32)
        tree = models_base.set_layer_params(tree, name, lp)
    return np.asarray(gather(tree, idx))


def gene_coords(params, layers: Sequence[str], idx: "Indices"):
    """``(lay, rows, cols)``: int32 (k,) host vectors in ``idx`` order, the
    position in ``layers`` and the (row, col) kernel entry of every gene."""
    def coord(fn):
        return per_gene(params, layers, fn, idx).astype(np.int32)
    return (coord(lambda n, i, k: np.full(k.shape, i)),
            coord(lambda n, i, k: np.indices(k.shape)[0]),
            coord(lambda n, i, k: np.indices(k.shape)[1]))


def to_element_mask(mask: Mask, params) -> Mask:
    """Expands leaf-level (Python bool) entries into bool arrays."""
    return _tree_map(
        lambda m, p: np.full(np.shape(p), bool(m)) if _is_bool_leaf(m) else m,
        mask, params)


# ---------------------------------------------------------------------------
# Algebra
# ---------------------------------------------------------------------------

def _binop(op, a: Mask, b: Mask) -> Mask:
    def f(x, y):
        if _is_bool_leaf(x) and _is_bool_leaf(y):
            return bool(op(bool(x), bool(y)))
        return op(x, y)
    return _tree_map(f, a, b)


def mask_or(a: Mask, b: Mask) -> Mask:
    """Union of two masks of the same structure."""
    return _binop(lambda x, y: x | y, a, b)


def mask_and(a: Mask, b: Mask) -> Mask:
    """Intersection of two masks of the same structure."""
    return _binop(lambda x, y: x & y, a, b)


def mask_not(a: Mask) -> Mask:
    """Complement of a mask."""
    return _tree_map(lambda x: (not bool(x)) if _is_bool_leaf(x) else ~x, a)


def count(mask: Mask, params=None) -> int:
    """Number of selected parameters (leaf-level entries need ``params``)."""
    total = 0
    leaves = jax.tree_util.tree_leaves(mask, is_leaf=_is_bool_leaf)
    pleaves = (jax.tree_util.tree_leaves(params) if params is not None
               else [None] * len(leaves))
    for m, p in zip(leaves, pleaves):
        if _is_bool_leaf(m):
            if m and p is None:
                raise ValueError("count of a leaf-level mask needs params")
            total += int(np.size(p)) if m else 0
        else:
            total += int(np.sum(np.asarray(m)))
    return total


# ---------------------------------------------------------------------------
# Static indices, gather / scatter
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Indices:
    """Static positions of a mask's selected entries (host data).

    Attributes:
      leaves: positions (in ``tree_leaves`` order) of leaves with selections.
      flat: per selected leaf, the flat (C-order) positions selected.
      size: total number of selected entries ``k``.
    """

    leaves: tuple[int, ...]
    flat: tuple[np.ndarray, ...]
    size: int

    def __len__(self) -> int:
        return self.size


def indices_of(mask: Mask, params=None) -> Indices:
    """Static positions of the selected entries of a concrete mask.

    Computed on the host (outside jit), so ``k`` is a Python int and gather /
    scatter have static shapes. Order: leaves in ``tree_leaves`` order, then
    C order within each leaf.
    """
    if params is not None:
        mask = to_element_mask(mask, params)
    leaves = jax.tree_util.tree_leaves(mask, is_leaf=_is_bool_leaf)
    sel, flat = [], []
    for i, m in enumerate(leaves):
        if _is_bool_leaf(m):
            raise ValueError("indices_of needs an element mask; pass params to "
                             "expand leaf-level entries")
        pos = np.flatnonzero(np.asarray(m))
        if pos.size:
            sel.append(i)
            flat.append(pos.astype(np.int32))
    return Indices(tuple(sel), tuple(flat), int(sum(f.size for f in flat)))


def gather(params, idx: Indices) -> jax.Array:
    """The selected values as a flat ``(k,)`` vector."""
    leaves = jax.tree_util.tree_leaves(params)
    parts = [jnp.ravel(leaves[l])[f] for l, f in zip(idx.leaves, idx.flat)]
    if not parts:
        return jnp.zeros((0,), jnp.float32)
    return jnp.concatenate(parts)


def scatter(params, idx: Indices, vec: jax.Array):
    """``params`` with the selected entries replaced by ``vec`` (k,).

    Only the selected positions are written (``.at[].set``); every other
    entry is the original, bit for bit.
    """
    vec = jnp.asarray(vec)
    if vec.shape != (idx.size,):
        raise ValueError(f"scatter expects a vector of shape ({idx.size},), "
                         f"got {vec.shape}")
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = list(leaves)
    off = 0
    for l, f in zip(idx.leaves, idx.flat):
        leaf = leaves[l]
        n = f.size
        new = jnp.ravel(leaf).at[f].set(vec[off:off + n].astype(leaf.dtype))
        leaves[l] = new.reshape(jnp.shape(leaf))
        off += n
    return jax.tree_util.tree_unflatten(treedef, leaves)


def scatter_variables(variables, idx: Indices, vec: jax.Array):
    """A Flax variable dict with :func:`scatter` applied to its ``"params"``
    (its other collections, e.g. ``batch_stats``, shared as they are)."""
    out = dict(variables)
    out["params"] = scatter(variables["params"], idx, vec)
    return out


# ---------------------------------------------------------------------------
# Masked writes
# ---------------------------------------------------------------------------

def select(mask: Mask, new, old):
    """``new`` where the mask is set, ``old`` elsewhere (one ``jnp.where``)."""
    def f(m, n, o):
        if _is_bool_leaf(m):
            return n if m else o
        return jnp.where(m, n, o)
    return _tree_map(f, mask, new, old)


def apply_delta(params, delta, mask: Mask):
    """``params + delta`` on the mask, ``params`` (unchanged) elsewhere."""
    return select(mask, jax.tree_util.tree_map(jnp.add, params, delta), params)


def apply_updates(params, updates, mask: Mask):
    """``optax.apply_updates`` on the mask only; elsewhere ``params`` itself.

    ``p + 0.0`` already equals ``p`` except for ``p == -0.0`` (which becomes
    ``+0.0``); the select makes unselected entries exact in every case.
    """
    return select(mask, optax.apply_updates(params, updates), params)


def zero_outside(mask: Mask) -> optax.GradientTransformation:
    """An optax transform that zeroes every update outside ``mask`` exactly.

    Works with element masks (which ``optax.masked`` rejects). The mask must
    be static (a concrete pytree) for jit.
    """
    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        zeros = jax.tree_util.tree_map(jnp.zeros_like, updates)
        return select(mask, updates, zeros), state

    return optax.GradientTransformation(init_fn, update_fn)


def restrict(tx: optax.GradientTransformation, mask: Mask
             ) -> optax.GradientTransformation:
    """``tx`` restricted to ``mask``: unselected parameters never move.

    Gradients are zeroed outside the mask before ``tx`` (so its state only
    sees selected gradients) and its updates are zeroed outside the mask
    afterwards (so weight decay and similar terms cannot leak), i.e.
    ``optax.apply_updates`` adds exactly 0.0 to every unselected entry. That
    is bit-for-bit except for a ``-0.0`` parameter, which IEEE addition turns
    into ``+0.0``; use :func:`apply_updates` (a select) for exact bits.
    """
    return optax.chain(zero_outside(mask), tx, zero_outside(mask))


__all__ = ["Indices", "Mask", "apply_delta", "apply_updates", "count", "empty_mask",
           "full_mask", "gather", "indices_of", "layer_mask", "mask_and",
           "mask_not", "mask_or", "restrict", "scatter", "select",
           "to_element_mask", "unit_mask", "weight_mask", "zero_outside"]
