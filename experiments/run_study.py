"""``python -m experiments.run_study`` = ``dlfix study``.

The flags and main live in :mod:`dlfix_jax.cli.study` (installed with the
package), so the two never differ; ``--help`` lists the flags.
"""

import sys

from dlfix_jax import cli
from dlfix_jax.cli import study as _command

if __name__ == "__main__":
    cli.run_command(_command, sys.argv)
