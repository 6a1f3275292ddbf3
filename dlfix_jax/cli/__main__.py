"""``python -m dlfix_jax.cli <command> ...`` = the ``dlfix`` command."""

from dlfix_jax.cli import main

main()
