"""Shared pieces of the study configs (``study_*.py`` import these).

* :func:`base_study` — every key the study runner reads, with defaults;
* :func:`asr_config` — the PGD-ASR block of one (dataset, model) pair;
* :func:`fixer_settings` — every registered fixer's full config with a
  study's overrides, so any fixer key can be set from the command line
  (``--config.fixers.ra.margin=0.05``).
"""

import ml_collections
from ml_collections import config_dict


def asr_config(n_samples: int = 500) -> ml_collections.ConfigDict:
    """PGD-ASR settings of one (dataset, model) pair."""
    a = ml_collections.ConfigDict()
    a.enabled = True
    a.eps = config_dict.placeholder(float)  # None: the dataset's ε (pgd.EPSILONS)
    a.n_samples = n_samples
    a.softmax = config_dict.placeholder(bool)  # None: model.output_softmax
    return a


def base_study(name: str) -> ml_collections.ConfigDict:
    """Every key the runner reads, with defaults; study files fill them."""
    c = ml_collections.ConfigDict()
    c.name = name
    c.seed = 0  # root of the fixing and evaluation keys
    c.num_seeds = 3
    c.approaches = "all"  # "all" (registered at run time) or "a,b,c"
    c.pairs = ml_collections.ConfigDict()
    c.fixers = fixer_settings()  # every fixer's full config
    c.time_budget_s = 0.0  # per fixing run; 0 = no budget
    c.corrupt_margin = 5.0  # corrupted if acc <= 100/num_classes + margin
    c.fix_strategy = "auto"  # auto (seed_axis "fix": CPU sequential, else vmap when the fixer allows) | vmap | sequential
    c.eval_strategy = "auto"  # seed strategy of evaluation (seed_axis)
    c.eval_batch_size = 256
    c.ensembles = ""  # "" or a comma list of NO,SV,HV,UP,UD,US
    c.ensemble_approaches = "all"  # "all" or a comma list of approaches
    return c


def fixer_settings(overrides: dict | None = None
                   ) -> ml_collections.ConfigDict:
    """Every registered fixer's default config, updated with ``overrides``
    (fixer name -> {key: value}; strict keys and types, as
    :func:`dlfix_jax.fixers.fixer_config`)."""
    from dlfix_jax import fixers  # the registry fills on import
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(fixers.names()))
    if unknown:
        raise KeyError(f"overrides for unregistered fixers {unknown}; "
                       f"registered: {fixers.names()}")
    out = ml_collections.ConfigDict()
    for name in fixers.names():
        out[name] = fixers.fixer_config(fixers.get(name),
                                        overrides.get(name))
    return out
