"""3M (layer level): minimal one- or two-layer modification by LP / MILP.

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
with the key (the only use of the key in the single-layer modes), ``0``
none. The original corrects a chosen set of inputs only (watermark images);
the passing points are ours, so that the fix keeps them correct (the
study's NFR). The study's 3M left MNIST and CIFAR10 unchanged (RR 0),
consistent with an infeasible or timed-out query returning the original.

**Lazy constraint generation** (``lazy=True``, default; the LP mode and
both queries of the multi-layer mode; the MILP mode constrains its points up
front). LP mode and query (a) generate *rows*: the LP starts with the rows
violated at Δ = 0 (each failing point's rows of the classes that beat its
label, and any row under the margin); after each solve every other row of a
kept point is evaluated at the solution (one sparse product) and the
violated rows join the LP, until none is violated. The last LP is then
optimal for the query over *all* rows (a relaxation's optimum that is
feasible for the full problem), so ``lazy`` changes the cost, not the
optimum (HiGHS may return another optimal vertex). Why it is the default,
with every passing point: on the study's MNIST LeNet5 (135 failing / 4,865
passing repair inputs; 45,000 margin rows × 851 variables) HiGHS does not
solve the full ℓ∞ LP in 120 s on 2 cores (the original is returned: the
"unchanged" of the study's row), while lazily it is optimal after 5 rounds
with 1,552 rows in the last LP (ε = 0.168, 15–20 s of HiGHS, 20–39 s a fix
with the Jacobians, 2 cores at load 13–16; every one of the 5,000 repair
inputs certified). A sampled passing subset (``num_passing = 500``,
measured before: ε = 0.154, optimal in 4–7 s) certifies only the sample
and broke more test inputs (NFR 3.44 vs 1.96 with all points). Points
instead of rows (every row of a violated point) took 6 rounds and 4,707
rows, 25 s of HiGHS on a quiet machine and 87–111 s at load 13.

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

**Anytime, timeout.** ``time_limit_s`` bounds the solving, from the end of
the build (layer inputs, Jacobian rows: its first call compiles, and its time
depends on the machine's load) to the end (checked before each phase and
passed to HiGHS as its time limit; ``info["timed_out"]`` is
1 when it cut anything). The smallest modification found is kept: in the
lazy LP, when the time runs out after a solved round, that round's solution
is returned with status "feasible" and the points it violates counted as
dropped (it is certified on the rest); when nothing feasible is found in
time (or the query stays infeasible), the ORIGINAL variables are returned
with ``info["status"]`` "time limit" / "infeasible". With a time limit hit,
the result can depend on machine speed; otherwise HiGHS is deterministic
and the fix is a function of the key.

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
  17–49 s per fix); the default takes 20–39 s per fix on the study's MNIST
  model on 2 cores shared at load 13–16 (measured).
* ``num_passing`` = -1 with ``lazy`` = True: ours (see "Lazy constraint
  generation"); ``batch_size`` = 256, ``max_lp_size`` = 1e8: as RA (ours).
* ``reduce`` = "elastic": ours (see above).
* ``separation`` = "" (single layer), ``search`` = "greedy",
  ``num_candidates`` = 4: ours (see below; 3M-DNN's settings are not
  published beyond the abstract).

**Multi-layer mode (3M-DNN)** (``separation="<Dense layer>"``): the network
is split at the separation layer s (a Dense layer whose output reaches the
last Dense layer L through ReLU / Flatten / Dropout only, e.g. LeNet5's
``dense_1``); both s and L change. Per candidate:

1. new separation values (ReLU outputs) for the failing points, ``v_p =
   s_p + α_p·d_p``, where ``d_p`` is the smallest (ℓ∞) change of ``s_p``
   that the *original* last layer classifies correctly with margin δ,
   moving only s_p's active units and staying ≥ 0 (a small LP per point);
   passing points keep ``v_p = s_p``;
2. query (a), "N2 maps v_p to the correct label": the last-layer LP on
   inputs v (lazy rows, elastic reduction as above) gives Δ_L;
3. query (b), "N1 maps p to v_p": the smallest ‖Δ_s‖∞ such that the network
   with the new last layer classifies every kept point with margin δ, with
   each point's ReLU pattern at s fixed to the original's (an LP with one
   auxiliary variable per point and unit of s, exact for the real network;
   lazy: the LP starts with the points that the new last layer does not
   yet classify with the margin, and the real float64 network checks the
   points outside the LP after each solve). This is a relaxation of
   hitting v_p exactly (v_p keeps the pattern, so a Δ_s
   that hits every v_p and keeps the passing points' values is feasible
   here), so it never needs a larger Δ_s than the exact-target query. Its
   box is the incumbent's ε: only improvements are solved for.

The candidate's size is ``max(‖Δ_s‖∞, ‖Δ_L‖∞)``; the search keeps the
smallest (more kept points first). Candidates: α = 0 first (the last-layer
query alone, Δ_s = 0: the multi-layer result is never worse than the
single-layer one), then ``num_candidates`` more: ``search="greedy"`` tries
α = 1, 1/2, then bisects the larger interval next to the best α so far;
``search="random"`` draws one α_p ~ U(0, 1) per failing point per candidate
(``jax.random.fold_in(key, i)``). There is no optimality claim: status is
"feasible" when a candidate was found. Measured: on the 32-16-10 MLP of the
tests (separation = the 16-unit layer, 200 digits repair points, all
certified) greedy gives ε = 0.075 (α = 0.75; ‖Δ_s‖∞ 0.075, ‖Δ_L‖∞ 0.045)
and random 0.081, vs the single-layer optimum 0.175, in 2–3 s; on the
study's MNIST LeNet5 (separation ``dense_1``, 10,164 parameters) query (b)
at α = 1 with the 135 failing points (21,505 columns, 1.5M nonzeros) did
not finish in 96 s in the fix nor in 150 s alone (HiGHS simplex or IPM, 2
cores at load ~14), so the search returns the α = 0 candidate (the
single-layer result) there. Deviations: the original's MCTS heuristic is not
implemented; query (b) is the pattern-fixed relaxation above instead of a
Marabou query for exact values; only the last Dense layer can be the second
layer.

**Other limits.** Conv layers cannot be a modified layer, and the MILP tail
must be Dense / ReLU / Flatten / Dropout.

Only the modified layers' ``kernel`` and ``bias`` change (``mask`` =
element mask of those layers' leaves); every other variable is bit-for-bit
the original.

``info`` (numbers only): ``status`` (code into :data:`STATUS`: optimal /
feasible (time limit hit with an incumbent) / time limit (nothing found:
original returned) / infeasible (original returned) / nothing to do (no
failing input); the multi-layer mode reports "feasible" when it found a
candidate), ``mode`` (:data:`MODES`: 0 LP, 1 MILP, 2 multi), ``lp_status``
(HiGHS status of the last solve, :data:`_linear.LP_STATUS`; -1 none),
``layer_index``, ``num_failing``, ``num_passing``, ``num_points`` (kept and
certified), ``num_dropped_failing``, ``num_dropped_passing``, ``epsilon``
(‖Δ‖∞ of the returned change; 0 when unchanged), ``objective``,
``num_variables``, ``num_constraints``, ``num_binaries`` (MILP),
``epsilon_box`` (MILP), ``incumbent_from_lp`` (MILP: 1 when the
pattern-fixed LP gave an incumbent), ``max_violation`` (max over kept
points and classes of ``max(0, δ − margin)``, float32 network),
``max_violation_float64`` (the same in float64 from layer ℓ's inputs),
``max_encoding_error`` (MILP: max |MILP logits − real float64 logits| on
the kept points), ``num_active`` (rows in the last LP), ``num_rounds`` (LP
solves of the lazy loops), ``timed_out``, ``separation_index`` (-1 single
layer),
``alpha`` (multi: the best candidate's α; −1 − i for random candidate i),
``epsilon_1`` / ``epsilon_2`` (multi: ‖Δ_s‖∞ / ‖Δ_L‖∞), ``num_candidates``
(multi: candidates tried), ``time_build_s``, ``time_solve_s``.
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
MODES = ("lp", "milp", "multi")
"""``info["mode"]`` codes: last-layer LP, hidden-layer MILP, multi-layer."""
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
    c.lazy = True           # lazy constraint generation for passing points
    c.separation = ""       # "" single layer | Dense layer name: 3M-DNN
    c.search = "greedy"     # separation-value search: "greedy" | "random"
    c.num_candidates = 4    # separation-value candidates after α = 0
    c.time_limit_s = 60.0   # solving (after the build); original returned when nothing found
    c.max_lp_size = int(1e8)  # constraint-matrix nonzeros
    c.batch_size = 256      # points per Jacobian batch
    return c


def check_config(cfg) -> None:
    base.check_ranges(cfg, norm=set(NORMS), margin=(0.0, None),
                      epsilon_max=(0.0, None), bias={"own", "fixed"},
                      num_passing=(-1, None), reduce={"elastic", "none"},
                      time_limit_s=(0.0, None), max_lp_size=(1, None),
                      batch_size=(1, None), search={"greedy", "random"},
                      num_candidates=(0, None))


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


def _solve_lp_mode(m, r, row_pt, n_pts, free, cfg, deadline, info,
                   lazy=False):
    """Hard LP on the kept points (elastic reduction when infeasible).

    ``free``: columns that are variables (others fixed at 0). ``lazy``
    (row generation): the LP starts with the rows violated at Δ = 0 (the
    failing points' wrong-class rows, and any passing point's row under the
    margin); after each solve every other row of a kept point is evaluated
    at the solution (one sparse product) and the violated ones are added,
    until none is: the last solution is then the optimum over all rows.
    Anytime: when the time runs out after a solved round, that round's
    solution is returned (status "feasible") with the points it violates
    counted as dropped.

    Returns (flat Δ over free columns or None, keep mask, status code)."""
    keep = np.ones(n_pts, bool)
    active = (r > 0.0) if lazy else np.ones(len(r), bool)
    mf = m[:, free]
    eps = float(cfg.epsilon_max)
    nf = int(np.sum(free))
    rounds = 0
    best = None
    while True:
        rows = keep[row_pt] & active
        try:
            left = _remaining(deadline)
        except _Timeout:
            left = None
        if left is None:
            info["timed_out"] = 1
            return best if best else (None, keep, 2)
        delta, res = _linear.solve_lp(mf[rows], r[rows], cfg.norm,
                                      max_abs=eps, time_limit=left)
        rounds += 1
        info["lp_status"] = int(res.status)
        info["num_rounds"] = rounds
        if res.status == 0 and delta is not None:
            info["objective"] = float(res.fun)
            short = (mf @ delta - r < 0.0) & keep[row_pt] & ~active
            info["num_active"] = int(rows.sum())
            if not short.any():
                return delta, keep, 0
            bad = np.zeros(n_pts, bool)
            bad[row_pt[short]] = True
            best = (delta, keep & ~bad, 1)
            active |= short
            continue
        if res.status == 1:
            info["timed_out"] = 1
            return best if best else (None, keep, 2)
        if res.status != 2 or cfg.reduce != "elastic":
            return None, keep, 3
        sel = np.unique(row_pt[rows])
        pos = np.full(n_pts, -1)
        pos[sel] = np.arange(len(sel))
        try:
            left = _remaining(deadline)
        except _Timeout:
            info["timed_out"] = 1
            return best if best else (None, keep, 2)
        k, res = _elastic_keep(mf[rows], r[rows], pos[row_pt[rows]],
                               len(sel), nf, np.full(nf, -eps),
                               np.full(nf, eps), left)
        info["lp_status"] = int(res.status)
        if k is None:
            if res.status == 1:
                info["timed_out"] = 1
                return best if best else (None, keep, 2)
            return None, keep, 3
        if k.all():  # numerically infeasible: nothing left to drop
            return None, keep, 3
        keep[sel[~k]] = False
        if not (keep[row_pt] & active).any():
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
    si = -1
    if config.separation:
        if not last:
            raise ValueError("3M: with a separation layer the second "
                             "modified layer is the last Dense layer; got "
                             f"layer={config.layer!r}")
        if config.norm != "linf":
            raise ValueError("3M: the multi-layer mode minimises the linf "
                             f"norm only; got norm={config.norm!r}")
        si = _separation_index(model, config.separation, li)
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
    info = {"status": 4, "mode": 2 if si >= 0 else 0 if last else 1,
            "lp_status": -1, "separation_index": si, "alpha": 0.0,
            "epsilon_1": 0.0, "epsilon_2": 0.0, "num_candidates": 0,
            "layer_index": li, "num_failing": n_fail, "num_passing": int(k),
            "num_points": 0, "num_dropped_failing": 0,
            "num_dropped_passing": 0, "epsilon": 0.0, "objective": 0.0,
            "num_variables": 0, "num_constraints": 0, "num_binaries": 0,
            "epsilon_box": 0.0, "incumbent_from_lp": 0, "margin": margin,
            "num_active": 0, "num_rounds": 0, "timed_out": 0,
            "max_violation": 0.0, "max_violation_float64": 0.0,
            "max_encoding_error": 0.0, "time_build_s": 0.0,
            "time_solve_s": 0.0}
    if si >= 0:
        mask = masks.mask_or(
            masks.layer_mask(params, model.layers[si].name), mask)
    if n_fail == 0:
        return base.FixResult(variables, mask, info)
    if si >= 0:
        return _fix_multi_result(key, problem, config, deadline, info, x, y,
                                 si, li, mask)

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
    # The limit bounds the solving, not the build (whose first call compiles
    # the Jacobian: its time depends on the machine's load, and a limit on it
    # would make the result depend on the load too).
    deadline = time.perf_counter() + float(config.time_limit_s)

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
                                                 config, deadline, info,
                                                 bool(config.lazy))
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


# ---------------------------------------------------------------------------
# Multi-layer mode (3M-DNN): separation layer, two single-layer queries.


def _separation_index(model, name: str, li: int) -> int:
    """Index of the separation Dense layer ``name``: its output, through
    ReLU / Flatten / Dropout only, must be the input of the last Dense
    layer ``li``; raises ValueError otherwise."""
    si = _linear.layer_index(model, name, ("dense",), "3M", "Dense",
                             verb="the separation layer")
    between = [s.kind for s in model.layers[si + 1:li]]
    if si >= li or any(k not in ("relu", "flatten", "dropout")
                       for k in between):
        raise ValueError(
            f"3M: separation layer {name!r} must be a Dense layer whose "
            "output reaches the last Dense layer through ReLU / Flatten / "
            f"Dropout only; between them: {between or 'nothing'}")
    return si


def _last_rows(s, y, w2, b2, margin, num_classes):
    """Sparse rows M·Δ₂ ≥ r of the last-layer query on inputs ``s`` (n, k):
    ``logit_y − logit_c ≥ δ`` for every point and class c ≠ y, point-major.
    Δ₂'s flat layout: kernel (k, C) row-major, then bias (C). Returns (M, r,
    the point of each row)."""
    n, k = s.shape
    logits = s @ w2 + b2
    cls = np.arange(num_classes)
    pp, cc = np.nonzero(cls[None, :] != y[:, None])  # point-major rows
    yy = y[pp]
    nr = len(pp)
    ks = np.arange(k)
    cols = np.concatenate([ks[None, :] * num_classes + yy[:, None],
                           ks[None, :] * num_classes + cc[:, None],
                           (k * num_classes + yy)[:, None],
                           (k * num_classes + cc)[:, None]], 1)
    vals = np.concatenate([s[pp], -s[pp], np.ones((nr, 1)),
                           -np.ones((nr, 1))], 1)
    m = scipy.sparse.csr_matrix(
        (vals.ravel(), cols.ravel(), np.arange(nr + 1) * (2 * k + 2)),
        shape=(nr, (k + 1) * num_classes))
    m.sum_duplicates()
    r = margin - (logits[pp, yy] - logits[pp, cc])
    return m, r, pp


def _margin_min(logits, y):
    n = len(y)
    mg = logits[np.arange(n), y][:, None] - logits
    mg[np.arange(n), y] = np.inf
    return mg.min(1)


def _target_directions(s, y, w2, b2, margin, relu, deadline):
    """Per failing point: the smallest (ℓ∞) change d of its separation
    values s that the ORIGINAL last layer classifies correctly with margin
    δ, moving only active units (s_j > 0, so that s + d keeps the original
    ReLU pattern; every unit without a ReLU) and keeping s + d ≥ 0 (an LP
    per point). None for a point where no such d exists."""
    n, k = s.shape
    num_classes = w2.shape[1]
    out = []
    for p in range(n):
        on = (s[p] > 0) if relu else np.ones(k, bool)
        g = w2[:, [y[p]]] - w2  # (k, C): margin gradient per class
        others = [c for c in range(num_classes) if c != y[p]]
        mg0 = (s[p] @ w2 + b2)
        # variables (d, t): −g_cᵀd ≤ mg0_y − mg0_c − δ;  ±d − t ≤ 0.
        a_m = np.concatenate([-g[:, others].T, np.zeros((len(others), 1))],
                             1)
        b_m = mg0[y[p]] - mg0[others] - margin
        eye = np.eye(k)
        a_t = np.concatenate([np.concatenate([eye, -np.ones((k, 1))], 1),
                              np.concatenate([-eye, -np.ones((k, 1))], 1)])
        lo = np.where(on, -s[p] if relu else -np.inf, 0.0)
        hi = np.where(on, np.inf, 0.0)
        bounds = list(zip(lo, hi)) + [(0, None)]
        c = np.zeros(k + 1)
        c[-1] = 1.0
        res = scipy.optimize.linprog(
            c, A_ub=np.concatenate([a_m, a_t]),
            b_ub=np.concatenate([b_m, np.zeros(2 * k)]), bounds=bounds,
            method="highs", options={"time_limit": _remaining(deadline)})
        out.append(res.x[:k] if res.status == 0 else None)
    return out


def _forward_sep(a, z, dl, relu, w2, b2):
    """Real logits (float64) from the separation layer's inputs ``a`` and
    original outputs ``z`` when it changes by ``dl`` ((d+1, k), bias last)
    and the last layer is (w2, b2)."""
    zn = z + a @ dl[:-1] + dl[-1]
    return (np.maximum(zn, 0.0) if relu else zn) @ w2 + b2


def _solve_first(a, z, relu, w2n, b2n, y, pts, fail, box, bias_free,
                 margin, deadline):
    """Query (b): the smallest ‖Δ₁‖∞ ≤ ``box`` of the separation layer such
    that the network with the new last layer (w2n, b2n) classifies every
    point of ``pts`` with margin δ, each point's ReLU pattern fixed
    (an LP, exact for the real network on the points it constrains). Lazy:
    ``fail`` start in the LP; the real network (float64) checks the others
    after each solve and the violated ones are added. Returns (Δ₁ as (d+1,
    k) with the bias last, rounds) or (None, rounds)."""
    d, k = a.shape[1], z.shape[1]
    nv = (d + 1) * k
    on = z > 0 if relu else np.ones(z.shape, bool)
    if not len(fail):
        return np.zeros((d + 1, k)), 0, 0
    num_classes = w2n.shape[1]
    active = np.zeros(len(y), bool)
    active[fail] = True
    in_set = np.zeros(len(y), bool)
    in_set[pts] = True
    rounds = 0
    while True:
        q = np.nonzero(active & in_set)[0]
        n = len(q)
        nu = n * k
        t_col = nv
        u0 = nv + 1
        # E: u_qj − Σ_i a_qi Δ_ij − Δb_j = 0.
        rq = np.arange(nu)
        ii = np.arange(d)
        e_rows = np.concatenate([rq, np.repeat(rq, d), rq])
        jj = np.tile(np.arange(k), n)
        e_cols = np.concatenate([
            u0 + rq,
            (ii[None, :] * k + jj[:, None]).ravel(),
            d * k + jj])
        e_vals = np.concatenate([
            np.ones(nu), -np.repeat(a[q], k, axis=0).ravel(),
            -np.ones(nu)])
        # T: ±Δ_v − t ≤ 0.
        vv = np.arange(nv)
        t_rows = np.concatenate([vv, vv, nv + vv, nv + vv]) + nu
        t_cols = np.concatenate([vv, np.full(nv, t_col), vv,
                                 np.full(nv, t_col)])
        t_vals = np.concatenate([np.ones(nv), -np.ones(nv), -np.ones(nv),
                                 -np.ones(nv)])
        # M: Σ_j on_qj (w2n[j, y] − w2n[j, c]) u_qj ≥ δ − margin₀(q, c).
        s0 = np.where(on[q], z[q], 0.0)
        l0 = s0 @ w2n + b2n
        m_rows, m_cols, m_vals, m_lo = [], [], [], []
        r0 = nu + 2 * nv
        for qi, p in enumerate(q):
            for c in range(num_classes):
                if c == y[p]:
                    continue
                g = (w2n[:, y[p]] - w2n[:, c]) * on[p]
                m_rows.append(np.full(k, r0))
                m_cols.append(u0 + qi * k + np.arange(k))
                m_vals.append(g)
                m_lo.append(margin - (l0[qi, y[p]] - l0[qi, c]))
                r0 += 1
        a_mat = scipy.sparse.csr_matrix(
            (np.concatenate([e_vals, t_vals] + m_vals),
             (np.concatenate([e_rows, t_rows] + m_rows),
              np.concatenate([e_cols, t_cols] + m_cols))),
            shape=(r0, u0 + nu))
        lo = np.concatenate([np.zeros(nu), np.full(2 * nv, -np.inf),
                             np.asarray(m_lo)])
        hi = np.concatenate([np.zeros(nu), np.zeros(2 * nv),
                             np.full(len(m_lo), np.inf)])
        on_q = on[q].ravel()
        zq = z[q].ravel()
        col_lo = np.concatenate([np.full(nv, -box), [0.0],
                                 np.where(on_q, -zq, -np.inf) if relu
                                 else np.full(nu, -np.inf)])
        col_hi = np.concatenate([np.full(nv, box), [box],
                                 np.where(on_q, np.inf, -zq) if relu
                                 else np.full(nu, np.inf)])
        if not bias_free:
            col_lo[d * k:nv] = 0.0
            col_hi[d * k:nv] = 0.0
        c = np.zeros(u0 + nu)
        c[t_col] = 1.0
        res = _linear.solve_milp(
            c, scipy.optimize.LinearConstraint(a_mat, lo, hi),
            np.zeros(u0 + nu), scipy.optimize.Bounds(col_lo, col_hi),
            time_limit=_remaining(deadline))
        rounds += 1
        if res.status != 0 or res.x is None:
            return None, rounds, int(res.status)
        dl = res.x[:nv].reshape(d + 1, k)
        real = _margin_min(_forward_sep(a[pts], z[pts], dl, relu, w2n, b2n),
                           y[pts])
        bad = np.zeros(len(y), bool)
        bad[pts[real < margin]] = True
        bad &= ~active
        if not bad.any():
            return dl, rounds, 0
        active |= bad


def _fix_multi(key, config, deadline, info, a, z, relu, w2, b2, y, n_fail,
               num_classes):
    """The 3M-DNN search; see the module docstring. Returns (Δ₁ (d+1, k) or
    None, Δ₂ (k+1, C) or None, keep mask, status)."""
    n_pts = len(y)
    margin = float(config.margin)
    s = np.maximum(z, 0.0) if relu else z
    k, num_c = w2.shape
    free2 = np.ones((k + 1) * num_c, bool)
    if config.bias == "fixed":
        free2[k * num_c:] = False
    dmat = np.zeros((n_fail, k))
    best = None  # (num kept, eps, dl1, dl2, keep, alpha)
    tried = {}

    def candidate(alpha_pts, alpha_key):
        nonlocal best
        targets = s.copy()
        targets[:n_fail] += alpha_pts[:, None] * dmat
        m, r, row_pt = _last_rows(targets, y, w2, b2, margin, num_c)
        sub = {}
        dl2f, keep, status = _solve_lp_mode(m, r, row_pt, n_pts, free2,
                                            config, deadline, sub,
                                            bool(config.lazy))
        info["num_candidates"] += 1
        info["num_rounds"] += sub.get("num_rounds", 0)
        info["timed_out"] |= sub.get("timed_out", 0)
        if dl2f is None:
            tried[alpha_key] = np.inf
            return
        dl2 = np.zeros((k + 1) * num_c)
        dl2[free2] = dl2f
        eps2 = float(np.max(np.abs(dl2)))
        w2n = w2 + dl2[:k * num_c].reshape(k, num_c)
        b2n = b2 + dl2[k * num_c:]
        pts = np.nonzero(keep)[0]
        if not np.any(alpha_pts):  # α = 0: the last-layer query alone
            dl1, eps1 = None, 0.0
        else:
            bound = float(config.epsilon_max)
            if best is not None and best[0] == len(pts):
                bound = min(bound, best[1])
                if eps2 >= bound:
                    tried[alpha_key] = eps2
                    return
            # The LP starts with the points that the new last layer does
            # not yet classify with the margin (the rest join lazily).
            mg = _margin_min(_forward_sep(
                a[pts], z[pts], np.zeros((a.shape[1] + 1, k)), relu, w2n,
                b2n), y[pts])
            start = pts[mg < margin] if config.lazy else pts
            dl1, rounds, st1 = _solve_first(
                a, z, relu, w2n, b2n, y, pts, start, bound,
                config.bias == "own", margin, deadline)
            info["num_rounds"] += rounds
            if st1 == 1:
                info["timed_out"] = 1
            if dl1 is None:
                tried[alpha_key] = np.inf
                return
            eps1 = float(np.max(np.abs(dl1)))
        eps = max(eps1, eps2)
        tried[alpha_key] = eps
        if best is None or (len(pts), -eps) > (best[0], -best[1]):
            best = (len(pts), eps, dl1, dl2, keep, alpha_key, eps1, eps2)

    try:
        # Directions of the targets (the original last layer).
        dirs = _target_directions(s[:n_fail], y[:n_fail], w2, b2, margin,
                                  relu, deadline)
        for p, d_ in enumerate(dirs):
            if d_ is not None:
                dmat[p] = d_
        ones = np.array([d_ is not None for d_ in dirs], np.float64)
        candidate(0.0 * ones, 0.0)
        n_more = int(config.num_candidates)
        if config.search == "greedy":
            # α on [0, 1]: 1, 1/2, then bisect next to the best so far.
            for alpha in (1.0, 0.5)[:n_more]:
                candidate(alpha * ones, alpha)
            for _ in range(max(0, n_more - 2)):
                if info["timed_out"]:
                    break
                al = sorted(tried)
                i = al.index(min(al, key=lambda v: (tried[v], v)))
                gaps = [(al[j + 1] - al[j], j) for j in (i - 1, i)
                        if 0 <= j < len(al) - 1]
                if not gaps:
                    break
                g, j = max(gaps)
                alpha = (al[j] + al[j + 1]) / 2
                candidate(alpha * ones, alpha)
        else:  # random: one α per failing point, drawn with the key
            for i in range(n_more):
                u = np.asarray(jax.random.uniform(jax.random.fold_in(key, i),
                                                  (n_fail,)), np.float64)
                candidate(u * ones, -1.0 - i)
    except _Timeout:
        info["timed_out"] = 1
    if best is None:
        return None, None, np.ones(n_pts, bool), 2 if info["timed_out"] else 3
    _, eps, dl1, dl2, keep, alpha, eps1, eps2 = best
    info.update(alpha=float(alpha), epsilon_1=eps1, epsilon_2=eps2,
                objective=eps)
    return dl1, dl2, keep, 1


def _fix_multi_result(key, problem, config, deadline, info, x, y, si, li,
                      mask):
    """Runs :func:`_fix_multi` and writes both layers back."""
    model = problem.model
    variables = problem.variables
    params = variables["params"]
    n1, n2 = model.layers[si].name, model.layers[li].name
    p1 = models_base.get_layer_params(params, n1)
    p2 = models_base.get_layer_params(params, n2)
    t_build = time.perf_counter()
    in_fn = _linear.delta_jacobian_fns(model, si)[0]
    bs = int(config.batch_size)
    a = np.concatenate([np.asarray(in_fn(variables, x[i:i + bs]),
                                   np.float64).reshape(len(x[i:i + bs]), -1)
                        for i in range(0, len(y), bs)])
    w1 = np.asarray(p1["kernel"], np.float64)
    b1 = np.asarray(p1["bias"], np.float64)
    w2 = np.asarray(p2["kernel"], np.float64)
    b2 = np.asarray(p2["bias"], np.float64)
    z = a @ w1 + b1
    relu = any(s_.kind == "relu" for s_ in model.layers[si + 1:li])
    info["time_build_s"] = time.perf_counter() - t_build
    deadline = time.perf_counter() + float(config.time_limit_s)  # solving only
    n_fail = len(problem.failing)
    dl1, dl2, keep, status = _fix_multi(key, config, deadline, info, a, z,
                                        relu, w2, b2, y, n_fail,
                                        problem.num_classes)
    info["status"] = status
    info["time_solve_s"] = time.perf_counter() - t_build - info[
        "time_build_s"]
    if dl2 is None:
        return base.FixResult(variables, mask, info)
    k, num_c = w2.shape
    d2 = {"kernel": dl2[:k * num_c].reshape(k, num_c),
          "bias": dl2[k * num_c:]}
    d1 = None if dl1 is None else {"kernel": dl1[:-1], "bias": dl1[-1]}
    new_params = params
    for name, lp, dd in ((n1, p1, d1), (n2, p2, d2)):
        if dd is None:
            continue
        new_layer = {kk: (lp[kk] + jnp.asarray(dd[kk], lp[kk].dtype)
                          if kk in dd else lp[kk]) for kk in lp}
        new_params = models_base.set_layer_params(new_params, name,
                                                  new_layer)
    new_vars = dict(variables)
    new_vars["params"] = masks.select(mask, new_params, params)
    kx = np.nonzero(keep)[0]
    info.update(num_points=int(keep.sum()),
                num_dropped_failing=int((~keep[:n_fail]).sum()),
                num_dropped_passing=int((~keep[n_fail:]).sum()),
                epsilon=max(info["epsilon_1"], info["epsilon_2"]))
    logit_fn = models_base.jitted_apply(model)
    info["max_violation"] = _violation(
        np.asarray(logit_fn(new_vars, x[kx]), np.float64), y[kx],
        float(config.margin))
    q1 = models_base.get_layer_params(new_vars["params"], n1)
    q2 = models_base.get_layer_params(new_vars["params"], n2)
    dl1_32 = np.concatenate([np.asarray(q1["kernel"], np.float64) - w1,
                             (np.asarray(q1["bias"], np.float64) - b1)[None]])
    info["max_violation_float64"] = _violation(
        _forward_sep(a[kx], z[kx], dl1_32, relu,
                     np.asarray(q2["kernel"], np.float64),
                     np.asarray(q2["bias"], np.float64)), y[kx],
        float(config.margin))
    return base.FixResult(new_vars, mask, info)
