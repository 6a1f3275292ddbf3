"""ResNet18 (CIFAR variant) on CIFAR-10S (skewed colour/grey CIFAR-10).

Run:
  python -m experiments.train \
      --config=experiments/configs/cifar10s_resnet18.py \
      --workdir=runs/cifar10s_resnet18 [--config.dataset.data_dir=PATH]

The study's ResNet18 reached 65.54% test accuracy (the skew hurts the
minority colour/grey versions of each class). Expected: about 65-80% test
accuracy; hours on 2 CPU cores, minutes on one GPU. Not measured here.
"""

from experiments.configs import common


def get_config():
    return common.base("cifar10s", "resnet18", epochs=20, batch_size=128,
                       learning_rate=0.05, optimizer="momentum",
                       weight_decay=5e-4, schedule="cosine",
                       warmup_epochs=1.0, eval_batch_size=500)
