"""Accuracy, repair rate (RR) and negative flip rate (NFR).

Definitions (reference ``approaches.md`` §4):

* ACC = top-1 accuracy in %; ⇑ACC = (ACC_fixed − ACC_orig) / ACC_orig · 100.
* RR = |{x : M_o(x) ≠ y ∧ M_r(x) = y}| / |{x : M_o(x) ≠ y}| · 100.
* NFR = |{x : M_o(x) = y ∧ M_r(x) ≠ y}| / N · 100 (denominator: *all* inputs).

Functions take predicted labels so they work for any model source; the
``fixed`` predictions may carry a leading seed axis (S, N). With NumPy (or
Python) inputs they compute in NumPy float64, so reported numbers are exact
ratios of counts (15/200 → 7.5, not float32's 7.4999995); with JAX arrays
(including tracers under ``jit``) they use ``jax.numpy``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dlfix_jax import fileio


def _xp(*arrays):
    """``jax.numpy`` if any input is a JAX array (or tracer), else NumPy."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def accuracy(pred, y):
    """Accuracy in % over the last axis; ``pred`` is (N,) or (S, N)."""
    xp = _xp(pred, y)
    pred, y = xp.asarray(pred), xp.asarray(y)
    return 100.0 * xp.sum(pred == y, axis=-1) / y.shape[-1]


def relative_change(new, orig):
    """(new − orig) / orig · 100 (⇑ACC); 0/0 gives 0, x/0 gives ±inf."""
    xp = _xp(new, orig)
    dt = jnp.float32 if xp is jnp else np.float64
    new, orig = xp.asarray(new, dt), xp.asarray(orig, dt)
    with np.errstate(invalid="ignore", divide="ignore"):
        return xp.where(orig == 0, xp.where(new == orig, 0.0,
                                            xp.sign(new - orig) * xp.inf),
                        (new - orig) / xp.where(orig == 0, 1.0, orig) * 100.0)


def relative_gain(orig, new):
    """(orig − new) / orig · 100 (⇑ASR, ⇑AAOD: lower is better)."""
    return -relative_change(new, orig)


def flips(pred_orig, pred_fixed, y) -> dict:
    """Repair/break counts and rates of fixed predictions against the original.

    Args:
      pred_orig: (N,) original predictions.
      pred_fixed: (N,) or (S, N) fixed predictions.
      y: (N,) labels.

    Returns:
      dict with ``n`` (N), ``wrong_orig`` (count), ``repaired`` and ``broken``
      counts, ``rr`` and ``nfr`` in % (each (S,) when stacked). RR is 0 when
      the original model makes no mistake.
    """
    xp = _xp(pred_orig, pred_fixed, y)
    po, pf, y = xp.asarray(pred_orig), xp.asarray(pred_fixed), xp.asarray(y)
    wrong_o = po != y
    right_f = pf == y
    repaired = xp.sum(wrong_o & right_f, axis=-1)
    broken = xp.sum(~wrong_o & ~right_f, axis=-1)
    n_wrong = xp.sum(wrong_o)
    rr = xp.where(n_wrong > 0, 100.0 * repaired / xp.maximum(n_wrong, 1), 0.0)
    nfr = 100.0 * broken / y.shape[-1]
    return {"n": xp.asarray(y.shape[-1]), "wrong_orig": n_wrong,
            "repaired": repaired, "broken": broken, "rr": rr, "nfr": nfr}


def to_python(d: dict) -> dict:
    """Converts a dict of arrays to JSON-friendly floats/ints/lists;
    non-finite floats (NaN: undefined, ±inf: a division by zero) become
    None (:func:`dlfix_jax.fileio.json_safe`), so the result is valid JSON."""
    out = {}
    for k, v in d.items():
        a = np.asarray(v)
        out[k] = fileio.json_safe(a.item() if a.ndim == 0 else a.tolist())
    return out
