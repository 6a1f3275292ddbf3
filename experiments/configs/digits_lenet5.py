"""LeNet5 on the embedded sklearn digits (the default for `make study`).

Run:
  python -m experiments.train --config=experiments/configs/digits_lenet5.py \
      --workdir=runs/digits_lenet5

No data needed (the digits ship with scikit-learn). Expected: ~20 s on 2 CPU
cores (mostly imports and compilation). Measured (seed 0): test 97.0%,
valid 96.5% on the 200-image splits, 24 s in all.
"""

from experiments.configs import common


def get_config():
    return common.base("digits", "lenet5", epochs=15, batch_size=64,
                       learning_rate=2e-3)
