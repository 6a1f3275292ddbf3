"""Writes a model as a Keras ``.h5`` file that Keras 3 and tf_keras load.

Example:
  dlfix export --model=runs/fix_mine/arachne/seed0 --h5=fixed.h5

MODEL is anything ``dlfix evaluate`` reads (a fixed model written by
``dlfix fix``, a training workdir, a Keras .h5). Sequential models only
(LeNet5, FaceNet, VGG16 and every imported Keras model); the Keras model
predicts what ours does (probabilities when the source had a softmax, else
logits). See :func:`dlfix_jax.models.keras_h5.export_h5`.
"""

import sys

from absl import app, flags

flags.DEFINE_string("model", None, "MODEL to export (workdir, fixed model "
                    "dir or .h5).")
flags.DEFINE_string("h5", None, "Output Keras .h5 file.")
flags.mark_flags_as_required(["model", "h5"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # after flag parsing, to keep --help fast
    from dlfix_jax.models import keras_h5
    from dlfix_jax.training import checkpoint
    try:
        model, variables, _ = checkpoint.load_model(FLAGS.model)
        keras_h5.export_h5(model, variables, FLAGS.h5)
    except (checkpoint.CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {FLAGS.h5} ({model.name}, {len(model.layers)} layers)")


if __name__ == "__main__":
    app.run(main)
