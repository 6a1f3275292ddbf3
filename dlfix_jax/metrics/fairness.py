"""Average absolute odds difference (AAOD) between two groups.

Definition (reference ``approaches.md`` §4): for every class c, one-vs-rest,
compute the true- and false-positive rates of each group g ∈ {0, 1}:

  TPR_c,g = |{pred = c ∧ y = c ∧ group = g}| / |{y = c ∧ group = g}|
  FPR_c,g = |{pred = c ∧ y ≠ c ∧ group = g}| / |{y ≠ c ∧ group = g}|

(a zero denominator gives a rate of 0), then

  AAOD = ½ · ( mean_c |TPR_c,0 − TPR_c,1| + mean_c |FPR_c,0 − FPR_c,1| ).

AAOD is a fraction in [0, 1] (the paper's tables print it that way, e.g.
UTKFace AAOD_o ≈ 0.0202). On a binary task the one-vs-rest mean over both
classes equals AIF360's ``average_abs_odds_difference``,
½·(|FPR_unpriv − FPR_priv| + |TPR_unpriv − TPR_priv|) with class 1 positive,
because TPR of class 0 is 1 − FPR of class 1 and FPR of class 0 is 1 − TPR
of class 1 (when no denominator is zero).

⇑AAOD = (AAOD_o − AAOD_r)/AAOD_o·100 (:func:`classification.relative_gain`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("num_classes",))
def odds_rates(pred, y, group, num_classes: int):
    """Per-group one-vs-rest TPR and FPR.

    Args:
      pred: (N,) or (S, N) predicted labels.
      y: (N,) labels.
      group: (N,) group ids in {0, 1}.
      num_classes: number of classes C.

    Returns:
      (tpr, fpr), each (..., 2, C): rate per group and class.
    """
    pred = jnp.asarray(pred)
    y = jnp.asarray(y)
    group = jnp.asarray(group)
    classes = jnp.arange(num_classes)
    p = pred[..., None, :] == classes[:, None]            # (..., C, N)
    t = (y[None, :] == classes[:, None])                  # (C, N)
    g = jnp.stack([group == 0, group == 1])               # (2, N)
    pos = g[:, None, :] & t[None]                          # (2, C, N)
    neg = g[:, None, :] & ~t[None]
    p = p[..., None, :, :]                                 # (..., 1, C, N)
    tp = jnp.sum(p & pos, axis=-1)
    fp = jnp.sum(p & neg, axis=-1)
    n_pos = jnp.sum(pos, axis=-1)
    n_neg = jnp.sum(neg, axis=-1)

    def rate(a, b):
        return jnp.where(b > 0, a / jnp.maximum(b, 1), 0.0)

    return rate(tp, n_pos), rate(fp, n_neg)


def aaod(pred, y, group, num_classes: int) -> jnp.ndarray:
    """AAOD (fraction) of (N,) or (S, N) predictions; see module docstring.

    Raises:
      ValueError: ``group`` is missing or holds ids other than 0 and 1.
    """
    if group is None:
        raise ValueError("AAOD needs a sensitive-attribute group array; the "
                         "dataset has none")
    gs = set(jnp.unique(jnp.asarray(group)).tolist())
    if not gs <= {0, 1}:
        raise ValueError(f"group ids must be 0/1, got {sorted(gs)}")
    tpr, fpr = odds_rates(pred, y, group, num_classes)
    d_tpr = jnp.mean(jnp.abs(tpr[..., 0, :] - tpr[..., 1, :]), axis=-1)
    d_fpr = jnp.mean(jnp.abs(fpr[..., 0, :] - fpr[..., 1, :]), axis=-1)
    return 0.5 * (d_tpr + d_fpr)
