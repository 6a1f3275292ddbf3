"""DenseNet121 on ImageNet-2012 (224x224x3, 1000 classes).

Run (needs a prepared TFDS imagenet2012 and an accelerator):
  python -m experiments.train \
      --config=experiments/configs/imagenet2012_densenet121.py \
      --workdir=runs/imagenet2012_densenet121 --config.dataset.data_dir=PATH

The study used Keras's *pre-trained* DenseNet121 (71.70% test top-1), which
has no training history (so NeuRecover is unadaptable there); to reproduce
that, import the Keras weights (a .h5) with `experiments.evaluate
--original=FILE.h5` instead of training. This config trains from scratch
(90 epochs, SGD momentum, cosine), which needs days on GPUs/TPUs and is not
feasible on CPU; not run here. It requires a loader whose splits support
index-based batch access.
"""

from experiments.configs import common


def get_config():
    return common.base("imagenet2012", "densenet121", epochs=90,
                       batch_size=256, learning_rate=0.1,
                       optimizer="momentum", weight_decay=1e-4,
                       schedule="cosine", warmup_epochs=5.0,
                       eval_batch_size=250)
