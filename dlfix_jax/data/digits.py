"""The embedded default dataset: scikit-learn's bundled handwritten digits.

1,797 8x8 images (values 0..16) ship inside scikit-learn, so nothing is
downloaded. Each image is resized (bilinear) to 20x20 and centred in a 28x28
frame, like MNIST's 20x20 digits in 28x28, so LeNet5 takes it unchanged.
Normalisation: x / 16 (the digits' maximum), i.e. [0, 1] like MNIST's x/255.

Splits (deterministic permutation for ``seed``): 1,197 train / 200 valid /
200 repair / 200 test.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from dlfix_jax.data import base

SIZES = (1197, 200, 200, 200)


def _to_28(images: np.ndarray) -> np.ndarray:
    out = np.zeros((len(images), 28, 28), np.float32)
    for i, im in enumerate(images):
        img = Image.fromarray(im.astype(np.float32), mode="F")
        out[i, 4:24, 4:24] = np.asarray(
            img.resize((20, 20), Image.Resampling.BILINEAR))
    return np.clip(out, 0.0, 16.0) / 16.0


def load(data_dir: str | None = None, seed: int = 0) -> base.Dataset:
    del data_dir  # embedded
    from sklearn.datasets import load_digits  # heavy: sklearn, digits only
    d = load_digits()
    x = _to_28(d.images)[..., None]
    y = d.target.astype(np.int32)
    idx = base.split_indices(len(y), SIZES, seed)
    splits = [base.Split(x[i], y[i]) for i in idx]
    return base.Dataset(
        "digits", *splits, num_classes=10,
        class_names=tuple(str(i) for i in range(10)),
        normalization="8x8 -> bilinear 20x20 centred in 28x28, x/16",
        mean=np.zeros(1, np.float32), std=np.ones(1, np.float32), seed=seed,
        source="sklearn.datasets.load_digits (embedded)")
