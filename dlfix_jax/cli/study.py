r"""Runs (or resumes) a study: pairs × approaches × seeds -> DIR/results.jsonl.

  dlfix study --config=experiments/configs/study_digits.py \
      --workdir=runs/study_digits
  (or python -m experiments.run_study with the same flags)

Rerunning skips every cell already in ``DIR/results.jsonl`` (a killed run
resumes where it stopped); ``--force`` recomputes all cells (newer records
supersede older ones). Then: ``dlfix report --workdir=DIR``.
See ``dlfix_jax.study.runner`` for statuses, budgets and timing.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from dlfix_jax import progress
from dlfix_jax.study import runner

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Study config file (experiments/configs/study_*.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_FORCE = flags.DEFINE_bool("force", False,
                           "Recompute cells that already have a record.")
_BASE = flags.DEFINE_string(
    "base", None, "Fix this model instead of training one: a training "
    "workdir or a Keras .h5 (never retrained). The config must have one "
    "(dataset, model) pair; its dataset settings are used.")
flags.mark_flags_as_required(["config", "workdir"])



def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    progress.quiet_orbax()
    config = _CONFIG.value
    if _BASE.value:
        config = runner.with_base(config, _BASE.value)
    logging.info("study config:\n%s", config)
    records = runner.run_study(config, _WORKDIR.value, force=_FORCE.value)
    counts = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    logging.info("%d records in %s/results.jsonl: %s", len(records),
                 _WORKDIR.value, counts)


if __name__ == "__main__":
    app.run(main)
