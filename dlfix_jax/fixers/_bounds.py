"""Bound propagation over a sequential piece of a model: interval bounds
(IBP) and backward CROWN linear bounds.

Given a box ``lo <= x <= hi`` over the input of a tuple of
:class:`~dlfix_jax.models.layers.LayerSpec` (a whole sequential model, or
the tail of :func:`~dlfix_jax.models.base.split_at`), every function here
returns bounds valid for **every** point of the box, in inference mode
(BatchNorm with its running statistics, dropout off):

* :func:`interval_bounds` — interval bound propagation (IBP): affine
  layers map the box's centre and ``|A|`` its radius; ReLU and max pooling
  are monotone;
* :func:`crown` — backward CROWN (Zhang et al., "Efficient Neural Network
  Robustness Certification with General Activation Functions", NeurIPS
  2018; auto_LiRPA's ``method="backward"``): linear lower and upper bounds
  ``lA·x + lbias <= C·f(x) <= uA·x + ubias`` over the box, for a
  specification matrix ``C`` (default: the identity over the outputs), and
  their values concretised at the box. Every ReLU is relaxed by the
  triangle: upper line through ``(l, 0)`` and ``(u, u)``, lower line
  ``a·z`` with slope ``a`` in ``{0, 1}`` chosen by the area heuristic
  (``a = 1`` iff ``u > -l``; auto_LiRPA's default "adaptive" rule) or fixed
  (``lower_slope="zero" | "one"``). The pre-activation bounds ``l, u`` of
  each ReLU come from CROWN over the layers before it, intersected with
  IBP (both are sound, so their intersection is; where IBP is exact, one
  affine layer over the box, only IBP runs).

Affine layers are handled generically: ``dense``, ``conv``, ``bn``,
``flatten``, ``dropout``, ``avgpool`` and ``gap``. The backward pass of an
affine layer ``f(x) = A x + f(0)`` is ``Λ ↦ Λ A`` (its VJP, exact because
the Jacobian is constant) and adds ``Λ·f(0)`` to the bias. ``maxpool`` is
supported by IBP only (CROWN raises ValueError: it would need a max
relaxation). Batched over a leading axis: every box in the batch has its
own bounds.

All functions are pure and traceable (``jit``/``vmap``); the layer specs
are static.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from dlfix_jax.models import base as models_base
from dlfix_jax.models import layers as layers_lib

AFFINE_KINDS = ("dense", "conv", "bn", "flatten", "dropout", "avgpool", "gap")
"""Layer kinds that are affine in inference mode."""
IBP_KINDS = AFFINE_KINDS + ("relu", "maxpool")
CROWN_KINDS = AFFINE_KINDS + ("relu",)
LOWER_SLOPES = ("adaptive", "zero", "one")

# Affine layers whose |A| is A itself (0/1 or averaging weights, no bias).
_NONNEG_KINDS = ("flatten", "dropout", "avgpool", "gap")


class LinearBounds(NamedTuple):
    """CROWN's result for a batch of B boxes and S specification rows.

    Attributes:
      lA, uA: (B, S, *input_shape) coefficients of the linear bounds.
      lbias, ubias: (B, S) their offsets.
      lower, upper: (B, S) the bounds concretised over the box.
    """

    lA: jax.Array
    lbias: jax.Array
    uA: jax.Array
    ubias: jax.Array
    lower: jax.Array
    upper: jax.Array


def unsupported(specs: Sequence[layers_lib.LayerSpec],
                kinds: Sequence[str] = CROWN_KINDS) -> list[str]:
    """Names (with kinds) of the layers of ``specs`` not in ``kinds``."""
    return [f"{s.name} ({s.kind})" for s in specs if s.kind not in kinds]


def _check(specs, kinds, who):
    bad = unsupported(specs, kinds)
    if bad:
        raise ValueError(f"{who} does not support layers {bad}; supported "
                         f"kinds: {', '.join(kinds)}")


def _layer_fn(s: layers_lib.LayerSpec, variables: dict):
    """``x -> layer(x)`` in inference mode for one spec (batched input)."""
    mod = layers_lib.Sequential((s,))
    v = models_base.split_variables(variables, [s.name])
    return lambda x: mod.apply(v, x, train=False)


def _abs_fn(s: layers_lib.LayerSpec, variables: dict):
    """``r -> |A| r`` for an affine layer (``A`` its linear part)."""
    if s.kind in _NONNEG_KINDS:
        return _layer_fn(s, variables)
    v = models_base.split_variables(variables, [s.name])

    def absify(col, tree):
        def leaf(path, a):
            name = str(getattr(path[-1], "key", path[-1]))
            if col == "params" and name in ("kernel", "scale"):
                return jnp.abs(a)
            if (col == "params" and name == "bias") or (
                    col == "batch_stats" and name == "mean"):
                return jnp.zeros_like(a)
            return a
        return jax.tree_util.tree_map_with_path(leaf, tree)

    v_abs = {col: absify(col, tree) for col, tree in v.items()}
    mod = layers_lib.Sequential((s,))
    return lambda r: mod.apply(v_abs, r, train=False)


def _ibp_layer(s, variables, lo, hi):
    if s.kind in ("relu", "maxpool"):
        f = _layer_fn(s, variables)
        return f(lo), f(hi)
    c, r = (lo + hi) / 2.0, (hi - lo) / 2.0
    yc = _layer_fn(s, variables)(c)
    yr = _abs_fn(s, variables)(r)
    return yc - yr, yc + yr


def interval_bounds(specs: Sequence[layers_lib.LayerSpec], variables: dict,
                    lo: jax.Array, hi: jax.Array):
    """IBP bounds ``(lower, upper)`` of the outputs of ``specs`` over the
    boxes ``[lo, hi]`` (B, *input_shape).

    Raises:
      ValueError: a layer kind IBP does not handle (see :data:`IBP_KINDS`).
    """
    _check(specs, IBP_KINDS, "interval_bounds")
    for s in specs:
        lo, hi = _ibp_layer(s, variables, lo, hi)
    return lo, hi


def _relax(l, u, lower_slope: str):
    """Triangle relaxation of ReLU on ``[l, u]``: upper ``au·z + bu``,
    lower ``al·z``."""
    unstable = (l < 0) & (u > 0)
    denom = jnp.where(unstable, u - l, 1.0)
    au = jnp.where(l >= 0, 1.0, jnp.where(unstable, u / denom, 0.0))
    bu = jnp.where(unstable, -au * l, 0.0)
    if lower_slope == "adaptive":
        slope = (u > -l).astype(l.dtype)
    elif lower_slope == "zero":
        slope = jnp.zeros_like(l)
    else:
        slope = jnp.ones_like(l)
    al = jnp.where(l >= 0, 1.0, jnp.where(unstable, slope, 0.0))
    return au, bu, al


def _sum_rest(a, start: int = 2):
    return jnp.sum(a, axis=tuple(range(start, a.ndim)))


def _affine_back(f, lam, in_shape):
    """``(Λ A, Λ·f(0))`` for an affine ``f`` and Λ (B, S, *out)."""
    b, s = lam.shape[:2]
    flat = lam.reshape((b * s,) + lam.shape[2:])
    y0, vjp = jax.vjp(f, jnp.zeros((b * s,) + tuple(in_shape), lam.dtype))
    (g,) = vjp(flat)
    bias = _sum_rest((flat * y0).reshape(lam.shape))
    return g.reshape((b, s) + tuple(in_shape)), bias


def _backward(specs, variables, shapes, pre, lam, lower_slope):
    """Backward CROWN of ``lam`` (B, S, *out) through ``specs`` with the
    ReLU input bounds ``pre[i] = (l, u)``; returns (lA, lbias, uA, ubias)."""
    lam_l, lam_u = lam, lam
    b_l = jnp.zeros(lam.shape[:2], lam.dtype)
    b_u = jnp.zeros(lam.shape[:2], lam.dtype)
    for i in reversed(range(len(specs))):
        s = specs[i]
        if s.kind == "relu":
            l, u = pre[i]
            au, bu, al = (t[:, None] for t in _relax(l, u, lower_slope))
            pos, neg = jnp.maximum(lam_l, 0.0), jnp.minimum(lam_l, 0.0)
            b_l = b_l + _sum_rest(neg * bu)
            lam_l = pos * al + neg * au
            pos, neg = jnp.maximum(lam_u, 0.0), jnp.minimum(lam_u, 0.0)
            b_u = b_u + _sum_rest(pos * bu)
            lam_u = pos * au + neg * al
        else:
            f = _layer_fn(s, variables)
            lam_l, db = _affine_back(f, lam_l, shapes[i])
            b_l = b_l + db
            lam_u, db = _affine_back(f, lam_u, shapes[i])
            b_u = b_u + db
    return lam_l, b_l, lam_u, b_u


def _concretise(lA, lbias, uA, ubias, lo, hi):
    c = ((lo + hi) / 2.0)[:, None]
    r = ((hi - lo) / 2.0)[:, None]
    lower = _sum_rest(lA * c) - _sum_rest(jnp.abs(lA) * r) + lbias
    upper = _sum_rest(uA * c) + _sum_rest(jnp.abs(uA) * r) + ubias
    return lower, upper


def _identity_spec(b, out_shape, dtype):
    n = 1
    for d in out_shape:
        n *= int(d)
    eye = jnp.eye(n, dtype=dtype).reshape((n,) + tuple(out_shape))
    return jnp.broadcast_to(eye, (b, n) + tuple(out_shape))


def _one_affine(specs) -> bool:
    """IBP is exact over a box through at most one affine layer (plus
    reshapes/identities)."""
    return sum(s.kind not in ("flatten", "dropout") for s in specs) <= 1


def input_shapes(specs, variables, in_shape) -> list[tuple[int, ...]]:
    """Per-example input shape of every layer of ``specs`` (and, last, the
    output shape)."""
    shapes = [tuple(in_shape)]
    x = jax.ShapeDtypeStruct((1,) + tuple(in_shape), jnp.float32)
    for s in specs:
        x = jax.eval_shape(_layer_fn(s, variables), x)
        shapes.append(tuple(x.shape[1:]))
    return shapes


def crown(specs: Sequence[layers_lib.LayerSpec], variables: dict,
          lo: jax.Array, hi: jax.Array, c: jax.Array | None = None, *,
          lower_slope: str = "adaptive") -> LinearBounds:
    """Backward CROWN bounds of ``C·f(x)`` over the boxes ``[lo, hi]``.

    Args:
      specs: the layers of ``f`` (kinds in :data:`CROWN_KINDS`).
      variables: their variables (``{"params": {name: ...}, ...}``).
      lo, hi: (B, *input_shape) the boxes (``lo <= hi``).
      c: (B, S, *output_shape) specification rows, or None for the identity
        over the outputs (then S = the number of outputs).
      lower_slope: the ReLU lower line's slope rule: "adaptive" (area
        heuristic), "zero" or "one".

    Returns:
      :class:`LinearBounds`.

    Raises:
      ValueError: an unsupported layer kind or slope rule.
    """
    specs = tuple(specs)
    _check(specs, CROWN_KINDS, "crown")
    if lower_slope not in LOWER_SLOPES:
        raise ValueError(f"lower_slope={lower_slope!r} is not one of "
                         f"{LOWER_SLOPES}")
    shapes = input_shapes(specs, variables, lo.shape[1:])
    b = lo.shape[0]
    pre = {}
    ibp_lo, ibp_hi = lo, hi
    for i, s in enumerate(specs):
        if s.kind == "relu":
            l, u = ibp_lo, ibp_hi
            if not _one_affine(specs[:i]):
                eye = _identity_spec(b, shapes[i], lo.dtype)
                prefix = _backward(specs[:i], variables, shapes, pre, eye,
                                   lower_slope)
                cl, cu = _concretise(*prefix, lo, hi)
                l = jnp.maximum(l, cl.reshape(l.shape))
                u = jnp.minimum(u, cu.reshape(u.shape))
            pre[i] = (l, u)
            ibp_lo, ibp_hi = jnp.maximum(l, 0.0), jnp.maximum(u, 0.0)
        else:
            ibp_lo, ibp_hi = _ibp_layer(s, variables, ibp_lo, ibp_hi)
    if c is None:
        c = _identity_spec(b, shapes[-1], lo.dtype)
    lA, lb, uA, ub = _backward(specs, variables, shapes, pre,
                               jnp.asarray(c, lo.dtype), lower_slope)
    lower, upper = _concretise(lA, lb, uA, ub, lo, hi)
    return LinearBounds(lA, lb, uA, ub, lower, upper)


def evaluate(lA: jax.Array, bias: jax.Array, x: jax.Array) -> jax.Array:
    """The linear bound ``A·x + bias`` (B, S) at points ``x`` (B, *in)."""
    return _sum_rest(lA * x[:, None]) + bias
