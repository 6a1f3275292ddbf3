r"""Runs (or resumes) a study: pairs × approaches × seeds -> DIR/results.jsonl.

  dlfix study --config=experiments/configs/study_digits.py \
      --workdir=runs/study_digits
  (or python -m experiments.run_study with the same flags)

Rerunning skips every cell already in ``DIR/results.jsonl`` (a killed run
resumes where it stopped); ``--force`` recomputes all cells (newer records
supersede older ones). Then: ``dlfix report --workdir=DIR``.
See ``dlfix_jax.study.runner`` for statuses, budgets and timing.

Several processes (hosts of a TPU pod, one process per GPU, local CPU
processes) share the work of one study in one shared workdir: start the
same command in each with ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=K`` (or ``--distributed=on`` where JAX
detects them: Cloud TPU pods, SLURM, Open MPI, Kubernetes). The (pair,
approach) units are dealt round-robin, each process writes its own shard,
process 0 merges them; see ``dlfix_jax.study.distributed``.
"""

import sys

from dlfix_jax.study import distributed

# JAX's distributed runtime must start before any JAX computation, and
# parsing --config runs the config file (which imports the fixers), so the
# distributed flags are read from the command line here, on import, before
# absl parses it; the absl flags below document and check them.
distributed.initialize_from_argv(sys.argv)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dlfix_jax import progress  # noqa: E402
from dlfix_jax.study import runner  # noqa: E402

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
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", list(distributed.MODES),
    "Start JAX's distributed runtime (jax.distributed.initialize): auto = "
    "when --coordinator_address/--num_processes/--process_id or the "
    "JAX_COORDINATOR_ADDRESS environment variable is given; on = always "
    "(JAX detects the rest on Cloud TPU pods, SLURM, Open MPI, "
    "Kubernetes); off = never (one process).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "HOST:PORT of process 0's coordination service (all processes give "
    "the same).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes of the study.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0..num_processes-1.",
    lower_bound=0)
flags.mark_flags_as_required(["config", "workdir"])



def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    progress.quiet_orbax()
    # Normally started on import (initialize_from_argv); this covers a
    # caller that set the flags some other way.
    distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value,
                           _NUM_PROCESSES.value, _PROCESS_ID.value)
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
