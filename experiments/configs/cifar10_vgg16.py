"""VGG16 (CIFAR variant with BatchNorm) on CIFAR-10.

Run:
  python -m experiments.train --config=experiments/configs/cifar10_vgg16.py \
      --workdir=runs/cifar10_vgg16 [--config.dataset.data_dir=PATH]

The study's VGG16 reached 86.22% test accuracy. Expected with this config:
about 85-88% test accuracy after 30 epochs without augmentation. Runtime:
hours on 2 CPU cores (see benchmarks/train_throughput.py for examples/s);
minutes on one GPU. Not measured on CPU here.
"""

from experiments.configs import common


def get_config():
    return common.base("cifar10", "vgg16", epochs=30, batch_size=128,
                       learning_rate=0.05, optimizer="momentum",
                       weight_decay=5e-4, schedule="cosine",
                       warmup_epochs=1.0, eval_batch_size=500)
