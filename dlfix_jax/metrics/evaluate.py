"""All metrics of the study for an original model and S fixed models at once.

:func:`evaluate_models` is what the study runner and
``experiments/evaluate.py`` call: it predicts the test split with the
original model and every fixed model (stacked models share one seed-axis
execution strategy, see :mod:`dlfix_jax.seed_axis`), then computes ACC,
⇑ACC, RR, NFR and, on request, ASR/⇑ASR (:mod:`.pgd`) and AAOD/⇑AAOD
(:mod:`.fairness`). Results are JSON-friendly Python values; per-fixed-model
values are lists of length S in seed order.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from dlfix_jax.metrics import classification, fairness, pgd
from dlfix_jax import seed_axis as seeds


def _resolve_data(data, dataset_name):
    """(x, y, group, name, num_classes or None) from a Dataset or Split."""
    if hasattr(data, "test") and hasattr(data, "num_classes"):
        split = data.test
        return (split.x, split.y, split.group, dataset_name or data.name,
                data.num_classes)
    if hasattr(data, "x") and hasattr(data, "y"):
        return data.x, data.y, getattr(data, "group", None), dataset_name, None
    raise TypeError("data must be a Dataset (its test split is used) or a "
                    f"Split with x, y (and group); got {type(data).__name__}")


def evaluate_models(key: jax.Array, model_o, vars_o, fixed, data, *,
                    asr: bool = False, aaod: bool = False,
                    eps: float | None = None, softmax: bool | None = None,
                    n_samples: int = pgd.N_SAMPLES, strategy: str = "auto",
                    dataset_name: str | None = None,
                    num_classes: int | None = None, batch_size: int = 256,
                    pgd_batch_size: int = 500) -> dict[str, Any]:
    """Evaluates an original model against S fixed models.

    Args:
      key: PRNG key (used by ASR only: sample draw and random start).
      model_o, vars_o: the original model and variables.
      fixed: the fixed models: a list of ``(model, variables)`` pairs (models
        may differ, e.g. each loaded from its own Keras file; consecutive
        pairs of one architecture are stacked), a ``(model, stacked)`` tuple,
        or a stacked variable tree of ``model_o``'s architecture.
      data: a ``Dataset`` (its ``test`` split is used) or a ``Split``.
      asr: also run PGD and report ASR.
      aaod: also report AAOD (needs ``group`` in the split).
      eps: PGD radius; default :data:`pgd.EPSILONS` of the dataset.
      softmax: attack probabilities; default ``model_o.output_softmax``.
      n_samples: inputs to attack.
      strategy: seed strategy ("auto", "sequential", "vmap", "lax_map").
      dataset_name: name for the ε lookup when ``data`` is a Split.
      num_classes: default ``model_o.num_classes``.
      batch_size, pgd_batch_size: inputs per compiled call.

    Returns:
      dict with ``n_test``, ``n_fixed`` (S), ``acc_orig``, ``acc`` (S),
      ``d_acc`` (S, ⇑ACC %), ``wrong_orig``, ``repaired``/``broken`` (S
      counts), ``rr``/``nfr`` (S, %), ``finite_orig``/``finite`` (all logits
      finite), and when asked ``asr_orig``, ``asr``, ``d_asr``,
      ``asr_samples``, ``eps``, ``softmax``; ``aaod_orig``, ``aaod``,
      ``d_aaod``.

    Raises:
      ValueError: AAOD requested on data without groups; ASR requested
        without ``eps`` on a dataset with no default ε.
    """
    x, y, group, name, nc = _resolve_data(data, dataset_name)
    num_classes = num_classes or nc or model_o.num_classes
    if aaod and group is None:
        raise ValueError(f"AAOD needs sensitive-attribute groups, but the "
                         f"{name or 'given'} test split has no group array")
    if asr and eps is None:
        if name is None:
            raise ValueError("ASR needs eps (or a dataset name to look up "
                             "its default epsilon)")
        eps = pgd.epsilon_for(name)
    if softmax is None:
        softmax = bool(model_o.output_softmax)
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int32)

    groups = seeds.group_models(fixed, model_o)
    stacked_o = jax.tree_util.tree_map(lambda a: np.asarray(a)[None], vars_o)
    po, fo = seeds.predict_stack(model_o, stacked_o, x, batch_size,
                                 "sequential", return_finite=True)
    po, fo = po[0], fo[0]
    preds, fins = [], []
    for m, st, _ in groups:
        p, f = seeds.predict_stack(m, st, x, batch_size, strategy,
                                   return_finite=True)
        preds.append(p)
        fins.append(f)
    pf = seeds.scatter_groups(groups, preds)
    ff = seeds.scatter_groups(groups, fins)

    acc_o = classification.accuracy(po, y)
    acc_f = classification.accuracy(pf, y)
    fl = classification.flips(po, pf, y)
    out: dict[str, Any] = {
        "n_test": int(len(y)), "n_fixed": int(pf.shape[0]),
        "acc_orig": acc_o, "acc": acc_f,
        "d_acc": classification.relative_change(acc_f, acc_o),
        "wrong_orig": fl["wrong_orig"], "repaired": fl["repaired"],
        "broken": fl["broken"], "rr": fl["rr"], "nfr": fl["nfr"],
        "finite_orig": bool(np.all(fo)), "finite": np.all(ff, axis=1),
    }
    if aaod:
        a_o = fairness.aaod(po, y, group, num_classes)
        a_f = fairness.aaod(pf, y, group, num_classes)
        out.update(aaod_orig=a_o, aaod=a_f,
                   d_aaod=classification.relative_gain(a_o, a_f))
    if asr:
        correct = (po == y) & np.all(pf == y[None], axis=0)
        r = pgd.asr(key, model_o, vars_o, groups, x, y,
                    eps=eps, n_samples=n_samples, softmax=softmax,
                    correct=correct, batch_size=pgd_batch_size,
                    strategy=strategy)
        out.update(asr_orig=r["asr_orig"], asr=r["asr_fixed"],
                   d_asr=r["d_asr"], asr_samples=r["n_samples"],
                   eps=float(eps), softmax=bool(softmax))
    return classification.to_python(out)

