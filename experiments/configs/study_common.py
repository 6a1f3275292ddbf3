"""Shared pieces of the study configs (``study_*.py`` import these).

* :func:`base_study` — every key the study runner reads, with defaults;
* :func:`asr_config` — the PGD-ASR block of one (dataset, model) pair.
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
    c.fixers = ml_collections.ConfigDict()  # per-fixer config overrides
    c.time_budget_s = 0.0  # per fixing run; 0 = no budget
    c.corrupt_margin = 5.0  # corrupted if acc <= 100/num_classes + margin
    c.fix_strategy = "auto"  # auto (vmap when the fixer allows) | sequential
    c.eval_strategy = "auto"  # seed strategy of evaluation (seed_axis)
    c.eval_batch_size = 256
    c.ensembles = ""  # "" or a comma list of NO,SV,HV,UP,UD,US
    c.ensemble_approaches = "all"  # "all" or a comma list of approaches
    return c
