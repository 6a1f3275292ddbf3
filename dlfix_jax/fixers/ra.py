"""RA (layer level): single-layer provable repair by linear programming.

**Interpretation.** The study's "RA" is not resolved by the reference
(``approaches.md`` §2 "RA": unresolved; observed behaviour: adaptable only to
sequential piecewise-linear models, seconds to minutes, small RR). Mapping it
to this method is **our interpretation**: PRDNN, M. Sotoudeh and A. V.
Thakur, "Provable Repair of Deep Neural Networks", PLDI 2021 (pointwise
repair of one layer), the most consistent candidate. The variant
options and their defaults below are likewise **an inference about an
unidentified method**, fitted to the study's observed numbers, not taken
from any paper or code.

**Default choice (issue 12).** Measured on the study's own MNIST LeNet5
(135 failing / 4,865 passing repair inputs; ``BENCHMARKS.md``, "RA
variants"), test ACC / RR / NFR: PRDNN's hard pointwise repair (κ = 0) of
all failing points 96.60 / 33.3 / 2.00; failing points only
(``num_passing=0``) 90.72 / 41.0 / 8.04; ℓ∞ 96.78 / 36.2 / 1.88;
passing-margin floors 1 and 3: NFR 1.16 and 1.24; 10 sampled failing
points (3 seeds) 97.82 / 14.0 / 0.37. Every hard variant repairs every point it is
given and, with all failing points, overfits. The study's RA row is
97.96 / 6.67 / 0.14: a small, conservative change. Soft constraints give
(κ: ACC / RR / NFR) 0.1: 97.92 / 2.9 / 0.04; 0.15: 97.94 / 3.8 / 0.04;
**0.2: 98.02 / 8.6 / 0.06**; 0.25: 98.06 / 11.4 / 0.08; 0.5: 98.16 /
20.0 / 0.16; 1: 98.08 / 24.8 / 0.34; 2: 97.84 / 31.4 / 0.72. κ = 0.2 is
the closest measured to the study's row (RR within 2 points, NFR within
0.1), is deterministic (key-free) and keeps the passing-point guarantee
exactly, so it is the default. It is a calibration to one model, not a
constant of the method: on the small test models κ = 0.2 repairs nothing
(a point there is repaired from κ ≈ 0.5–1 on). One observation it does
not match: the study's RA raised the attack success rate by ~10 points
(ASR 89.20, ⇑ASR −10.26); κ = 0.2 leaves it about unchanged (80.0 vs
79.6), while the hard repair raises it as much (94.0 vs 82.6), with 14×
the study's NFR.

Time (same model, 2 shared CPU cores, steady state): build (Jacobians,
rows) 1.5–3 s, HiGHS 0.5 s at κ = 0.2 (one LP of 1,310 rows) and 3 s
hard (5 LPs, last 1,759 rows) where one LP over all 45,000 rows took
17 s quiet / 47–177 s under load; the first call adds 3–10 s of JIT
compilation.

Method (pointwise PRDNN repair of one Dense/Conv layer ℓ):

* **Decoupled network.** The activation pattern (ReLU on/off states and
  max-pool argmax selections) is frozen at the *original* network's values on
  each repair point, while values flow through the repaired layer. Layers
  before ℓ are unchanged, so layer ℓ's input ``a`` is fixed; everything after
  ℓ is then an affine map ``A_x`` of layer ℓ's output (the linearisation of
  the piecewise-linear tail at the original point, computed exactly with
  ``jax.jvp``). Layer ℓ is affine in its parameters, so the logits are
  affine in the change Δ = (ΔW, Δb)::

      logits(Δ) = logits_0 + A_x · layer_ℓ(a; ΔW, Δb)

  The coefficient matrix is the Jacobian of that linear map
  (``jax.jacrev``, exact because the map is linear). For the last Dense layer
  (the default) ``A_x`` is the identity and the decoupled network *is* the
  network.
* **LP** (HiGHS dual simplex via ``scipy.optimize.linprog(method=
  "highs")``): minimise ``‖Δ‖₁`` (``norm="l1"``, default; Δ = u − v,
  u, v ≥ 0) or ``‖Δ‖∞`` (``norm="linf"``) subject to
  ``logit_y(Δ) − logit_j(Δ) ≥ margin`` for every class j ≠ y on every
  constrained point; with soft constraints (below) plus
  ``Σ_p λ_p s_p``.
* **Points.** Every failing repair input (``num_failing = -1``; ``n ≥ 0``:
  a key-chosen sample of n), plus the passing repair inputs:
  ``num_passing = -1`` (default) takes all of them, ``n > 0`` a random
  sample of n drawn with the key. PRDNN repairs exactly the point set it is
  given; the passing points are there so that the repair keeps them correct
  (the study's NFR). The samples are the only use of the key: with the
  defaults the fix is key-free (all seeds give the same model, as a
  deterministic LP should).
* **Soft constraints** (``slack_penalty`` κ; default 0.2, **our choice**,
  see above; 0 = hard, PRDNN's pointwise repair). Each *failing* point p
  gets one slack s_p ≥ 0 shared by its C − 1 rows
  (``margin_p,j(Δ) + s_p ≥ margin``); the objective adds Σ_p λ_p·s_p. At
  the optimum s_p is exactly p's largest margin shortfall, so a failing
  point is repaired (to the margin) iff s_p = 0; ``info["slack"]`` holds
  the s_p and ``num_repaired_lp`` counts the zeros. *Passing points stay
  hard*: "every constrained passing point keeps its margin" still holds
  exactly; what is given up is "every failing point is repaired". The
  price is relative, so κ means the same on any model and either norm:
  λ_p = κ / min_j ‖m_p,j‖_*, where 1 / ‖m‖_* (dual norm: ‖·‖∞ for ℓ1,
  ‖·‖₁ for ℓ∞) is the least ‖Δ‖ that raises that one row by one unit of
  margin. So a failing point is repaired only when its share of the joint
  repair costs at most κ times the repair of its hardest row alone.
* **Margin floor on passing points** (``passing_margin``; < 0, default: a
  passing row asks ``margin`` like a failing one). With a floor f ≥ 0 each
  passing point keeps margin ≥ min(its original margin, f), so the repair
  cannot push passing points to the decision boundary.
* **Constraint generation** (``solver="cg"``, default; ``"full"``: one LP
  with every row). Every row is built (the build is cheap); the first LP
  takes the failing points' rows and the passing rows within
  ``cg_init_slack`` (1.0) of binding at Δ = 0; the rows its solution
  violates by more than ``lp_tol`` (1e-7, HiGHS's feasibility tolerance)
  are added and the LP re-solved until none is
  (:func:`dlfix_jax.fixers._linear.solve_lp_rows`). The result satisfies
  every row and is optimal for the full LP (the same objective; possibly
  another optimal vertex when the optimum is not unique), so this changes
  speed, not the method. On the study's MNIST LeNet5 (45,000 rows × 1,700
  columns) it solves 1–5 LPs of ~1,300–1,800 rows instead of one of 45,000.
* **Margin** δ = ``margin`` (1e-2): small against LeNet5 logit scales
  (~10) but well above float32 rounding of the repaired logits (~1e-5),
  so the float64 LP solution still classifies correctly in float32.
* **Size limit.** The constraint matrix is built sparse, batch by batch
  (exact zeros dropped: a last-Dense row has 2(d+1) nonzeros); more than
  ``max_lp_size`` (1e8) nonzeros (×2 for the l1 split Δ = u − v), and
  infeasible LPs, raise ``RuntimeError`` naming the numbers (the runner
  records a failure).

Only layer ℓ's ``kernel`` and ``bias`` change; every other variable is
returned bit-for-bit unchanged. Applicable to sequential models whose layers
are all conv / dense / bn / relu / maxpool / avgpool / flatten / dropout /
gap (others are *unadaptable* with the reason).

Deviations from PRDNN: PRDNN returns the decoupled network (a different
architecture) and so keeps its guarantee for any layer; we write Δ back into
the ordinary network, which equals the decoupled one for the last layer.
For an earlier layer the repaired layer can flip downstream activation
patterns, so the guarantee holds for the decoupled network only;
``info["max_violation"]`` reports what the ordinary network achieves and
``info["max_violation_decoupled"]`` what the LP guarantees. PRDNN's
polytope (V-)repair is not implemented; only pointwise repair. The default
soft constraints (κ = 0.2) are not PRDNN's hard pointwise repair: failing
points may stay unrepaired (reported in ``info["slack"]``); κ = 0 restores
PRDNN's setting. (The issue notes PRDNN supports soft constraints; our
one-slack-per-point ℓ1 penalty is our formulation, not checked against
PRDNN's code.) Constraint generation is ours (an exact speed-up).

``mask``: the repaired layer's kernel and bias. ``info``: ``layer_index``
(into the model's layers), ``lp_status`` (code into
:data:`dlfix_jax.fixers._linear.LP_STATUS`; -1: nothing to do), ``objective``,
``num_constraints``, ``num_variables``, ``constraint_nonzeros``,
``num_failing``, ``num_passing``, ``max_violation`` (max over constrained
points and classes of ``max(0, required margin − actual margin − slack)``
after repair, float32 network), ``max_violation_decoupled`` (the same in
float64 over the LP's rows), ``slack`` (per constrained failing point;
zeros when hard), ``slack_total``, ``num_repaired_lp`` (failing points with
zero slack), ``lp_rounds`` (LPs solved), ``lp_rows`` (rows in the last LP),
and the phase times ``time_build_s`` (Jacobians and constraint rows) and
``time_lp_s`` (HiGHS, all rounds).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.sparse

from dlfix_jax import masks
from dlfix_jax import predict as predict_lib
from dlfix_jax.fixers import _linear
from dlfix_jax.fixers import base
from dlfix_jax.models import base as models_base

REPAIRABLE_KINDS = ("dense", "conv")
NORMS = ("l1", "linf")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.layer = ""            # "" = the last Dense layer
    c.norm = "l1"           # "l1" | "linf"
    c.margin = 1e-2
    c.num_passing = -1      # passing repair inputs kept as constraints; -1 = all
    c.num_failing = -1      # failing repair inputs repaired; -1 = all
    c.max_lp_size = int(1e8)  # nonzeros of the LP's constraint matrix
    c.batch_size = 256      # points per Jacobian batch
    # Issue-12 variants (module docstring: soft constraints, margin floor,
    # constraint generation; default choice under "Default choice").
    c.slack_penalty = 0.2   # κ; 0: hard constraints; > 0: failing points soft
    c.passing_margin = -1.0  # < 0: passing rows ask `margin`; >= 0: floor
    c.solver = "cg"         # "cg": constraint generation; "full": one LP
    c.cg_init_slack = 1.0   # cg: first LP takes passing rows within this
    c.lp_tol = 1e-7         # cg: row violation that counts (HiGHS's tol)
    return c


def check_config(cfg) -> None:
    base.check_ranges(cfg, norm=set(NORMS), margin=(0.0, None),
                      num_passing=(-1, None), num_failing=(-1, None),
                      max_lp_size=(1, None),
                      batch_size=(1, None), slack_penalty=(0.0, None),
                      solver={"cg", "full"}, cg_init_slack=(0.0, None),
                      lp_tol=(0.0, None), passing_margin=(-1.0, None))


def applicable(info: base.ProblemInfo) -> str | None:
    """None when RA can repair the model; otherwise the reason."""
    model = info.model
    reason = _linear.piecewise_linear_reason(model, "the decoupled network "
                                             "needs")
    if reason:
        return reason
    return None


def _layer_index(model, name: str) -> int:
    return _linear.layer_index(model, name, REPAIRABLE_KINDS, "RA",
                               verb="repaired")


def margins(model, variables, x, y) -> np.ndarray:
    """(N, C) logit_y − logit_j of ``variables`` on (x, y) (float32 network)."""
    logits = predict_lib.logits(model, variables, x).astype(np.float64)
    y = np.asarray(y)
    return logits[np.arange(len(y)), y][:, None] - logits


def _row_classes(y, num_classes) -> np.ndarray:
    """The class j of each row of :func:`_linear.margin_rows` for labels y
    (rows run over j, then over the points with y != j)."""
    return np.concatenate([np.full(int(np.sum(y != j)), j, np.int64)
                           for j in range(num_classes)])


@base.register("ra", level="layer", abbrev="RA", vmappable=False,
               paper="Sotoudeh & Thakur, 'Provable Repair of Deep Neural "
                     "Networks' (PRDNN), PLDI 2021 -- our interpretation of "
                     "the study's 'RA'",
               default_config=default_config, applicable=applicable,
               check_config=check_config,
               codes={"lp_status": _linear.LP_STATUS})
def fix(key: jax.Array, problem: base.Problem,
        config: ml_collections.ConfigDict) -> base.FixResult:
    """RA (PRDNN-style pointwise LP repair); see the module docstring."""
    model = problem.model
    reason = applicable(problem.info)
    if reason:
        raise ValueError(f"RA is not applicable: {reason}")
    li = _layer_index(model, config.layer)
    name = model.layers[li].name
    variables = problem.variables
    params = variables["params"]
    lparams = models_base.get_layer_params(params, name)
    mask = masks.layer_mask(params, name)
    penalty = float(config.slack_penalty)

    # The constrained points: all failing (or a key-chosen sample of
    # num_failing) + a key-chosen sample of passing.
    n_fail = len(problem.failing)
    x, y, k = _linear.constrained_points(key, problem,
                                         int(config.num_passing))
    if 0 <= int(config.num_failing) < n_fail:
        # fold_in keeps the passing sample the same as without the option.
        sel = np.sort(np.asarray(jax.random.choice(
            jax.random.fold_in(key, 1), n_fail, (int(config.num_failing),),
            replace=False)))
        keep = np.concatenate([sel, np.arange(n_fail, len(y))])
        x, y, n_fail = x[keep], y[keep], len(sel)
    nc_rows = len(y) * (problem.num_classes - 1)
    nv = int(sum(np.size(v) for v in lparams.values()))
    n_slack = n_fail if penalty > 0 else 0
    info = {"layer_index": li, "num_failing": n_fail, "num_passing": int(k),
            "num_variables": nv * (2 if config.norm == "l1" else 1)
            + (1 if config.norm == "linf" else 0) + n_slack,
            "num_constraints": nc_rows, "margin": float(config.margin)}
    if n_fail == 0:
        info.update(lp_status=-1, objective=0.0, max_violation=0.0,
                    max_violation_decoupled=0.0, constraint_nonzeros=0,
                    lp_rounds=0, lp_rows=0, num_repaired_lp=0,
                    slack=np.zeros(0), slack_total=0.0,
                    time_build_s=0.0, time_lp_s=0.0)
        return base.FixResult(variables, mask, info)

    # Jacobian of the (linear) decoupled logit change w.r.t. the flat Δ.
    t_build = time.perf_counter()
    _, jac_fn, unravel, nv = _linear.delta_jacobian_fns(model, li)
    in_logit_fn = _linear.layer_input_and_logits_fn(model, li)
    bs = int(config.batch_size)
    zero = jnp.zeros((nv,), jnp.float32)
    # Constraint rows are built batch by batch and kept sparse (exact zeros
    # dropped): for the last Dense layer a row has only 2(d+1) nonzeros, so
    # VGG16's 512->10 layer on 5,000 points needs ~50 MB, not ~2 GB dense.
    blocks, rhs, pts, cls, logits, nnz = [], [], [], [], [], 0
    width = 2 if config.norm == "l1" else 1
    for i in range(0, len(y), bs):
        xb = x[i:i + bs]
        a_b, logit_b = in_logit_fn(variables, xb)
        jac_b = np.asarray(jac_fn(variables, a_b, zero), np.float64)
        logit_b = np.asarray(logit_b, np.float64)
        m_b, r_b, p_b = _linear.margin_rows(jac_b, logit_b, y[i:i + bs],
                                            float(config.margin),
                                            problem.num_classes,
                                            return_points=True)
        m_b = scipy.sparse.csr_matrix(m_b)
        nnz += m_b.nnz
        if width * nnz > int(config.max_lp_size):
            raise RuntimeError(
                f"RA: LP too large for layer {name!r}: more than "
                f"{int(config.max_lp_size):.3g} constraint-matrix nonzeros "
                f"(max_lp_size) after {i + len(xb)} of {len(y)} points "
                f"({nv} layer parameters, {nc_rows} constraints); lower "
                f"num_passing or pick a later layer")
        blocks.append(m_b)
        rhs.append(r_b)
        pts.append(p_b + i)
        cls.append(_row_classes(y[i:i + bs], problem.num_classes))
        logits.append(logit_b)
    m = scipy.sparse.vstack(blocks, format="csr")
    r = np.concatenate(rhs)
    pt = np.concatenate(pts)
    cls = np.concatenate(cls)
    logits = np.concatenate(logits)
    # Original margins logit_y − logit_j per row and the margin each row asks.
    orig = float(config.margin) - r
    need = np.full(len(r), float(config.margin))
    passing = pt >= n_fail
    if config.passing_margin >= 0:
        # Margin floor: a passing point keeps min(its margin, the floor).
        lg_y = logits[np.arange(len(y)), y][:, None] - logits
        lg_y[np.arange(len(y)), y] = np.inf
        floor = np.minimum(lg_y.min(axis=1), float(config.passing_margin))
        need[passing] = floor[pt[passing]]
    r = need - orig
    info["constraint_nonzeros"] = int(m.nnz)
    info["time_build_s"] = time.perf_counter() - t_build

    t_lp = time.perf_counter()
    groups = (np.where(passing, -1, pt) if penalty > 0 else None)
    prices = 0.0
    if penalty > 0:
        # Relative price: κ times the cost of repairing the point alone by
        # one unit of margin in its hardest row, 1 / ‖row‖_* (the dual norm:
        # ‖·‖∞ for an l1 objective, ‖·‖₁ for linf).
        fr = np.nonzero(~passing)[0]
        mf = abs(m[fr])
        dual = np.asarray(mf.max(axis=1).toarray() if config.norm == "l1"
                          else mf.sum(axis=1)).ravel()
        d_p = np.full(n_fail, np.inf)
        np.minimum.at(d_p, pt[fr], dual)
        prices = penalty / np.maximum(d_p, 1e-12)
    initial = None
    if config.solver == "cg":
        initial = (~passing) | (r > -float(config.cg_init_slack))
    delta, slack, res, stats = _linear.solve_lp_rows(
        m, r, config.norm, groups=groups, penalty=prices, initial=initial,
        tol=float(config.lp_tol))
    info.update(lp_status=int(res.status), lp_rounds=stats["rounds"],
                lp_rows=stats["rows"], time_lp_s=time.perf_counter() - t_lp)
    if res.status != 0 or delta is None:
        raise RuntimeError(
            f"RA: the LP for layer {name!r} was not solved (HiGHS status "
            f"{res.status}: {res.message}); {n_fail} failing + {k} passing "
            f"points, margin {config.margin}")
    if penalty == 0:
        slack = np.zeros(n_fail)
    info["objective"] = float(res.fun)
    info["slack"] = slack
    info["slack_total"] = float(slack.sum())
    info["num_repaired_lp"] = int(np.sum(slack <= float(config.lp_tol)))
    info["max_violation_decoupled"] = stats["max_violation"]

    d = unravel(jnp.asarray(delta, jnp.float32))
    new_layer = {kk: (lparams[kk] + jnp.asarray(d[kk], lparams[kk].dtype)
                      if kk in d else lparams[kk]) for kk in lparams}
    new_vars = dict(variables)
    new_vars["params"] = masks.select(
        mask, models_base.set_layer_params(params, name, new_layer), params)
    # What the float32 network achieves, row by row (slack subtracted).
    mg = margins(model, new_vars, x, y)
    viol = need - mg[pt, cls]
    viol[~passing] -= slack[pt[~passing]]
    info["max_violation"] = float(max(0.0, viol.max(initial=0.0)))
    return base.FixResult(new_vars, mask, info)
