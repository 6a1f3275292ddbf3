"""The MNIST study on the study's own model at the fidelity budgets.

  python -m experiments.run_study \
      --config=experiments/configs/study_mnist_artifact_reduced.py \
      --workdir=runs/study_mnist_artifact_reduced

``study_mnist_artifact.py`` (the study's original LeNet5, real MNIST, 3
seeds, PGD ε = 0.15 on 500 samples) with the budgets of the fidelity rows in
BENCHMARKS.md (:func:`experiments.configs.budgets.mnist_reduced`): Apricot,
Editable Training, HybridRepair, DeepRepair and I-Repair reduced, every
other fixer at its default (paper) config. About an hour on 2 CPU cores
(BENCHMARKS.md, "The whole MNIST study"). NeuRecover is unadaptable here:
the model has no training history.
"""

from experiments.configs import budgets
from experiments.configs import study_mnist_artifact
from experiments.configs.study_common import fixer_settings


def get_config():
    c = study_mnist_artifact.get_config()
    c.name = "mnist_artifact_reduced"
    c.fixers = fixer_settings(budgets.mnist_reduced())
    c.time_budget_s = 2 * 3600.0
    return c
