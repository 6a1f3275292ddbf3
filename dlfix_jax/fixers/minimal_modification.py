"""3M (layer level): minimal single-layer modification by LP / MILP.

Source: I. Refaeli and G. Katz, "Minimal Multi-Layer Modifications of Deep
Neural Networks", arXiv 2110.09929 (3M-DNN), built on the single-layer
queries of B. Goldberger, Y. Adi, J. Keshet and G. Katz, "Minimal
Modifications of Deep Neural Networks using Verification", LPAR 2020
(code: jjgold012/MinimalDNNModificationLpar2020@1c967db,
``NetworkCorrection/findCorrection.py``). Spec:
``../shared/reference/fixer_specs.md`` "## 3M".

**Single-layer query.** The inputs ``a_p`` of layer ℓ (a Dense layer) are
fixed at their original values on every constrained point p (layers before ℓ
are unchanged). The variables are the deltas Δ of layer ℓ's parameters;
minimise ``‖Δ‖∞`` (``norm="linf"``, the paper's objective; ``"l1"`` is the
original code's ``evaluateEpsilon`` variant, LP mode only) subject to
``logit_y(p) − logit_c(p) ≥ δ`` for every point p and every class c ≠ y_p.

* **Last Dense layer** (``layer=""``, the default): the logits are affine in
  Δ, so the query is an LP, solved with HiGHS
  (:func:`dlfix_jax.fixers._linear.solve_lp`; the original uses Gurobi). The
  constraint rows come from :func:`_linear.delta_jacobian_fns` /
  :func:`_linear.margin_rows` (shared with RA; for the last layer the
  "decoupled" map is the network itself, so the LP is exact).
* **Hidden Dense layer** (``layer="<name>"`` of a Dense layer followed only
  by Dense / ReLU / Flatten / Dropout layers): the downstream ReLUs are
  encoded exactly as a MILP (``scipy.optimize.milp``, HiGHS branch and
  bound, :func:`_linear.solve_milp`): per point, every downstream ReLU output
  is a variable ``h``; a ReLU whose pre-activation interval ``[l, u]`` is
  stable is an equality (``h = pre``) or ``h = 0``; an unstable one gets a
  binary d and the big-M constraints ``h ≥ pre, h ≥ 0, h ≤ pre − l(1−d),
  h ≤ u·d``. The intervals come from interval arithmetic in float64:
  layer ℓ's outputs lie in ``z0 ± ε_box(‖a_p‖₁ + 1)`` (``+1`` for the bias;
  0 with ``bias="fixed"``) and are propagated through the tail. The box
  ``ε_box`` is found **anytime**: first the same encoding with every binary
  fixed at the original network's activation pattern on the point (an LP,
  a restriction of the MILP whose every solution is exact for the real
  network) gives an incumbent Δ_pat; then ``ε_box = ‖Δ_pat‖∞`` (the
  optimum cannot be larger; ``epsilon_max`` when there is no incumbent) and
  the MILP with free binaries searches that box under the remaining time.
  The original instead binary-searches ε in ``[0, epsilon_max]`` to
  ``epsilon_interval`` (1e-4) with Marabou SAT queries
  (``findEpsilonInterval``); a MILP optimum is exact up to HiGHS's
  tolerances, so there is no ``epsilon_interval``. (RA's decoupled LP
  freezes the pattern only in the *linearisation*: its solution may flip
  downstream ReLUs and then needs a real-network check; fixing the pattern
  *as constraints* makes every solution a valid incumbent.)
* **Cost** (2 cores, measured): the MILP mode grows with fan-in × points.
  Middle Dense of a 784-32-16-10 MLP (528 parameters), 13 failing points:
  pattern LP incumbent in < 1 s, MILP improves it within 20 s (158
  binaries); LeNet5 ``dense2`` (10,164 parameters): 5 failing points only,
  pattern LP 7 s; with 100 passing points it does not finish in 40 s (the
  original is then returned, ``status`` "time limit"). The first Dense of
  an MLP on 784 pixels (25,120 parameters) does not finish the pattern LP
  in 60 s even for 9 points. HiGHS checks its time limit only now and then:
  overshoots of up to 50% were measured on these LPs. Use the hidden-layer
  mode with few points (``num_passing``) and small layers.

**Points.** Every failing repair input plus the passing repair inputs:
``num_passing = -1`` (default) all, ``n > 0`` a random sample of n drawn
with the key (the only use of the key), ``0`` none. The original corrects a
chosen set of inputs only (watermark images); the passing points are ours,
so that the fix keeps them correct (the study's NFR). The study's 3M left
MNIST and CIFAR10 unchanged (RR 0), consistent with an infeasible query
returning the original model.

**Infeasible point sets are reduced, not given up** (``reduce="elastic"``,
default; ``"none"`` gives up like the original): when the query is
infeasible within ``|Δ| ≤ epsilon_max``, an elastic (soft-constraint)
problem with one slack ``s_p ≥ 0`` per point (added to each of p's margin
rows) minimises ``Σ s_p`` in the same box; the points with ``s_p > 1e-9``
are dropped (Chinneck's elastic filter for a maximum feasible subsystem, one
pass) and the hard query is solved again on the rest, which is feasible by
construction (the elastic solution restricted to the kept points satisfies
them; a numerically infeasible re-solve is reported as infeasible). The
elastic objective is in logit units, so this keeps *many*, not provably the
most, points. ``info`` reports how many failing and passing points were
dropped; only the kept points are certified. In the MILP mode the elastic
step runs on the pattern-fixed LP (cheap), and the MILP then runs on the
kept points; when the pattern-fixed LP gives nothing, the MILP runs on all
points in the ``epsilon_max`` box, without reduction.

**Anytime, timeout.** ``time_limit_s`` bounds the whole fix (checked before
each phase and passed to HiGHS as its time limit). The smallest
modification found is kept; when nothing feasible is found in time (or the
query stays infeasible), the ORIGINAL variables are returned with
``info["status"]`` saying why. With a time limit hit, the result can depend
on machine speed; otherwise HiGHS is deterministic and the fix is a function
of the key.

**Biases** (``bias="own"``, default): the bias deltas are their own
variables under the same ‖·‖∞ bound (and in the l1 sum). The original
creates the ε array from the first Const op and its ``biasAddEquations``
reuses the *first entries of that same array* for the bias terms, tying
bias deltas to some weight deltas (an indexing quirk, not a design); we do
not reproduce the tie. ``bias="fixed"`` keeps the biases unchanged.

Defaults and where they come from:

* ``margin`` δ = 1e-3: ``findCorrection.py``'s ``correct_diff`` default
  (0.001); the float32 network misses the float64 margin by ~1e-6 at most
  (measured, tiny MLP and digits LeNet5), so the solution also classifies
  correctly in float32 (``info["max_violation"]`` reports the float32
  network).
* ``epsilon_max`` = 5: ``findCorrection.py``'s ``epsilon_max`` default (the
  upper end of its binary search); here a box ``|Δ_i| ≤ epsilon_max`` on
  every variable.
* ``time_limit_s`` = 60: ours (the original has none; the study's 3M ran
  17–49 s per fix).
* ``num_passing`` = -1 and ``batch_size`` = 256, ``max_lp_size`` = 1e8:
  as RA (ours).
* ``reduce`` = "elastic": ours (see above).

**Not implemented.** 3M's *multi-layer* search (split at a separation layer,
search new separation-layer values by random / greedy / MCTS heuristics,
solve two single-layer queries) is not implemented; only the single-layer
queries (last layer LP, hidden Dense layer MILP). Conv layers cannot be the
modified layer, and the MILP tail must be Dense / ReLU / Flatten / Dropout.

Only layer ℓ's ``kernel`` and ``bias`` change (``mask`` = element mask of
that layer's leaves); every other variable is bit-for-bit the original.

``info`` (numbers only): ``status`` (code into :data:`STATUS`: optimal /
feasible (time limit hit with an incumbent) / time limit (nothing found:
original returned) / infeasible (original returned) / nothing to do (no
failing input)), ``mode`` (:data:`MODES`: 0 LP, 1 MILP), ``lp_status``
(HiGHS status of the last solve, :data:`_linear.LP_STATUS`; -1 none),
``layer_index``, ``num_failing``, ``num_passing``, ``num_points`` (kept and
certified), ``num_dropped_failing``, ``num_dropped_passing``, ``epsilon``
(‖Δ‖∞ of the returned change; 0 when unchanged), ``objective``,
``num_variables``, ``num_constraints``, ``num_binaries`` (MILP),
``epsilon_box`` (MILP), ``incumbent_from_lp`` (MILP: 1 when the
pattern-fixed LP gave an incumbent), ``max_violation`` (max over kept
points and classes of ``max(0, δ − margin)``, float32 network), ``max_violation_float64``
(the same in float64 from layer ℓ's inputs), ``max_encoding_error`` (MILP:
max |MILP logits − real float64 logits| on the kept points), ``time_build_s``,
``time_solve_s``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.optimize
import scipy.sparse

from dlfix_jax import masks
from dlfix_jax.fixers import _linear
from dlfix_jax.fixers import base
from dlfix_jax.models import base as models_base

STATUS = ("optimal", "feasible", "time limit", "infeasible", "nothing to do")
"""``info["status"]`` codes."""
MODES = ("lp", "milp")
"""``info["mode"]`` codes: last-layer LP, hidden-layer MILP."""
TAIL_KINDS = ("dense", "relu", "flatten", "dropout")
"""Layers allowed after a hidden layer modified by the MILP."""
NORMS = ("linf", "l1")
_SLACK_TOL = 1e-9


class _Timeout(Exception):
    pass


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.layer = ""            # "" = the last Dense layer (LP); hidden = MILP
    c.norm = "linf"         # "linf" (paper) | "l1" (LP mode only)
    c.margin = 1e-3         # δ = findCorrection.py correct_diff
    c.epsilon_max = 5.0     # findCorrection.py epsilon_max: |Δ_i| bound
    c.bias = "own"          # "own" variables | "fixed"
    c.num_passing = -1      # passing repair inputs constrained; -1 = all
    c.reduce = "elastic"    # infeasible point sets: "elastic" | "none"
    c.time_limit_s = 60.0   # whole fix; original returned when nothing found
    c.max_lp_size = int(1e8)  # constraint-matrix nonzeros
    c.batch_size = 256      # points per Jacobian batch
    return c


def check_config(cfg) -> None:
    base.check_ranges(cfg, norm=set(NORMS), margin=(0.0, None),
                      epsilon_max=(0.0, None), bias={"own", "fixed"},
                      num_passing=(-1, None), reduce={"elastic", "none"},
                      time_limit_s=(0.0, None), max_lp_size=(1, None),
                      batch_size=(1, None))


def applicable(info: base.ProblemInfo) -> str | None:
    """None when 3M can modify the model; otherwise the reason."""
    model = info.model
    reason = _linear.piecewise_linear_reason(model, "3M's queries need")
    if reason:
        return reason
    dense = [i for i, s in enumerate(model.layers) if s.kind == "dense"]
    no_bias = [s.name for s in model.layers
               if s.kind == "dense" and not s.opts.get("use_bias", True)]
    if no_bias:
        return (f"model {model.name!r} has Dense layers without a bias "
                f"{no_bias}; 3M's queries give each modified layer a bias "
                "variable (not supported)")
    if any(s.kind not in ("flatten", "dropout")
           for s in model.layers[dense[-1] + 1:]):
        return (f"model {model.name!r}: its last Dense layer does not "
                "produce the logits (layers follow it), so the last-layer "
                "query is not an LP")
    return None


def _layer_index(model, name: str) -> int:
    """Index of the modified layer; raises ValueError when not supported."""
    i = _linear.layer_index(model, name, ("dense",), "3M", "Dense")
    if not name:  # the default (last Dense) needs no tail check
        return i
    bad = [s.kind for s in model.layers[i + 1:] if s.kind not in TAIL_KINDS]
    if bad:
        raise ValueError(f"3M: layer {name!r} is followed by "
                         f"{sorted(set(bad))} layers; the MILP tail allows "
                         f"only {TAIL_KINDS}")
    return i


def _is_last(model, li: int) -> bool:
    return all(s.kind in ("flatten", "dropout") for s in model.layers[li + 1:])


def _tail(model, params, li):
    """The layers after ``li`` in float64: ("dense", W, b) or ("relu",)."""
    out = []
    for s in model.layers[li + 1:]:
        if s.kind == "dense":
            p = models_base.get_layer_params(params, s.name)
            out.append(("dense", np.asarray(p["kernel"], np.float64),
                        np.asarray(p["bias"], np.float64)))
        elif s.kind == "relu":
            out.append(("relu",))
    return out


def _forward64(a, w, b, tail):
    """Real network logits in float64 from layer inputs ``a`` (N, d)."""
    z = a @ w + b
    for t in tail:
        z = np.maximum(z, 0.0) if t[0] == "relu" else z @ t[1] + t[2]
    return z


def _violation(logits, y, margin) -> float:
    n = len(y)
    mg = logits[np.arange(n), y][:, None] - logits
    mg[np.arange(n), y] = np.inf
    return float(max(0.0, np.max(margin - mg))) if n else 0.0


def _remaining(deadline):
    left = deadline - time.perf_counter()
    if left <= 0:
        raise _Timeout
    return left


def _elastic_keep(m, r, row_pt, n_pts, ncols, box_lo, box_hi, time_limit):
    """Elastic LP: min Σ s_p s.t. m·x + s_{pt(row)} ≥ r, box on x, s ≥ 0.
    Returns (keep mask over points or None, scipy result)."""
    nr = m.shape[0]
    s_mat = scipy.sparse.csr_matrix(
        (np.ones(nr), (np.arange(nr), row_pt)), shape=(nr, n_pts))
    a_ub = scipy.sparse.hstack([-scipy.sparse.csr_matrix(m), -s_mat],
                               format="csr")
    c = np.concatenate([np.zeros(ncols), np.ones(n_pts)])
    bounds = np.stack([np.concatenate([box_lo, np.zeros(n_pts)]),
                       np.concatenate([box_hi, np.full(n_pts, np.inf)])], 1)
    res = scipy.optimize.linprog(c, A_ub=a_ub, b_ub=-r, bounds=bounds,
                                 method="highs",
                                 options={"time_limit": float(time_limit)})
    if res.status != 0 or res.x is None:
        return None, res
    return res.x[ncols:] <= _SLACK_TOL, res


def _solve_lp_mode(m, r, row_pt, n_pts, free, cfg, deadline, info):
    """Hard LP on the kept points (elastic reduction when infeasible).
    ``free``: columns that are variables (others fixed at 0).
    Returns (flat Δ over free columns or None, keep mask, status code)."""
    keep = np.ones(n_pts, bool)
    mf = m[:, free]
    eps = float(cfg.epsilon_max)
    for attempt in range(2):
        rows = keep[row_pt]
        delta, res = _linear.solve_lp(mf[rows], r[rows], cfg.norm,
                                      max_abs=eps,
                                      time_limit=_remaining(deadline))
        info["lp_status"] = int(res.status)
        if res.status == 0 and delta is not None:
            info["objective"] = float(res.fun)
            return delta, keep, 0
        if res.status == 1:
            return None, keep, 2
        if res.status != 2 or cfg.reduce != "elastic" or attempt:
            return None, keep, 3
        nf = int(np.sum(free))
        k, res = _elastic_keep(mf, r, row_pt, n_pts, nf, np.full(nf, -eps),
                               np.full(nf, eps), _remaining(deadline))
        info["lp_status"] = int(res.status)
        if k is None:
            return None, keep, 2 if res.status == 1 else 3
        keep = k
        if not keep.any():
            return None, keep, 3
    return None, keep, 3


def _build_milp(a, z0, y, tail, idx_w, idx_b, nv, eps_box, bias_free, margin,
                num_classes, soft, pattern=None):
    """The MILP of the hidden-layer query on points (a, y).

    Columns: Δ (nv, in ravel order), t, then per point the ReLU outputs h
    and binaries d of each downstream ReLU layer, then (soft) one slack per
    point. ``pattern`` (per point, per downstream ReLU layer, the original
    on/off states): fixes every binary to it, which makes the problem an LP
    whose every solution is exact for the real network (a restriction of
    the MILP). Returns a dict with the scipy pieces and bookkeeping."""
    n, d_in = a.shape
    k = z0.shape[1]
    ncol = nv + 1
    t_col = nv
    rows, cols, vals, lo_r, hi_r = [], [], [], [], []
    nrow = 0
    col_lo = [np.full(nv, -eps_box), [0.0]]
    col_hi = [np.full(nv, eps_box), [eps_box]]
    if not bias_free:
        col_lo[0][idx_b.ravel()] = 0.0
        col_hi[0][idx_b.ravel()] = 0.0
    integ = [np.zeros(nv + 1)]

    def add_row(c, v, lo, hi):
        nonlocal nrow
        rows.append(np.full(len(c), nrow))
        cols.append(np.asarray(c, np.int64))
        vals.append(np.asarray(v, np.float64))
        lo_r.append(lo)
        hi_r.append(hi)
        nrow += 1

    def new_cols(count, lo, hi, integer):
        nonlocal ncol
        start = ncol
        ncol += count
        col_lo.append(np.broadcast_to(np.asarray(lo, np.float64), (count,)))
        col_hi.append(np.broadcast_to(np.asarray(hi, np.float64), (count,)))
        integ.append(np.full(count, 1.0 if integer else 0.0))
        return np.arange(start, start + count)

    # |Δ_i| ≤ t.
    dcols = np.arange(nv)
    r_ = np.arange(nrow, nrow + nv)
    rows += [r_, r_, r_ + nv, r_ + nv]
    cols += [dcols, np.full(nv, t_col), dcols, np.full(nv, t_col)]
    vals += [np.ones(nv), -np.ones(nv), -np.ones(nv), -np.ones(nv)]
    lo_r += [-np.inf] * (2 * nv)
    hi_r += [0.0] * (2 * nv)
    nrow += 2 * nv

    slack = new_cols(n, 0.0, np.inf, False) if soft else None
    n_bin = 0
    logit_exprs = []
    width = eps_box * (np.abs(a).sum(1) + (1.0 if bias_free else 0.0))
    for p in range(n):
        # Pre-activations of layer ℓ: expressions (cols, vals, const) per unit.
        exprs = [(np.concatenate([idx_w[:, j], [idx_b[j]]]),
                  np.concatenate([a[p], [1.0]]), z0[p, j]) for j in range(k)]
        lo = z0[p] - width[p]
        hi = z0[p] + width[p]
        hcols = None
        relu_i = 0
        for t in tail:
            if t[0] == "dense":
                w2, b2 = t[1], t[2]
                # exprs are single h variables here (after a ReLU) or layer
                # ℓ's outputs; a Dense after Dense does not occur in our tails
                # without a ReLU, but is handled by composing expressions.
                new = []
                if hcols is not None:  # after a ReLU: one variable per unit
                    new = [(hcols, w2[:, j], b2[j])
                           for j in range(w2.shape[1])]
                for j in ([] if hcols is not None else range(w2.shape[1])):
                    cs = np.concatenate([e[0] for e in exprs])
                    vs = np.concatenate([e[1] * w2[i, j]
                                         for i, e in enumerate(exprs)])
                    cst = b2[j] + sum(e[2] * w2[i, j]
                                      for i, e in enumerate(exprs))
                    new.append((cs, vs, cst))
                exprs, hcols = new, None
                wp, wn = np.maximum(w2, 0), np.minimum(w2, 0)
                lo, hi = lo @ wp + hi @ wn + b2, hi @ wp + lo @ wn + b2
            else:  # relu
                units = len(exprs)
                h = new_cols(units, np.maximum(lo, 0), np.maximum(hi, 0),
                             False)
                unstable = (lo < 0) & (hi > 0)
                nb = int(unstable.sum())
                if pattern is None:
                    dvar = new_cols(nb, 0.0, 1.0, True)
                else:
                    on = pattern[p][relu_i][unstable].astype(np.float64)
                    dvar = new_cols(nb, on, on, False)
                relu_i += 1
                n_bin += nb
                ub = 0
                for j, (c, v, cst) in enumerate(exprs):
                    if hi[j] <= 0:
                        continue  # h_j = 0 by its bounds
                    if lo[j] >= 0:  # h − pre = cst
                        add_row(np.concatenate([[h[j]], c]),
                                np.concatenate([[1.0], -v]), cst, cst)
                        continue
                    dj = dvar[ub]
                    ub += 1
                    # h − pre ≥ cst
                    add_row(np.concatenate([[h[j]], c]),
                            np.concatenate([[1.0], -v]), cst, np.inf)
                    # h − pre − l·d ≤ cst − l
                    add_row(np.concatenate([[h[j], dj], c]),
                            np.concatenate([[1.0, -lo[j]], -v]), -np.inf,
                            cst - lo[j])
                    # h − u·d ≤ 0
                    add_row([h[j], dj], [1.0, -hi[j]], -np.inf, 0.0)
                exprs = [(np.array([h[j]]), np.array([1.0]), 0.0)
                         for j in range(units)]
                hcols = h
                lo, hi = np.maximum(lo, 0), np.maximum(hi, 0)
        logit_exprs.append(exprs)
        # Margins: logit_y − logit_c (+ s_p) ≥ δ.
        yc = exprs[y[p]]
        for c_ in range(num_classes):
            if c_ == y[p]:
                continue
            e = exprs[c_]
            cs = np.concatenate([yc[0], e[0]])
            vs = np.concatenate([yc[1], -e[1]])
            if soft:
                cs = np.concatenate([cs, [slack[p]]])
                vs = np.concatenate([vs, [1.0]])
            add_row(cs, vs, margin - (yc[2] - e[2]), np.inf)

    a_mat = scipy.sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(nrow, ncol))
    c = np.zeros(ncol)
    if soft:
        c[slack] = 1.0
    else:
        c[t_col] = 1.0
    return dict(
        c=c, a=a_mat, lo=np.asarray(lo_r, np.float64),
        hi=np.asarray(hi_r, np.float64),
        bounds=scipy.optimize.Bounds(np.concatenate(col_lo),
                                     np.concatenate(col_hi)),
        integrality=np.concatenate(integ), n_bin=n_bin, slack=slack,
        logit_exprs=logit_exprs)


def _solve_milp(milp, deadline):
    cons = scipy.optimize.LinearConstraint(milp["a"], milp["lo"], milp["hi"])
    return _linear.solve_milp(milp["c"], cons, milp["integrality"],
                              milp["bounds"], time_limit=_remaining(deadline))


def _expr_values(exprs, x):
    return np.array([float(np.dot(v, x[c])) + cst for c, v, cst in exprs])


@base.register("minimal_modification", level="layer", abbrev="3M",
               vmappable=False,
               paper="Refaeli & Katz, 'Minimal Multi-Layer Modifications of "
                     "Deep Neural Networks' (3M-DNN), arXiv 2110.09929; "
                     "single-layer queries after Goldberger, Adi, Keshet, "
                     "Katz, LPAR 2020",
               default_config=default_config, applicable=applicable,
               check_config=check_config,
               codes={"status": STATUS, "mode": MODES,
                      "lp_status": _linear.LP_STATUS})
def fix(key: jax.Array, problem: base.Problem,
        config: ml_collections.ConfigDict) -> base.FixResult:
    """3M single-layer minimal modification; see the module docstring."""
    t0 = time.perf_counter()
    deadline = t0 + float(config.time_limit_s)
    model = problem.model
    reason = applicable(problem.info)
    if reason:
        raise ValueError(f"3M is not applicable: {reason}")
    li = _layer_index(model, config.layer)
    last = _is_last(model, li)
    if not last and config.norm != "linf":
        raise ValueError("3M: the hidden-layer MILP minimises the linf norm "
                         f"only; got norm={config.norm!r}")
    name = model.layers[li].name
    variables = problem.variables
    params = variables["params"]
    lparams = models_base.get_layer_params(params, name)
    mask = masks.layer_mask(params, name)

    n_fail = len(problem.failing)
    x, y, k = _linear.constrained_points(key, problem,
                                         int(config.num_passing))
    n_pts = len(y)
    margin = float(config.margin)
    info = {"status": 4, "mode": 0 if last else 1, "lp_status": -1,
            "layer_index": li, "num_failing": n_fail, "num_passing": int(k),
            "num_points": 0, "num_dropped_failing": 0,
            "num_dropped_passing": 0, "epsilon": 0.0, "objective": 0.0,
            "num_variables": 0, "num_constraints": 0, "num_binaries": 0,
            "epsilon_box": 0.0, "incumbent_from_lp": 0, "margin": margin,
            "max_violation": 0.0, "max_violation_float64": 0.0,
            "max_encoding_error": 0.0, "time_build_s": 0.0,
            "time_solve_s": 0.0}
    if n_fail == 0:
        return base.FixResult(variables, mask, info)

    # Layer ℓ's inputs and the decoupled-map Jacobian rows (RA's machinery;
    # exact for the last layer, the warm start for a hidden one).
    t_build = time.perf_counter()
    in_fn, jac_fn, unravel, nv = _linear.delta_jacobian_fns(model, li)
    logit_fn = models_base.jitted_apply(model)
    assert nv < 2 ** 24, "3M: flat Δ indices must be exact in float32"
    idx = unravel(jnp.arange(nv, dtype=jnp.float32))
    idx_w = np.asarray(idx["kernel"]).astype(np.int64)
    idx_b = np.asarray(idx["bias"]).astype(np.int64)
    free = np.ones(nv, bool)
    if config.bias == "fixed":
        free[idx_b.ravel()] = False
    bs = int(config.batch_size)
    zero = jnp.zeros((nv,), jnp.float32)
    blocks, rhs, row_pts, a_all, nnz = [], [], [], [], 0
    for i in range(0, n_pts, bs):
        xb = x[i:i + bs]
        ab = in_fn(variables, xb)
        a_all.append(np.asarray(ab, np.float64).reshape(len(xb), -1))
        if not last:
            continue
        jac_b = np.asarray(jac_fn(variables, ab, zero), np.float64)
        logit_b = np.asarray(logit_fn(variables, xb), np.float64)
        m_b, r_b, p_b = _linear.margin_rows(jac_b, logit_b, y[i:i + bs],
                                            margin, problem.num_classes,
                                            return_points=True)
        m_b = scipy.sparse.csr_matrix(m_b)
        nnz += m_b.nnz
        if nnz > int(config.max_lp_size):
            raise RuntimeError(
                f"3M: LP too large for layer {name!r}: more than "
                f"{int(config.max_lp_size):.3g} constraint-matrix nonzeros "
                f"(max_lp_size) after {i + len(xb)} of {n_pts} points; "
                "lower num_passing")
        blocks.append(m_b)
        rhs.append(r_b)
        row_pts.append(p_b + i)
    a = np.concatenate(a_all)
    if last:
        m = scipy.sparse.vstack(blocks, format="csr")
        r = np.concatenate(rhs)
        row_pt = np.concatenate(row_pts)
    w = np.asarray(lparams["kernel"], np.float64)
    b = np.asarray(lparams["bias"], np.float64)
    tail = _tail(model, params, li)
    info["time_build_s"] = time.perf_counter() - t_build

    def result(delta_flat, keep, status):
        """Writes Δ (full flat vector) back, or returns the original."""
        info["status"] = status
        info["time_solve_s"] = time.perf_counter() - t_build - info[
            "time_build_s"]
        if delta_flat is None:
            info["num_points"] = 0
            return base.FixResult(variables, mask, info)
        keep_f, keep_p = keep[:n_fail], keep[n_fail:]
        info.update(num_points=int(keep.sum()),
                    num_dropped_failing=int((~keep_f).sum()),
                    num_dropped_passing=int((~keep_p).sum()),
                    epsilon=float(np.max(np.abs(delta_flat))))
        d = unravel(jnp.asarray(delta_flat, jnp.float32))
        new_layer = {kk: (lparams[kk] + jnp.asarray(d[kk], lparams[kk].dtype)
                          if kk in d else lparams[kk]) for kk in lparams}
        new_vars = dict(variables)
        new_vars["params"] = masks.select(
            mask, models_base.set_layer_params(params, name, new_layer),
            params)
        kx = np.nonzero(keep)[0]
        info["max_violation"] = _violation(
            np.asarray(logit_fn(new_vars, x[kx]), np.float64), y[kx], margin)
        nl = models_base.get_layer_params(new_vars["params"], name)
        info["max_violation_float64"] = _violation(
            _forward64(a[kx], np.asarray(nl["kernel"], np.float64),
                       np.asarray(nl["bias"], np.float64), tail), y[kx],
            margin)
        return base.FixResult(new_vars, mask, info)

    def full(delta_free):
        out = np.zeros(nv)
        out[free] = delta_free
        return out

    try:
        if last:
            info["num_variables"] = int(free.sum()) * (
                2 if config.norm == "l1" else 1) + (
                1 if config.norm == "linf" else 0)
            info["num_constraints"] = int(m.shape[0])
            delta, keep, status = _solve_lp_mode(m, r, row_pt, n_pts, free,
                                                 config, deadline, info)
            return result(None if delta is None else full(delta), keep,
                          status)
        return _fix_milp(config, deadline, info, n_pts, free, a, w, b, tail,
                         y, idx_w, idx_b, nv, margin, problem.num_classes,
                         result)
    except _Timeout:
        return result(None, np.ones(n_pts, bool), 2)


def _pattern(a, w, b, tail):
    """Per point, per downstream ReLU layer: the original on/off states."""
    z = a @ w + b
    pats = []
    for t in tail:
        if t[0] == "relu":
            pats.append(z > 0)
            z = np.maximum(z, 0.0)
        else:
            z = z @ t[1] + t[2]
    return [[pl[p] for pl in pats] for p in range(len(a))]


def _fix_milp(config, deadline, info, n_pts, free, a, w, b, tail, y, idx_w,
              idx_b, nv, margin, num_classes, result):
    """Hidden-layer mode: pattern-fixed LP incumbent, then the MILP."""
    eps_max = float(config.epsilon_max)
    bias_free = config.bias == "own"
    z0 = a @ w + b
    pattern = _pattern(a, w, b, tail)
    elastic = config.reduce == "elastic"

    def solve(sub, eps_box, soft, fixed):
        milp = _build_milp(a[sub], z0[sub], y[sub], tail, idx_w, idx_b, nv,
                           eps_box, bias_free, margin, num_classes, soft,
                           [pattern[p] for p in sub] if fixed else None)
        if not fixed:
            info.update(num_variables=int(milp["a"].shape[1]),
                        num_constraints=int(milp["a"].shape[0]),
                        num_binaries=int(milp["n_bin"]))
        res = _solve_milp(milp, deadline)
        info["lp_status"] = int(res.status)
        ok = res.x is not None and res.status in (0, 1)
        return milp, res, ok

    def check(milp, res, sub):
        """Agreement of the encoding's logits with the real network."""
        dl = res.x[:nv]
        real = _forward64(a[sub], w + dl[idx_w], b + dl[idx_b], tail)
        enc = np.array([_expr_values(e, res.x) for e in milp["logit_exprs"]])
        return float(np.max(np.abs(enc - real)))

    # 1. Incumbent: the LP with the activation pattern fixed at the
    #    original's (exact for the real network), elastic when infeasible.
    sub = np.arange(n_pts)
    keep = np.ones(n_pts, bool)
    incumbent = None
    milp, res, ok = solve(sub, eps_max, False, True)
    if not ok and res.status == 2 and elastic:
        milp_s, res_s, ok_s = solve(sub, eps_max, True, True)
        if ok_s:
            keep = res_s.x[milp_s["slack"]] <= _SLACK_TOL
            sub = np.nonzero(keep)[0]
            if len(sub):
                milp, res, ok = solve(sub, eps_max, False, True)
    if ok and res.status == 0:
        incumbent = res.x[:nv].copy()
        info["incumbent_from_lp"] = 1
        info["objective"] = float(res.fun)
        info["max_encoding_error"] = check(milp, res, sub)
    # 2. The MILP on the same points, in the box the incumbent allows.
    eps_box = (eps_max if incumbent is None
               else float(np.max(np.abs(incumbent))) * (1 + 1e-6) + 1e-9)
    info["epsilon_box"] = eps_box
    if incumbent is None:
        sub, keep = np.arange(n_pts), np.ones(n_pts, bool)
    try:
        milp, res, ok = solve(sub, eps_box, False, False)
    except _Timeout:
        ok = False
        res = None
    if ok:
        info["objective"] = float(res.fun)
        info["max_encoding_error"] = check(milp, res, sub)
        if (incumbent is None or res.status == 0
                or res.fun <= np.max(np.abs(incumbent))):
            return result(np.where(free, res.x[:nv], 0.0), keep,
                          0 if res.status == 0 else 1)
    if incumbent is not None:
        info["objective"] = float(np.max(np.abs(incumbent)))
        return result(np.where(free, incumbent, 0.0), keep, 1)
    if res is None:
        return result(None, keep, 2)
    return result(None, keep, 2 if res.status == 1 else 3)
