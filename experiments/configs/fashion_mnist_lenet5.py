"""LeNet5 on Fashion-MNIST (not in the study's table; same model as MNIST).

Run:
  python -m experiments.train \
      --config=experiments/configs/fashion_mnist_lenet5.py \
      --workdir=runs/fashion_mnist_lenet5 [--config.dataset.data_dir=PATH]

Expected: about 88-90% test accuracy in about 3-4 minutes on 2 CPU cores
(not measured in the paper).
"""

from experiments.configs import common


def get_config():
    return common.base("fashion_mnist", "lenet5", epochs=10, batch_size=128,
                       learning_rate=1e-3)
