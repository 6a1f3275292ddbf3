r"""Fixes a base model with one approach for S seeds.

Examples:
  dlfix fix --base=model.h5 --dataset=mnist --approach=arachne --seeds=3 \
      --workdir=runs/fix_mine [--export_h5=fixed.h5]
  dlfix fix --config=experiments/configs/mnist_lenet5.py --approach=ra \
      --seeds=3 --workdir=runs/mnist_lenet5 \
      [--fixer=num_passing=1000 --fixer=margin=0.05] [--eval_batch_size=1000]

``--base=PATH`` fixes an existing model as it is (never retrained): a
training workdir (``dlfix train``), a fixed model (``W/<approach>/seed<s>``)
or a Keras ``.h5`` file; the dataset comes from ``--dataset`` (plus
``--data_dir``, ``--data_seed``) or from ``--config``'s ``dataset``. A native
``.keras`` file is refused: save it as ``.h5`` in Keras first. Without
``--base``, the base model of ``--config`` is trained into ``DIR/base``.

Writes ``DIR/<approach>/seed<s>/`` (``model.json``, ``variables.msgpack``,
``info.json``; ``dlfix evaluate --fixed=DIR/<approach>`` reads them) and
``DIR/<approach>/metrics.json``; ``--export_h5=FILE`` also writes seed 0's
fixed model as a Keras .h5. Exit status 1 when a seed failed, 2 when the
base model or dataset cannot be read, 3 when the approach does not apply.
See :mod:`dlfix_jax.study.fix`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from dlfix_jax import progress
from dlfix_jax.cli import _data_flags

flags.adopt_module_key_flags(_data_flags)

config_flags.DEFINE_config_file(
    "config", None, "Base-model training config (experiments/configs/*.py); "
    "not needed with --base and --dataset.", lock_config=True)
flags.DEFINE_string("base", None, "Base model to fix as it is: a training "
                    "workdir, a fixed model dir or a Keras .h5 file.")
flags.DEFINE_string("approach", None, "Registered fixer name (e.g. apricot).")
flags.DEFINE_integer("seeds", 3, "Number of fixing runs (seeds).")
flags.DEFINE_string("workdir", None, "Output directory.")
flags.DEFINE_multi_string("fixer", [], "Fixer-config override key=value "
                          "(repeatable; nested keys with dots).")
flags.DEFINE_integer("eval_batch_size", 1000, "Inputs per evaluation call.")
flags.DEFINE_float("time_budget_s", 0.0, "Per-seed time budget in seconds (0: "
                   "none); a seed past it is recorded as a timeout failure.")
flags.DEFINE_enum("seed_strategy", "auto", ["auto", "vmap", "sequential"],
                  "How the seeds run: one vmap(fix) call (vmappable "
                  "fixers) or one after another; auto: measured per "
                  "backend (CPU: sequential).")
flags.DEFINE_string("export_h5", None, "Also write seed 0's fixed model to "
                    "this Keras .h5 file.")
flags.mark_flags_as_required(["approach", "workdir"])
FLAGS = flags.FLAGS

EXIT_ERROR = 2


def _config():
    """The config ``run`` reads: --config, or with --base a dataset-only
    one from --dataset."""
    # after flag parsing, to keep --help fast
    from dlfix_jax.study import fix
    if FLAGS.base is None:
        if FLAGS.config is None:
            raise app.UsageError("--config is required unless --base is given")
        if _data_flags.DATASET.value is not None:
            raise app.UsageError("--dataset is only read with --base; the "
                                 "training config names the dataset")
        return FLAGS.config
    if FLAGS.config is not None:
        if _data_flags.DATASET.value is not None:
            raise app.UsageError("give the dataset by --dataset or by "
                                 "--config, not both")
        return FLAGS.config
    if _data_flags.DATASET.value is None:
        raise app.UsageError("--base needs the dataset the model is fixed "
                             "on: --dataset=NAME (or --config=FILE)")
    return fix.dataset_config(_data_flags.DATASET.value,
                              _data_flags.DATA_DIR.value,
                              _data_flags.DATA_SEED.value)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # after flag parsing, to keep --help fast
    from dlfix_jax.data import DataError
    from dlfix_jax.study import fix
    from dlfix_jax.training import checkpoint

    progress.quiet_orbax()
    config = _config()
    try:
        status, m = fix.run(config, FLAGS.approach, FLAGS.seeds,
                            FLAGS.workdir, FLAGS.fixer, FLAGS.eval_batch_size,
                            base=FLAGS.base,
                            time_budget_s=FLAGS.time_budget_s,
                            seed_strategy=FLAGS.seed_strategy)
    except (checkpoint.CheckpointError, DataError, ValueError,
            FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    except KeyError as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    if m:
        mm = m["mean"]
        fmt = lambda v, f="{:.2f}": "n/a" if v is None else f.format(v)  # noqa: E731
        print(f"{m['approach']} on {m['dataset']}/{m['model']} x{m['num_seeds']}: "
              f"status {m['status']}; test ACC {fmt(mm['acc'])} (orig "
              f"{fmt(m['orig']['test_acc'])}), RR {fmt(mm['rr'])}, NFR "
              f"{fmt(mm['nfr'])}; repair RR {fmt(mm['repair_rr'])}; time/seed "
              f"{fmt(mm['time_s'], '{:.1f}')}s -> "
              f"{os.path.join(os.path.abspath(FLAGS.workdir), m['approach'])}")
    if FLAGS.export_h5 and m:
        from dlfix_jax.models import keras_h5  # h5py: --export_h5 only
        seed0 = os.path.join(FLAGS.workdir, m["approach"], "seed0")
        if not os.path.isdir(seed0):
            print(f"error: seed 0 failed; nothing to export to "
                  f"{FLAGS.export_h5}", file=sys.stderr)
            sys.exit(status or 1)
        model, variables, _ = checkpoint.load_model(seed0)
        keras_h5.export_h5(model, variables, FLAGS.export_h5)
        print(f"wrote {FLAGS.export_h5}")
    sys.exit(status)


if __name__ == "__main__":
    app.run(main)
