"""Fixers: registered by name; ``get(name)``, ``list()``.

Importing this package imports every fixer module so the registry is full.
"""

from dlfix_jax.fixers.base import (LEVELS, Data, FixerSpec, FixResult,
                                   Problem, get, make_problem, names,
                                   predict_batched, register)

# Fixer modules register themselves on import.
import importlib as _importlib

_FIXER_MODULES = ("apricot", "ra", "arachne")
for _m in _FIXER_MODULES:
    _importlib.import_module(f"dlfix_jax.fixers.{_m}")


def list() -> "list[str]":  # noqa: A001 - the issue's name for it
    """Names of every registered fixer."""
    return names()


__all__ = ["LEVELS", "Data", "FixerSpec", "FixResult", "Problem", "get",
           "make_problem", "names", "list", "predict_batched", "register"]
