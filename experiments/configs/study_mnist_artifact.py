"""The MNIST study on the study's own original model (fixed as it is).

  python -m experiments.run_study \
      --config=experiments/configs/study_mnist_artifact.py \
      --workdir=runs/study_mnist_artifact
  (another model: --config.pairs.mnist_lenet5.base=PATH, or --base=PATH)

The base model is ``fixingstudy/mnist_lenet5_original.h5`` under the data
directory (``$DLFIX_DATA_DIR``, else ``../shared/data``): the LeNet5 every
approach in the study fixed (97.90% test accuracy on our MNIST test split).
It is never retrained, and it has no training history, so NeuRecover-style
fixers that need one are unadaptable here. Everything else is
``study_mnist.py``: every fixer at its default (paper) config, 3 seeds, PGD
ε = 0.15 on 500 samples, 24 h per run. Expect many hours on CPU; the
fidelity numbers in BENCHMARKS.md come from ``benchmarks/fidelity.py`` on
the same model at stated budgets.
"""

import os

from dlfix_jax import data as data_lib
from experiments.configs import study_mnist


def default_base() -> str:
    return os.path.join(data_lib.default_data_dir() or "../shared/data",
                        "fixingstudy",
                        "mnist_lenet5_original.h5")


def get_config():
    c = study_mnist.get_config()
    c.name = "mnist_artifact"
    c.pairs.mnist_lenet5.base = default_base()
    return c
