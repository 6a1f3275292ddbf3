"""``python -m experiments.evaluate`` = ``dlfix evaluate``.

The flags and main live in :mod:`dlfix_jax.cli.evaluate` (installed with the
package), so the two never differ; ``--help`` lists the flags.
"""

import sys

from dlfix_jax import cli
from dlfix_jax.cli import evaluate as _command
from dlfix_jax.study.compare import evaluate_paths, report_text  # noqa: F401

if __name__ == "__main__":
    cli.run_command(_command, sys.argv)
