"""Linear (and mixed-integer) programs over one layer's parameter change.

Shared by the layer-level fixers (RA, 3M):

* :func:`decoupled_map` — PRDNN's decoupled network around layer ℓ of a
  sequential piecewise-linear model: the activation pattern is frozen at the
  original network's values on each point, so the logits are affine in the
  change Δ of layer ℓ's parameters (exactly, computed with ``jax.jvp``);
* :func:`delta_jacobian` — the (points, classes, |Δ|) Jacobian of that map
  in batches (``jax.jacrev``, exact since the map is linear), with Δ
  flattened by ``jax.flatten_util.ravel_pytree``;
* :func:`margin_rows` — rows ``M, r`` of ``M·Δ ≥ r`` asking that the
  correct class beat every other by a margin on every point;
* :func:`solve_lp` — minimise ‖Δ‖₁ or ‖Δ‖∞ subject to those rows with HiGHS
  (``scipy.optimize.linprog``);
* :func:`solve_milp` — ``scipy.optimize.milp`` (HiGHS branch and bound)
  for problems with integer variables (3M's ReLU encodings);
* :data:`LP_STATUS` — names of scipy's status codes (``info`` holds codes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import scipy.sparse
from jax.flatten_util import ravel_pytree

from dlfix_jax.models import base as models_base
from dlfix_jax.models import layers as layers_lib

LP_STATUS = ("optimal", "iteration or time limit", "infeasible", "unbounded",
             "numerical difficulties")
"""scipy ``linprog``/``milp`` status codes 0-4 (HiGHS)."""


def decoupled_map(model, layer_index: int):
    """Builds the decoupled network's pieces for layer ``layer_index``.

    Returns ``(layer_in, lin)`` where ``layer_in(variables, x)`` is the
    (unchanged) input of the layer and ``lin(variables, a, delta)`` is the
    change of the logits of one point with layer input ``a`` (no batch axis)
    when the layer's parameters change by ``delta`` ({"kernel": ...,
    "bias": ...}), under the original network's activation pattern at that
    point. ``lin`` is linear in ``delta``. The variables are arguments, so
    one compilation serves every model of the architecture.
    """
    specs = model.layers
    s = specs[layer_index]
    name = s.name
    layer_mod = layers_lib.Sequential((s,))
    tail_specs = tuple(specs[layer_index + 1:])
    tail_mod = layers_lib.Sequential(tail_specs)
    tail_names = [t.name for t in tail_specs]

    def layer_in(variables, x):
        _, acts = model.apply(variables, x, capture=(name,))
        return acts[name]["input"]

    def lin(variables, a, delta):
        tail_vars = models_base.split_variables(variables, tail_names)
        layer_vars = models_base.split_variables(variables, [name])

        def tail(z):
            if not tail_specs:
                return z
            return tail_mod.apply(tail_vars, z, train=False)

        a = a[None]
        z0 = layer_mod.apply(layer_vars, a, train=False)
        dz = layer_mod.apply({"params": {name: delta}}, a, train=False)
        # dz is linear in delta (kernel and bias both enter linearly); the
        # tail's JVP at the original z0 applies the frozen activation pattern.
        _, dlogits = jax.jvp(tail, (z0,), (dz,))
        return dlogits[0]

    return layer_in, lin


@functools.lru_cache(maxsize=None)
def delta_jacobian_fns(model, layer_index: int):
    """``(in_fn, jac_fn, unravel, nv)`` for layer ``layer_index``, cached per
    architecture: ``in_fn(variables, x)`` the layer inputs of a batch,
    ``jac_fn(variables, a, zero)`` the (B, C, nv) Jacobian of the logit
    change w.r.t. the flat Δ, ``unravel(flat)`` the Δ dict, ``nv = |Δ|``."""
    name = model.layers[layer_index].name
    lparams = models_base.get_layer_params(
        model.abstract_variables()["params"], name)
    delta0 = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype),
                                    dict(lparams))
    flat0, unravel = ravel_pytree(delta0)
    layer_in, lin = decoupled_map(model, layer_index)

    def lin_flat(variables, a, flat):
        return lin(variables, a, unravel(flat))

    jac_fn = jax.jit(jax.vmap(jax.jacrev(lin_flat, argnums=2),
                              in_axes=(None, 0, None)))
    return jax.jit(layer_in), jac_fn, unravel, int(flat0.size)


def margin_rows(jac, logits, y, margin, num_classes, return_points=False):
    """Rows M, rhs r of M·Δ ≥ r for every (point, class j ≠ y):
    ``logit_y(Δ) − logit_j(Δ) ≥ margin``. With ``return_points`` also the
    index (into ``y``) of each row's point."""
    rows, rhs, pts = [], [], []
    for j in range(num_classes):
        keep = y != j
        if not np.any(keep):
            continue
        idx = np.nonzero(keep)[0]
        m = jac[idx, y[idx], :] - jac[idx, j, :]
        rows.append(m)
        rhs.append(margin - (logits[idx, y[idx]] - logits[idx, j]))
        pts.append(idx)
    if return_points:
        return np.concatenate(rows), np.concatenate(rhs), np.concatenate(pts)
    return np.concatenate(rows), np.concatenate(rhs)


def solve_lp(m, r: np.ndarray, norm: str, max_abs=None, time_limit=None):
    """Minimises ‖Δ‖ (l1 or linf) s.t. m·Δ ≥ r (m dense or scipy sparse);
    returns (Δ, result). ``max_abs``: optional bound |Δ_i| ≤ max_abs;
    ``time_limit``: optional HiGHS time limit (s; status 1 when hit)."""
    nc, nv = m.shape
    ms = scipy.sparse.csr_matrix(m)
    hi = None if max_abs is None else float(max_abs)
    options = {} if time_limit is None else {"time_limit": float(time_limit)}
    if norm == "l1":
        # Δ = u − v, u, v ≥ 0:  −m·u + m·v ≤ −r.
        a_ub = scipy.sparse.hstack([-ms, ms], format="csr")
        c = np.ones(2 * nv)
        res = scipy.optimize.linprog(c, A_ub=a_ub, b_ub=-r, bounds=(0, hi),
                                     method="highs", options=options)
        delta = None if res.x is None else res.x[:nv] - res.x[nv:]
    elif norm == "linf":
        # variables (Δ, t): −m·Δ ≤ −r;  Δ − t ≤ 0;  −Δ − t ≤ 0.
        eye = scipy.sparse.identity(nv, format="csr")
        one = scipy.sparse.csr_matrix(np.ones((nv, 1)))
        a_ub = scipy.sparse.vstack([
            scipy.sparse.hstack([-ms, scipy.sparse.csr_matrix((nc, 1))]),
            scipy.sparse.hstack([eye, -one]),
            scipy.sparse.hstack([-eye, -one])], format="csr")
        b_ub = np.concatenate([-r, np.zeros(2 * nv)])
        c = np.zeros(nv + 1)
        c[-1] = 1.0
        bounds = [(None, None)] * nv + [(0, hi)]
        res = scipy.optimize.linprog(c, A_ub=a_ub, b_ub=b_ub, bounds=bounds,
                                     method="highs", options=options)
        delta = None if res.x is None else res.x[:nv]
    else:
        raise ValueError(f"unknown norm {norm!r}; use 'l1' or 'linf'")
    return delta, res


def solve_milp(c, constraints, integrality, bounds=None, time_limit=None):
    """``scipy.optimize.milp`` with HiGHS and an optional time limit (s);
    returns the scipy result (``status`` indexes :data:`LP_STATUS`)."""
    options = {}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    return scipy.optimize.milp(c, constraints=constraints,
                               integrality=integrality, bounds=bounds,
                               options=options)


def constrained_points(key, problem, num_passing: int):
    """The points of a pointwise layer repair (RA, 3M): every failing repair
    input, then ``num_passing`` passing ones (-1: all; else a sorted sample
    without replacement drawn with ``key``, the only use of the key).

    Returns:
      ``(x, y, k)``: inputs (device), labels (int64, host) and the number of
      passing points taken.
    """
    n_passing_all = len(problem.passing)
    k = int(num_passing)
    k = n_passing_all if k < 0 else min(k, n_passing_all)
    if 0 < k < n_passing_all:
        sel = np.sort(np.asarray(jax.random.choice(key, n_passing_all, (k,),
                                                   replace=False)))
    else:
        sel = np.arange(k)
    x = jnp.concatenate([problem.failing.x, problem.passing.x[sel]])
    y = np.concatenate([np.asarray(problem.failing.y),
                        np.asarray(problem.passing.y)[sel]]).astype(np.int64)
    return x, y, k


def piecewise_linear_reason(model, needs: str) -> str | None:
    """Why ``model`` is not a sequential piecewise-linear model with a Dense
    layer (RA's and 3M's precondition), or None. ``needs`` names what needs
    it, for the message."""
    if getattr(model, "layers", None) is None:
        return (f"model {model.name!r} is not sequential: {needs} a "
                "sequential piecewise-linear model")
    bad = sorted({s.kind for s in model.layers
                  if s.kind not in layers_lib.PIECEWISE_LINEAR_KINDS})
    if bad:
        return f"model {model.name!r} has non-piecewise-linear layers {bad}"
    if not any(s.kind == "dense" for s in model.layers):
        return f"model {model.name!r} has no Dense layer to modify"
    return None


def layer_index(model, name: str, kinds, who: str,
                allowed: str = "", verb: str = "modified") -> int:
    """Index of the layer ``name`` ("": the last Dense layer) that ``who``
    modifies; raises ValueError when it is missing or not of ``kinds``
    (``allowed`` names them in the message)."""
    names = [s.name for s in model.layers]
    if not name:
        return [i for i, s in enumerate(model.layers) if s.kind == "dense"][-1]
    if name not in names:
        raise ValueError(f"{who}: no layer {name!r} in model {model.name!r}; "
                         f"layers: {names}")
    i = names.index(name)
    if model.layers[i].kind not in kinds:
        raise ValueError(f"{who}: layer {name!r} is a {model.layers[i].kind!r}"
                         f"; only {allowed or tuple(kinds)} layers can be "
                         f"{verb}")
    return i


def solve_lp_rows(m, r: np.ndarray, norm: str, groups=None,
                  penalty: float = 0.0, initial=None, tol: float = 1e-7,
                  max_rounds: int = 100, method: str = "highs"):
    """Minimises ‖Δ‖ (l1 or linf) + ``penalty``·Σ s_g subject to
    ``m_i·Δ + s_{g(i)} ≥ r_i`` for every row i, by constraint generation.

    Soft rows: ``groups`` (int per row, or None) names row i's slack
    variable s_g ≥ 0 (one per group, e.g. per point); -1 marks a hard row
    (no slack). ``penalty``: a scalar or one price per group, all > 0 when
    any row is soft; at the optimum
    each ``s_g`` is then exactly the largest violation ``max(0, r_i − m_i·Δ)``
    over its rows.

    Constraint generation (exact): the LP is solved over the rows of
    ``initial`` (bool per row; None: every row, one plain solve); every row
    violated by more than ``tol`` by that solution is added and the LP solved
    again, until none is. The last solution then satisfies every row (to
    ``tol``) and is optimal for the full LP, since the restricted LP's
    optimum can only be lower. (Another optimal vertex than one full solve
    would return is possible when the optimum is not unique.)

    Returns ``(delta, slack, res, stats)``: Δ (None when not solved), the
    slacks (``(n_groups,)``, zeros when no row is soft), the last scipy
    result (``status`` indexes :data:`LP_STATUS`) and ``stats`` with
    ``rounds`` (LPs solved), ``rows`` (rows in the last LP) and
    ``max_violation`` (over all rows, of the returned solution).
    """
    ms = scipy.sparse.csr_matrix(m)
    nc, nv = ms.shape
    r = np.asarray(r, np.float64)
    if norm not in ("l1", "linf"):
        raise ValueError(f"unknown norm {norm!r}; use 'l1' or 'linf'")
    if groups is None:
        groups = np.full(nc, -1, np.int64)
    groups = np.asarray(groups, np.int64)
    if groups.shape != (nc,):
        raise ValueError(f"groups has shape {groups.shape}, expected ({nc},)")
    ng = int(groups.max()) + 1 if nc else 0
    pen = np.broadcast_to(np.asarray(penalty, np.float64), (ng,))
    if ng > 0 and not np.all(pen > 0):
        raise ValueError(f"soft rows need penalty > 0, got {penalty}")
    active = (np.ones(nc, bool) if initial is None
              else np.asarray(initial, bool).copy())
    soft = groups >= 0

    def slack_matrix(rows):
        g = groups[rows]
        k = np.nonzero(g >= 0)[0]
        return scipy.sparse.csr_matrix(
            (np.ones(len(k)), (k, g[k])), shape=(len(rows), ng))

    rounds = 0
    while True:
        rounds += 1
        rows = np.nonzero(active)[0]
        mr, rr = ms[rows], r[rows]
        s_mat = slack_matrix(rows)
        n_act = len(rows)
        if norm == "l1":
            # (u, v, s): Δ = u − v;  −m·u + m·v − S·s ≤ −r.
            a_ub = scipy.sparse.hstack([-mr, mr, -s_mat], format="csr")
            b_ub = -rr
            c = np.concatenate([np.ones(2 * nv), pen])
            bounds = (0, None)
        else:
            # (Δ, t, s): −m·Δ − S·s ≤ −r;  ±Δ − t ≤ 0.
            eye = scipy.sparse.identity(nv, format="csr")
            one = scipy.sparse.csr_matrix(np.ones((nv, 1)))
            zs = scipy.sparse.csr_matrix((nv, ng))
            a_ub = scipy.sparse.vstack([
                scipy.sparse.hstack([-mr, scipy.sparse.csr_matrix((n_act, 1)),
                                     -s_mat]),
                scipy.sparse.hstack([eye, -one, zs]),
                scipy.sparse.hstack([-eye, -one, zs])], format="csr")
            b_ub = np.concatenate([-rr, np.zeros(2 * nv)])
            c = np.concatenate([np.zeros(nv), [1.0], pen])
            bounds = [(None, None)] * nv + [(0, None)] * (1 + ng)
        res = scipy.optimize.linprog(c, A_ub=a_ub, b_ub=b_ub, bounds=bounds,
                                     method=method)
        if res.status != 0 or res.x is None:
            return None, np.zeros(ng), res, {"rounds": rounds,
                                             "rows": n_act,
                                             "max_violation": np.inf}
        if norm == "l1":
            delta = res.x[:nv] - res.x[nv:2 * nv]
            slack = res.x[2 * nv:]
        else:
            delta = res.x[:nv]
            slack = res.x[nv + 1:]
        viol = r - ms @ delta
        viol[soft] -= slack[groups[soft]]
        new = (~active) & (viol > tol)
        if not new.any() or rounds >= max_rounds:
            stats = {"rounds": rounds, "rows": n_act,
                     "max_violation": float(max(0.0, viol.max(initial=0.0)))}
            return delta, slack, res, stats
        active |= new


@functools.lru_cache(maxsize=None)
def layer_input_and_logits_fn(model, layer_index: int):
    """Jitted ``f(variables, x) -> (layer input, logits)`` for layer
    ``layer_index``: both from one forward pass (cached per architecture)."""
    name = model.layers[layer_index].name

    def f(variables, x):
        logits, acts = model.apply(variables, x, capture=(name,))
        return acts[name]["input"], logits

    return jax.jit(f)
