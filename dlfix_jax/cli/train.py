r"""Trains a base model: ``dlfix train --config=FILE --workdir=DIR``.

Example (also ``python -m experiments.train``):
  dlfix train --config=experiments/configs/mnist_lenet5.py \
      --workdir=runs/mnist_lenet5 --config.dataset.data_dir=../shared/data

Writes DIR/config.json, DIR/checkpoints/<epoch> (orbax, one per epoch),
DIR/variables.msgpack and DIR/metrics.json; see
:mod:`dlfix_jax.training.train`. A completed run with the same config is
loaded instead of retrained; ``--force`` retrains.
"""

import os

from absl import app, flags, logging

from ml_collections import config_flags

from dlfix_jax import progress

config_flags.DEFINE_config_file(
    "config", None, "Training config file (experiments/configs/*.py).",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory.")
flags.DEFINE_bool("force", False,
                  "Retrain even if the workdir holds a completed run.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from dlfix_jax.training import train  # after flag parsing: fast --help

    progress.quiet_orbax()
    config = FLAGS.config
    workdir = FLAGS.workdir
    logging.info("config:\n%s", config)
    # train_and_evaluate writes workdir/config.json once it has checked that
    # the workdir does not hold a completed run of another config.
    result = train.train_and_evaluate(config, workdir, force=FLAGS.force)
    m = result.metrics
    print(f"{'loaded' if result.loaded else 'trained'} {m['model']['name']} "
          f"on {m['dataset']['name']}: train {m['train_accuracy']:.4f} "
          f"valid {m['valid_accuracy']:.4f} test {m['test_accuracy']:.4f} "
          f"({m['time_s']:.1f}s) -> {os.path.abspath(workdir)}")


if __name__ == "__main__":
    app.run(main)
