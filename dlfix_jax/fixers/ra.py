"""RA (layer level): single-layer provable repair by linear programming.

**Interpretation.** The study's "RA" is not resolved by the reference
(``approaches.md`` §2 "RA": unresolved; observed behaviour: adaptable only to
sequential piecewise-linear models, seconds to minutes, small RR). Mapping it
to this method is **our interpretation**: PRDNN, M. Sotoudeh and A. V.
Thakur, "Provable Repair of Deep Neural Networks", PLDI 2021 (pointwise
repair of one layer), the most consistent candidate.

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
* **LP** (HiGHS via ``scipy.optimize.linprog(method="highs")``): minimise
  ``‖Δ‖₁`` (``norm="l1"``, default; Δ = u − v, u, v ≥ 0) or ``‖Δ‖∞``
  (``norm="linf"``) subject to ``logit_y(Δ) − logit_j(Δ) ≥ margin`` for every
  class j ≠ y on every constrained point.
* **Points.** Every failing repair input, plus the passing repair inputs:
  ``num_passing = -1`` (default) takes all of them, ``n > 0`` a random
  sample of n drawn with the key. PRDNN repairs exactly the point set it is
  given; the passing points are there so that the repair keeps them correct
  (the study's NFR). The sample is the only use of the key: with the
  default the fix is key-free (all seeds give the same model, as a
  deterministic LP should). Measured on MNIST/LeNet5 (68 failing): all
  4,932 passing points give test NFR 0.70% / ACC 98.30% (orig 98.38%),
  500 sampled points give NFR 2.30% / ACC 96.65%.
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
polytope (V-)repair is not implemented; only pointwise repair.

``mask``: the repaired layer's kernel and bias. ``info``: ``layer_index``
(into the model's layers), ``lp_status`` (code into
:data:`dlfix_jax.fixers._linear.LP_STATUS`; -1: nothing to do), ``objective``,
``num_constraints``, ``num_variables``, ``constraint_nonzeros``,
``num_failing``, ``num_passing``, ``max_violation`` (max over constrained
points and classes of ``max(0, margin − actual margin)`` after repair,
float32 network), ``max_violation_decoupled``, and the phase times
``time_build_s`` (Jacobians and constraint rows) and ``time_lp_s`` (HiGHS).
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
    c.max_lp_size = int(1e8)  # nonzeros of the LP's constraint matrix
    c.batch_size = 256      # points per Jacobian batch
    return c


def check_config(cfg) -> None:
    base.check_ranges(cfg, norm=set(NORMS), margin=(0.0, None),
                      num_passing=(-1, None), max_lp_size=(1, None),
                      batch_size=(1, None))


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

    # The constrained points: all failing + a key-chosen sample of passing.
    n_fail = len(problem.failing)
    x, y, k = _linear.constrained_points(key, problem,
                                         int(config.num_passing))
    nc_rows = len(y) * (problem.num_classes - 1)
    nv = int(sum(np.size(v) for v in lparams.values()))
    info = {"layer_index": li, "num_failing": n_fail, "num_passing": int(k),
            "num_variables": nv * (2 if config.norm == "l1" else 1)
            + (1 if config.norm == "linf" else 0),
            "num_constraints": nc_rows, "margin": float(config.margin)}
    if n_fail == 0:
        info.update(lp_status=-1, objective=0.0, max_violation=0.0,
                    max_violation_decoupled=0.0, constraint_nonzeros=0,
                    time_build_s=0.0, time_lp_s=0.0)
        return base.FixResult(variables, mask, info)

    # Jacobian of the (linear) decoupled logit change w.r.t. the flat Δ.
    t_build = time.perf_counter()
    in_fn, jac_fn, unravel, nv = _linear.delta_jacobian_fns(model, li)
    logit_fn = models_base.jitted_apply(model)
    bs = int(config.batch_size)
    zero = jnp.zeros((nv,), jnp.float32)
    # Constraint rows are built batch by batch and kept sparse (exact zeros
    # dropped): for the last Dense layer a row has only 2(d+1) nonzeros, so
    # VGG16's 512->10 layer on 5,000 points needs ~50 MB, not ~2 GB dense.
    blocks, rhs, nnz = [], [], 0
    width = 2 if config.norm == "l1" else 1
    for i in range(0, len(y), bs):
        xb = x[i:i + bs]
        jac_b = np.asarray(jac_fn(variables, in_fn(variables, xb), zero),
                           np.float64)
        logit_b = np.asarray(logit_fn(variables, xb), np.float64)
        m_b, r_b = _linear.margin_rows(jac_b, logit_b, y[i:i + bs],
                                       float(config.margin),
                                       problem.num_classes)
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
    m = scipy.sparse.vstack(blocks, format="csr")
    r = np.concatenate(rhs)
    info["constraint_nonzeros"] = int(m.nnz)
    info["time_build_s"] = time.perf_counter() - t_build

    t_lp = time.perf_counter()
    delta, res = _linear.solve_lp(m, r, config.norm)
    info.update(lp_status=int(res.status),
                time_lp_s=time.perf_counter() - t_lp)
    if res.status != 0 or delta is None:
        raise RuntimeError(
            f"RA: the LP for layer {name!r} was not solved (HiGHS status "
            f"{res.status}: {res.message}); {n_fail} failing + {k} passing "
            f"points, margin {config.margin}")
    info["objective"] = float(res.fun)
    info["max_violation_decoupled"] = float(max(0.0, np.max(r - m @ delta)))

    d = unravel(jnp.asarray(delta, jnp.float32))
    new_layer = {kk: (lparams[kk] + jnp.asarray(d[kk], lparams[kk].dtype)
                      if kk in d else lparams[kk]) for kk in lparams}
    new_vars = dict(variables)
    new_vars["params"] = masks.select(
        mask, models_base.set_layer_params(params, name, new_layer), params)
    mg = margins(model, new_vars, x, y)
    mg[np.arange(len(y)), y] = np.inf
    info["max_violation"] = float(max(0.0, np.max(float(config.margin) - mg)))
    return base.FixResult(new_vars, mask, info)
