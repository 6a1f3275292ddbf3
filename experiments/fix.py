"""``python -m experiments.fix`` = ``dlfix fix``.

The flags and main live in :mod:`dlfix_jax.cli.fix` (installed with the
package), so the two never differ; ``--help`` lists the flags.
"""

import sys

from dlfix_jax import cli
from dlfix_jax.cli import fix as _command
# The library API this script exposed before the move (tests use it).
from dlfix_jax.study.fix import (EXIT_FAILED, EXIT_UNADAPTABLE,  # noqa: F401
                                 apply_overrides, run)

if __name__ == "__main__":
    cli.run_command(_command, sys.argv)
