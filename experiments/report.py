"""``python -m experiments.report`` = ``dlfix report``.

The flags and main live in :mod:`dlfix_jax.cli.report` (installed with the
package), so the two never differ; ``--help`` lists the flags.
"""

import sys

from dlfix_jax import cli
from dlfix_jax.cli import report as _command

if __name__ == "__main__":
    cli.run_command(_command, sys.argv)
