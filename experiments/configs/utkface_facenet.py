"""FaceNet (our compact 11-layer CNN, 64x64x3) on UTKFace gender.

Run:
  python -m experiments.train --config=experiments/configs/utkface_facenet.py \
      --workdir=runs/utkface_facenet [--config.dataset.data_dir=PATH]

The study's FaceNet reached 90.33% test accuracy on the full UTKFace; the
local copy holds 9,780 faces (crop_part1). Expected: roughly 85-90% test
accuracy; about 10-20 minutes on 2 CPU cores (not measured here).
"""

from experiments.configs import common


def get_config():
    return common.base("utkface", "facenet", epochs=15, batch_size=64,
                       learning_rate=1e-3, eval_batch_size=500)
