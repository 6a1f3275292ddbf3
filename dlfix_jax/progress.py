"""Logging helpers shared by the ``experiments/`` scripts."""

from absl import logging


class _QuietOrbax:
    """Drops orbax's INFO lines (dozens per checkpoint save or restore) so
    progress lines stay readable; orbax warnings and errors still show."""

    def filter(self, record):
        return record.levelno >= 30 or "orbax" not in record.pathname


def quiet_orbax() -> None:
    """Installs the filter on absl's handler (idempotent)."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
        handler.addFilter(_QuietOrbax())
