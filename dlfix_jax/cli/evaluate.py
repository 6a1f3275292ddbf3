r"""Evaluates an original model against fixed models on a dataset's test split.

Example:
  dlfix evaluate --dataset=mnist --data_dir=../shared/data \
      --original=model.h5 --fixed=runs/fix1/arachne --fixed=fixed2.h5 \
      --asr --out=eval.json

MODEL is a training workdir of ours, a fixed model written by ``dlfix fix``
(``W/<approach>/seed<s>``; ``--fixed=W/<approach>`` stands for all its
seeds, ``--fixed=W`` for those of every approach) or a Keras ``.h5`` file (one loader:
``dlfix_jax.training.checkpoint.load_model``). Prints the test accuracy of
every model and, per fixed model against the original, the repaired count /
RR and the broken count / NFR (the study artifact's ``evaluate.py``), plus
ASR (``--asr``, L∞ PGD, ε per dataset) and AAOD (``--aaod``, groups from the
dataset) when asked. ``--out`` receives the same numbers as JSON, written
atomically at the end (nothing is written when anything fails). See
:mod:`dlfix_jax.study.compare`.
"""

import sys

from absl import app, flags

from dlfix_jax.cli import _data_flags

flags.adopt_module_key_flags(_data_flags)

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
flags.mark_flags_as_required(["original"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _data_flags.DATASET.value is None:
        raise app.UsageError("--dataset is required (the test split the "
                             "models are evaluated on)")
    # after flag parsing, to keep --help fast
    from dlfix_jax.data import DataError
    from dlfix_jax.study import compare
    from dlfix_jax.training import checkpoint

    try:
        result = compare.evaluate_paths(
            _data_flags.DATASET.value, FLAGS.original, FLAGS.fixed,
            data_dir=_data_flags.DATA_DIR.value,
            data_seed=_data_flags.DATA_SEED.value, asr=FLAGS.asr,
            aaod=FLAGS.aaod, seed=FLAGS.seed, eps=FLAGS.eps,
            n_samples=FLAGS.n_samples,
            softmax={"auto": None, "true": True, "false": False}[
                FLAGS.softmax],
            strategy=FLAGS.strategy)
    except (checkpoint.CheckpointError, DataError, ValueError,
            KeyError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(1)
    print(compare.report_text([FLAGS.original] + result["fixed"], result))
    if FLAGS.out:
        checkpoint.atomic_write_json(FLAGS.out, result)
        print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
