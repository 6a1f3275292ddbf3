"""All metrics of the study for an original model and S fixed models at once.

:func:`evaluate_models` is what the study runner and
``experiments/evaluate.py`` call: it predicts the test split with the
original model and every fixed model (stacked models share one seed-axis
execution strategy, see :mod:`dlfix_jax.seed_axis`), then computes ACC,
⇑ACC, RR, NFR and, on request, ASR/⇑ASR (:mod:`.pgd`) and AAOD/⇑AAOD
(:mod:`.fairness`). Results are JSON-friendly Python values; per-fixed-model
values are lists of length S in seed order.

Corrupted models (the study's CORRUPTED): a model whose parameters hold a
NaN/Inf, or that outputs a non-finite logit on a test input, gets no
numbers: its metrics are None (its argmax over NaN logits would otherwise
read as a plausible accuracy, e.g. 12.50%) and it is left out of the
shared PGD sample. A corrupted *original* makes every comparison (⇑ACC,
RR, NFR, ASR, AAOD) None for every model; only the fixed models' own ACC
is still reported. ``corrupted_orig`` / ``corrupted`` and the reasons in
``corrupted_reason_orig`` / ``corrupted_reason`` say which and why.
Non-finite numbers (NaN: undefined, ±inf: a division by zero) are None in
the result, so it is valid JSON as it is.

**Streamed test splits** (ImageNet, :mod:`dlfix_jax.data.imagenet`: the
split is an iterable of ``Split`` batches, not arrays): the inputs are never
held whole. One pass predicts every batch with the original and every fixed
model and keeps only labels, predictions and finiteness flags (bytes per
input); ASR then takes a second pass that gathers just the ``n_samples``
attacked inputs (:class:`StreamedInputs`). The numbers are those of the
same data in memory (tested).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from dlfix_jax.metrics import classification, fairness, pgd
from dlfix_jax import seed_axis as seeds
from dlfix_jax.data import base as base_data

# Per-fixed-model keys set to None for a corrupted fixed model.
_PER_MODEL = ("acc", "d_acc", "repaired", "broken", "rr", "nfr", "asr",
              "d_asr", "aaod", "d_aaod")
# Keys that compare with the original: None for everyone when it is
# corrupted.
_RELATIVE = ("acc_orig", "wrong_orig", "d_acc", "repaired", "broken", "rr",
             "nfr", "asr_orig", "asr", "d_asr", "aaod_orig", "d_aaod")


def _params_finite(tree) -> bool:
    """True when every float leaf of ``tree`` is finite (host check)."""
    return all(bool(np.all(np.isfinite(np.asarray(a))))
               for a in jax.tree_util.tree_leaves(tree)
               if np.issubdtype(np.asarray(a).dtype, np.inexact))


def _corrupted_reason(params_finite: bool, n_bad: int, n: int):
    if not params_finite:
        return "non-finite parameters"
    if n_bad:
        return f"non-finite outputs on {n_bad}/{n} test inputs"
    return None


class StreamedInputs:
    """The inputs of a streamed split, indexable by an index array: ``x[idx]``
    is one pass over the stream keeping only the rows ``idx`` (in ``idx``'s
    order), so PGD's sample is gathered without holding the split."""

    def __init__(self, stream, n: int):
        self.stream, self.n = stream, int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.asarray(idx, np.int64)
        if idx.ndim != 1 or (idx.size and (idx.min() < 0
                                           or idx.max() >= self.n)):
            raise IndexError(f"streamed inputs take a 1-D index array in "
                             f"[0, {self.n}), got shape {idx.shape}")
        order = np.argsort(idx, kind="stable")
        want = idx[order]
        if not want.size:
            first = next(iter(self.stream), None)
            tail = () if first is None else np.shape(first.x)[1:]
            return np.empty((0,) + tuple(tail), np.float32)
        rows, pos, start = [], 0, 0
        for b in self.stream:
            stop = start + len(b)
            j = int(np.searchsorted(want, stop))
            if j > pos:
                rows.append(np.asarray(b.x, np.float32)[want[pos:j] - start])
                pos = j
            start = stop
            if pos == want.size:
                break
        if pos != want.size:
            raise ValueError(f"the stream ended after {start} inputs; "
                             f"expected {self.n}")
        out = np.empty((idx.size,) + rows[0].shape[1:], np.float32)
        out[order] = np.concatenate(rows)
        return out

    def __array__(self, *args, **kwargs):
        raise TypeError("streamed inputs cannot be read whole; index them "
                        "with an index array (x[idx])")


def is_streamed(split) -> bool:
    """Whether a split is a stream of ``Split`` batches (ImageNet's test
    split) rather than arrays in memory."""
    return not hasattr(split, "x") and hasattr(split, "__iter__")


def test_batches(split):
    """A test split as an iterable of ``Split`` batches: the split itself
    (one batch) when in memory, else its stream."""
    return split if is_streamed(split) else [split]


def _resolve_data(data, dataset_name):
    """(x, y, group, name, num_classes or None) from a Dataset or Split; a
    streamed test split gives ``x`` = the stream and ``y = None``."""
    if hasattr(data, "test") and hasattr(data, "num_classes"):
        split = data.test
        if is_streamed(split):
            return (split, None, None, dataset_name or data.name,
                    data.num_classes)
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
      data: a ``Dataset`` (its ``test`` split is used; a streamed one is
        read batch by batch, module docstring) or a ``Split``.
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
      finite), ``finite_params_orig``/``finite_params``,
      ``corrupted_orig``/``corrupted`` and ``corrupted_reason_orig``/
      ``corrupted_reason`` (None or why), and when asked ``asr_orig``,
      ``asr``, ``d_asr``, ``asr_samples``, ``eps``, ``softmax``;
      ``aaod_orig``, ``aaod``, ``d_aaod``. Metrics of corrupted models are
      None (module docstring).

    Raises:
      ValueError: AAOD requested on data without groups; ASR requested
        without ``eps`` on a dataset with no default ε; a bad ``eps``,
        ``n_samples`` or batch size.
    """
    pgd.check_args(batch_size=batch_size, pgd_batch_size=pgd_batch_size)
    if asr:
        pgd.check_args(eps=eps, n_samples=n_samples)
    x, y, group, name, nc = _resolve_data(data, dataset_name)
    num_classes = num_classes or nc or model_o.num_classes
    streamed = y is None
    if aaod and group is None and not streamed:
        raise ValueError(f"AAOD needs sensitive-attribute groups, but the "
                         f"{name or 'given'} test split has no group array")
    if asr and eps is None:
        if name is None:
            raise ValueError("ASR needs eps (or a dataset name to look up "
                             "its default epsilon)")
        eps = pgd.epsilon_for(name)
    if softmax is None:
        softmax = bool(model_o.output_softmax)

    # every model on the device once, not once per (streamed) batch
    stacked_o = seeds.to_device(
        jax.tree_util.tree_map(lambda a: np.asarray(a)[None], vars_o))
    groups = seeds.ModelGroups((m, seeds.to_device(st), pos)
                               for m, st, pos in seeds.group_models(
                                   fixed, model_o))
    if streamed:
        batches = x
    else:
        x = np.asarray(x, np.float32)
        batches = [base_data.Split(x, np.asarray(y, np.int32), group)]
    y, group, po, fo, preds, fins = _predict_batches(
        batches, model_o, stacked_o, groups, batch_size, strategy)
    if streamed:
        x = StreamedInputs(batches, len(y))
        if aaod and group is None:
            raise ValueError(f"AAOD needs sensitive-attribute groups, but "
                             f"the {name or 'given'} streamed test split "
                             f"has no group array")
    pf = seeds.scatter_groups(groups, preds)
    ff = seeds.scatter_groups(groups, fins)

    n = len(y)
    why_o = _corrupted_reason(_params_finite(vars_o), int(np.sum(~fo)), n)
    why_f = [None] * int(pf.shape[0])
    for m, st, pos in groups:
        for j, s in enumerate(pos):
            v = jax.tree_util.tree_map(lambda a, j=j: np.asarray(a)[j], st)
            why_f[s] = _corrupted_reason(_params_finite(v),
                                         int(np.sum(~ff[s])), n)
    bad_f = np.array([w is not None for w in why_f], bool)

    acc_o = classification.accuracy(po, y)
    acc_f = classification.accuracy(pf, y)
    fl = classification.flips(po, pf, y)
    out: dict[str, Any] = {
        "n_test": int(n), "n_fixed": int(pf.shape[0]),
        "acc_orig": acc_o, "acc": acc_f,
        "d_acc": classification.relative_change(acc_f, acc_o),
        "wrong_orig": fl["wrong_orig"], "repaired": fl["repaired"],
        "broken": fl["broken"], "rr": fl["rr"], "nfr": fl["nfr"],
        "finite_orig": bool(np.all(fo)), "finite": np.all(ff, axis=1),
        "finite_params_orig": why_o != "non-finite parameters",
        "finite_params": [w != "non-finite parameters" for w in why_f],
        "corrupted_orig": why_o is not None,
        "corrupted": bad_f,
        "corrupted_reason_orig": why_o,
        "corrupted_reason": why_f,
    }
    if aaod:
        a_o = fairness.aaod(po, y, group, num_classes)
        a_f = fairness.aaod(pf, y, group, num_classes)
        out.update(aaod_orig=a_o, aaod=a_f,
                   d_aaod=classification.relative_gain(a_o, a_f))
    if asr:
        out.update(eps=float(eps), softmax=bool(softmax))
        if why_o is None and not bad_f.all():
            good = ~bad_f
            correct = (po == y) & np.all((pf == y[None]) | ~good[:, None],
                                         axis=0)
            r = pgd.asr(key, model_o, vars_o, groups, x, y,
                        eps=eps, n_samples=n_samples, softmax=softmax,
                        correct=correct, exclude=bad_f,
                        batch_size=pgd_batch_size, strategy=strategy)
            out.update(asr_orig=r["asr_orig"], asr=r["asr_fixed"],
                       d_asr=r["d_asr"], asr_samples=r["n_samples"])
        else:  # nothing valid to attack: no sample, no numbers
            out.update(asr_orig=None, asr=[None] * len(why_f),
                       d_asr=[None] * len(why_f), asr_samples=0)
    out = classification.to_python(out)
    if why_o is not None:
        for k in _RELATIVE:
            if k in out:
                out[k] = (None if not isinstance(out[k], list)
                          else [None] * len(out[k]))
    for s, bad in enumerate(bad_f):
        if bad:
            for k in _PER_MODEL:
                if k in out:
                    out[k][s] = None
    return out


def _predict_batches(batches, model_o, stacked_o, groups, batch_size: int,
                     strategy: str):
    """One pass over the test batches (one for a split in memory): ``(y,
    group or None, po, fo, preds, fins)``: labels, the original's and each
    group's predictions and finiteness flags."""
    ys, gs, pos_, fos = [], [], [], []
    pg = [[] for _ in groups]
    fg = [[] for _ in groups]
    for b in batches:
        xb = np.asarray(b.x, np.float32)
        if not len(xb):
            continue
        ys.append(np.asarray(b.y, np.int32))
        gs.append(None if getattr(b, "group", None) is None
                  else np.asarray(b.group, np.int32))
        p, f = seeds.predict_stack(model_o, stacked_o, xb, batch_size,
                                   "sequential", return_finite=True)
        pos_.append(p[0])
        fos.append(f[0])
        for i, (m, st, _) in enumerate(groups):
            p, f = seeds.predict_stack(m, st, xb, batch_size, strategy,
                                       return_finite=True)
            pg[i].append(p)
            fg[i].append(f)
    if not ys:
        raise ValueError("no inputs to evaluate: the test split is empty")
    y = np.concatenate(ys)
    group = None if any(g is None for g in gs) else np.concatenate(gs)
    preds = [np.concatenate(p, axis=1) for p in pg]
    fins = [np.concatenate(f, axis=1) for f in fg]
    return (y, group, np.concatenate(pos_), np.concatenate(fos), preds,
            fins)
