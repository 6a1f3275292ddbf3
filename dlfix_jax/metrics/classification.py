"""Accuracy, repair rate (RR) and negative flip rate (NFR).

Definitions (reference ``approaches.md`` §4):

* ACC = top-1 accuracy in %; ⇑ACC = (ACC_fixed − ACC_orig) / ACC_orig · 100.
* RR = |{x : M_o(x) ≠ y ∧ M_r(x) = y}| / |{x : M_o(x) ≠ y}| · 100.
* NFR = |{x : M_o(x) = y ∧ M_r(x) ≠ y}| / N · 100 (denominator: *all* inputs).

Functions take predicted labels so they work for any model source; the
``fixed`` predictions may carry a leading seed axis (S, N).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def accuracy(pred, y) -> jnp.ndarray:
    """Accuracy in % over the last axis; ``pred`` is (N,) or (S, N)."""
    return 100.0 * jnp.mean(jnp.asarray(pred) == jnp.asarray(y), axis=-1)


def relative_change(new, orig) -> jnp.ndarray:
    """(new − orig) / orig · 100 (⇑ACC); 0/0 gives 0, x/0 gives ±inf."""
    new, orig = jnp.asarray(new, jnp.float32), jnp.asarray(orig, jnp.float32)
    return jnp.where(orig == 0, jnp.where(new == orig, 0.0,
                                          jnp.sign(new - orig) * jnp.inf),
                     (new - orig) / jnp.where(orig == 0, 1.0, orig) * 100.0)


def relative_gain(orig, new) -> jnp.ndarray:
    """(orig − new) / orig · 100 (⇑ASR, ⇑AAOD: lower is better)."""
    return -relative_change(new, orig)


def flips(pred_orig, pred_fixed, y) -> dict[str, jnp.ndarray]:
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
    po, pf, y = jnp.asarray(pred_orig), jnp.asarray(pred_fixed), jnp.asarray(y)
    wrong_o = po != y
    right_f = pf == y
    repaired = jnp.sum(wrong_o & right_f, axis=-1)
    broken = jnp.sum(~wrong_o & ~right_f, axis=-1)
    n_wrong = jnp.sum(wrong_o)
    rr = jnp.where(n_wrong > 0, 100.0 * repaired / jnp.maximum(n_wrong, 1), 0.0)
    nfr = 100.0 * broken / y.shape[-1]
    return {"n": jnp.asarray(y.shape[-1]), "wrong_orig": n_wrong,
            "repaired": repaired, "broken": broken, "rr": rr, "nfr": nfr}


def to_python(d: dict) -> dict:
    """Converts a dict of arrays to JSON-friendly floats/ints/lists."""
    out = {}
    for k, v in d.items():
        a = np.asarray(v)
        if a.ndim == 0:
            out[k] = a.item()
        else:
            out[k] = a.tolist()
    return out
