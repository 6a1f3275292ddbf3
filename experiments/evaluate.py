"""Evaluates an original model against fixed models on a dataset's test split.

Example:
  python -m experiments.evaluate --dataset=mnist --data_dir=../shared/data \
      --original=runs/mnist_lenet5 --fixed=runs/fix1 --fixed=fixed2.h5 \
      --asr --out=eval.json

MODEL is a training workdir of ours or a Keras ``.h5`` file (loaded with
``dlfix_jax.training.checkpoint.load_model``). Prints the test accuracy of
every model and, per fixed model against the original, the repaired count /
RR and the broken count / NFR (the study artifact's ``evaluate.py``), plus
ASR (``--asr``, L∞ PGD, ε per dataset) and AAOD (``--aaod``, groups from the
dataset) when asked. ``--out`` receives the same numbers as JSON, written
atomically at the end (nothing is written when anything fails).
"""

import sys

from absl import app, flags

flags.DEFINE_string("dataset", None, "Dataset name (dlfix_jax.data.names()).")
flags.DEFINE_string("data_dir", None, "Data directory (default: "
                    "$DLFIX_DATA_DIR or ../shared/data).")
flags.DEFINE_integer("data_seed", 0, "Split seed of the dataset (must match "
                     "the one the models were trained/fixed with).")
flags.DEFINE_string("original", None, "Original MODEL (workdir or .h5).")
flags.DEFINE_multi_string("fixed", [], "Fixed MODEL(s); repeat the flag.")
flags.DEFINE_string("out", None, "Write the results as JSON to this file.")
flags.DEFINE_bool("asr", False, "Run L∞ PGD and report ASR / ⇑ASR.")
flags.DEFINE_bool("aaod", False, "Report AAOD / ⇑AAOD (dataset needs groups).")
flags.DEFINE_integer("seed", 0, "PRNG seed of the PGD samples and start.")
flags.DEFINE_float("eps", None, "PGD ε (default: the study's per dataset).")
flags.DEFINE_integer("n_samples", 500, "Inputs attacked by PGD.")
flags.DEFINE_enum("softmax", "auto", ["auto", "true", "false"],
                  "Attack probabilities (softmax before the loss); auto = "
                  "the original model's output_softmax (Keras softmax).")
flags.DEFINE_enum("strategy", "auto", ["auto", "sequential", "vmap",
                                       "lax_map"],
                  "How stacked fixed models are run over the seed axis.")
flags.mark_flags_as_required(["dataset", "original"])
FLAGS = flags.FLAGS


def _fmt(v, p=2):
    return f"{v:.{p}f}"


def _report(names, r) -> str:
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


def run(argv_flags) -> dict:
    """Loads everything, evaluates, returns the JSON-ready result."""
    import jax

    from dlfix_jax import data
    from dlfix_jax.metrics import evaluate
    from dlfix_jax.training import checkpoint

    f = argv_flags
    ds = data.load(f.dataset, data_dir=f.data_dir, seed=f.data_seed)
    if f.aaod and ds.test.group is None:
        raise ValueError(f"--aaod needs sensitive-attribute groups, but "
                         f"dataset {f.dataset!r} has none (datasets with "
                         f"groups: utkface, cifar10s)")
    paths = [f.original] + list(f.fixed)
    loaded = []
    for p in paths:
        model, variables, _ = checkpoint.load_model(p)
        if model.num_classes != ds.num_classes:
            raise ValueError(f"model {p!r} has {model.num_classes} classes, "
                             f"dataset {f.dataset!r} has {ds.num_classes}")
        if tuple(model.input_shape) != tuple(ds.input_shape):
            raise ValueError(f"model {p!r} takes inputs {model.input_shape}, "
                             f"dataset {f.dataset!r} has {ds.input_shape}")
        loaded.append((model, variables))
    softmax = {"auto": None, "true": True, "false": False}[f.softmax]
    (model_o, vars_o), fixed = loaded[0], loaded[1:]
    if fixed:
        r = evaluate.evaluate_models(
            jax.random.key(f.seed), model_o, vars_o, fixed, ds, asr=f.asr,
            aaod=f.aaod, eps=f.eps, softmax=softmax, n_samples=f.n_samples,
            strategy=f.strategy)
    else:
        # Only the original: evaluate it against itself and drop the
        # comparison columns.
        r = evaluate.evaluate_models(
            jax.random.key(f.seed), model_o, vars_o, [(model_o, vars_o)], ds,
            asr=f.asr, aaod=f.aaod, eps=f.eps, softmax=softmax,
            n_samples=f.n_samples, strategy=f.strategy)
        for k in ("acc", "d_acc", "repaired", "broken", "rr", "nfr",
                  "finite", "asr", "d_asr", "aaod", "d_aaod"):
            if k in r:
                r[k] = []
        r["n_fixed"] = 0
    r.update(dataset=f.dataset, data_seed=f.data_seed, seed=f.seed,
             original=f.original, fixed=list(f.fixed))
    return r


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from dlfix_jax.data import DataError
    from dlfix_jax.training import checkpoint

    try:
        result = run(FLAGS)
    except (checkpoint.CheckpointError, DataError, ValueError,
            KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(1)
    print(_report([FLAGS.original] + list(FLAGS.fixed), result))
    if FLAGS.out:
        checkpoint.atomic_write_json(FLAGS.out, result)
        print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
