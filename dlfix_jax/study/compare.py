"""Evaluates an original model against fixed models (``dlfix evaluate``).

:func:`evaluate_paths` is the library call behind ``dlfix evaluate`` and
``python -m experiments.evaluate``. Every MODEL is read with the one loader,
:func:`dlfix_jax.training.checkpoint.load_model`: a training workdir of
ours, a fixed model written by ``dlfix fix`` (``W/<approach>/seed<s>``) or a
Keras ``.h5`` file. A fixed MODEL may also be a ``dlfix fix`` approach
directory (``W/<approach>``), which stands for all its seeds in seed
order, or a ``dlfix fix`` workdir ``W``, for those of every approach.
It returns the test accuracy of every model and, per fixed model against
the original, the repaired count / RR and the broken count / NFR (the
study artifact's ``evaluate.py``), plus ASR (L∞ PGD, ε per dataset) and
AAOD (groups from the dataset) when asked; :func:`report_text` formats it.
"""

from __future__ import annotations

from typing import Sequence

import jax

from dlfix_jax import data
from dlfix_jax.metrics import evaluate
from dlfix_jax.training import checkpoint


def _fmt(v, p=2):
    return f"{v:.{p}f}"


def report_text(names: Sequence[str], r: dict) -> str:
    """The human-readable report of :func:`evaluate_paths`'s result;
    ``names`` is the original's name followed by the fixed models'."""
    lines = [f"test accuracy of original model {names[0]}: "
             f"{_fmt(r['acc_orig'])}% (wrong: {r['wrong_orig']}/"
             f"{r['n_test']})"]
    if r.get("asr_orig") is not None:
        lines.append(f"ASR of original model: {_fmt(r['asr_orig'])}% "
                     f"(PGD eps={r['eps']}, {r['asr_samples']} samples, "
                     f"softmax={r['softmax']})")
    if r.get("aaod_orig") is not None:
        lines.append(f"AAOD of original model: {_fmt(r['aaod_orig'], 4)}")
    for k, name in enumerate(names[1:]):
        lines.append(
            f"fixed model {k + 1} {name}: accuracy {_fmt(r['acc'][k])}% "
            f"(⇑ACC {_fmt(r['d_acc'][k])}%); repaired numbers "
            f"{r['repaired'][k]} (RR {_fmt(r['rr'][k])}%); break numbers "
            f"{r['broken'][k]} (NFR {_fmt(r['nfr'][k])}%)"
            + ("" if r["finite"][k] else "; NON-FINITE outputs"))
        if "asr" in r:
            lines.append(f"  ASR {_fmt(r['asr'][k])}% "
                         f"(⇑ASR {_fmt(r['d_asr'][k])}%)")
        if "aaod" in r:
            lines.append(f"  AAOD {_fmt(r['aaod'][k], 4)} "
                         f"(⇑AAOD {_fmt(r['d_aaod'][k])}%)")
    return "\n".join(lines)


def expand_fixed(paths: Sequence[str]) -> list[str]:
    """Each ``dlfix fix`` approach directory or workdir replaced by its
    fixed models' seed dirs (:func:`checkpoint.fixed_model_dirs`)."""
    out = []
    for p in paths:
        out.extend(checkpoint.fixed_model_dirs(p))
    return out


def evaluate_paths(dataset: str, original: str, fixed: Sequence[str] = (), *,
                   data_dir: str | None = None, data_seed: int = 0,
                   asr: bool = False, aaod: bool = False, seed: int = 0,
                   eps: float | None = None, n_samples: int = 500,
                   softmax: bool | None = None, strategy: str = "auto"
                   ) -> dict:
    """Loads the models and the dataset, evaluates, returns the JSON-ready
    result (``fixed`` lists the model paths after :func:`expand_fixed`).

    Raises:
      CheckpointError, DataError, ValueError, KeyError: a model or the
        dataset cannot be read, or they do not fit each other.
    """
    ds = data.load(dataset, data_dir=data_dir, seed=data_seed)
    if aaod and ds.test.group is None:
        raise ValueError(f"--aaod needs sensitive-attribute groups, but "
                         f"dataset {dataset!r} has none (datasets with "
                         f"groups: utkface, cifar10s)")
    fixed = expand_fixed(fixed)
    loaded = []
    for p in [original] + fixed:
        model, variables, _ = checkpoint.load_model(p)
        if model.num_classes != ds.num_classes:
            raise ValueError(f"model {p!r} has {model.num_classes} classes, "
                             f"dataset {dataset!r} has {ds.num_classes}")
        if tuple(model.input_shape) != tuple(ds.input_shape):
            raise ValueError(f"model {p!r} takes inputs {model.input_shape}, "
                             f"dataset {dataset!r} has {ds.input_shape}")
        loaded.append((model, variables))
    (model_o, vars_o), others = loaded[0], loaded[1:]
    kw = dict(asr=asr, aaod=aaod, eps=eps, softmax=softmax,
              n_samples=n_samples, strategy=strategy)
    if others:
        r = evaluate.evaluate_models(jax.random.key(seed), model_o, vars_o,
                                     others, ds, **kw)
    else:
        # Only the original: evaluate it against itself and drop the
        # comparison columns.
        r = evaluate.evaluate_models(jax.random.key(seed), model_o, vars_o,
                                     [(model_o, vars_o)], ds, **kw)
        for k in ("acc", "d_acc", "repaired", "broken", "rr", "nfr",
                  "finite", "asr", "d_asr", "aaod", "d_aaod"):
            if k in r:
                r[k] = []
        r["n_fixed"] = 0
    r.update(dataset=dataset, data_seed=data_seed, seed=seed,
             original=original, fixed=list(fixed))
    return r
