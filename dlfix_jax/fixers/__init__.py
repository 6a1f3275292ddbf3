"""Fixers: registered by name in :data:`FIXERS`; ``get(name)``, ``names()``.

Importing this package imports every module listed in :data:`MODULES` (the
one list of fixer modules); each registers its fixer with the
:func:`register` decorator.
"""

import importlib as _importlib

from dlfix_jax.fixers.base import (FIXERS, LEVELS, FixerSpec, FixResult,
                                   Problem, ProblemInfo, check_finite,
                                   check_ranges, fixer_config, get,
                                   make_problem, names, problem_info,
                                   register, spec, summarize_info)
from dlfix_jax.data.source import Data, Source

# The study's 16 approaches, in its table order.
MODULES = ("apricot", "editable_training", "fewshot_mix", "deeprepair",
           "hudd", "hybridrepair", "minimal_modification", "ra", "arachne",
           "care", "neurecover", "irepair", "distrrep", "genmunn", "vere",
           "inner")
for _m in MODULES:
    _importlib.import_module(f"dlfix_jax.fixers.{_m}")

__all__ = ["FIXERS", "LEVELS", "Data", "FixerSpec", "FixResult", "MODULES",
           "Problem", "ProblemInfo", "Source", "check_finite",
           "check_ranges", "fixer_config", "get", "make_problem", "names",
           "problem_info", "register", "spec", "summarize_info"]
