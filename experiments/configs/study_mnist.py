"""The study's MNIST / LeNet5 row at paper scale (slow: hours).

Run:
  python -m experiments.run_study --config=experiments/configs/study_mnist.py \
      --workdir=runs/study_mnist
  python -m experiments.report --workdir=runs/study_mnist

Needs the real MNIST under ``../shared/data/mnist`` (or ``$DLFIX_DATA_DIR``;
see ``dlfix_jax.data``). The base model is
``experiments/configs/mnist_lenet5.py``. Every registered fixer runs with its
**default (paper) config** — no budget overrides — and 3 seeds; the study
reports Apricot at 13h46m, RA 13s and Arachne 1m12s per fix on MNIST, so
expect many hours on CPU (Apricot dominates; ``--config.approaches=ra,arachne``
for a quick subset). ASR: PGD with ε = 0.15 (the study's MNIST value), 40
steps, random start, 500 samples. Per-run time budget: 24 h. The
post-processing combinations of the discussion are off by default
(``--config.ensembles=NO,SV,HV,UP,UD,US`` turns them on).
"""

from experiments.configs import mnist_lenet5
from experiments.configs.study_common import asr_config, base_study

import ml_collections


def get_config():
    c = base_study("mnist")
    pair = ml_collections.ConfigDict()
    pair.train = mnist_lenet5.get_config()
    pair.asr = asr_config(n_samples=500)
    c.pairs.mnist_lenet5 = pair
    c.time_budget_s = 24 * 3600.0
    c.eval_batch_size = 1000
    return c
