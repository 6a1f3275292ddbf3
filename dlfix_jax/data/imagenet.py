"""ImageNet (ILSVRC 2012) via TFDS, streamed — for GPU/TPU users.

ImageNet is ~150 GB, far beyond a CPU study and beyond memory, so unlike the
other loaders this one never materialises a split: :func:`load` returns a
:class:`StreamingDataset` whose splits are :class:`StreamSplit` s, iterables
of numpy batches (``base.Split`` objects of at most ``batch_size`` rows)
produced by a ``tf.data`` pipeline. Use it on a machine with an accelerator
and a prepared TFDS ``imagenet2012``.

Preparing (once, no network needed): download ``ILSVRC2012_img_train.tar``
and ``ILSVRC2012_img_val.tar`` from https://image-net.org into a manual dir,
then either ``tfds build imagenet2012 --manual_dir=MANUAL --data_dir=DIR`` or
``load(DIR, manual_dir=MANUAL, prepare=True)`` (hours of CPU, ~150 GB disk).

Splits (the study's 1.2M+ / 50,000 / 25,000 / 25,000):

* train  = TFDS ``train[50000:]`` (1,231,167 images), shuffled with ``seed``
  (file order and a 10,000-example buffer),
* valid  = TFDS ``train[:50000]``,
* repair = TFDS ``validation[:25000]``, test = ``validation[25000:]``.

Deviation: membership does not depend on ``seed`` (it is TFDS's fixed record
order, which TFDS already shuffled when preparing). A seeded membership would
need a full pass over the 1.28M training records for every pass over valid.
The seed only orders the train stream.

Preprocessing (every split, DenseNet121's Keras "torch" mode): decode, resize
the shorter side to ``resize`` (256, bilinear with antialiasing), centre crop
``image_size`` x ``image_size`` (224), ``x/255``, then ``(x - mean) / std``
with mean [0.485, 0.456, 0.406] and std [0.229, 0.224, 0.225]
(``keras.applications.densenet.preprocess_input``). No augmentation.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import numpy as np

from dlfix_jax.data import _common, base

NAME = "imagenet2012"
IMAGE_SIZE = 224
RESIZE = 256
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
SHUFFLE_BUFFER = 10_000
VALID_SIZE = 50_000
REPAIR_SIZE = 25_000
_NORM = ("resize shorter side 256, centre crop 224, (x/255 - mean) / std, "
         "mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225] "
         "(Keras DenseNet 'torch' mode)")


def _how_to_get(data_dir) -> str:
    return (f"expected a prepared TFDS '{NAME}' under {data_dir or 'DIR'}, "
            f"{data_dir or 'DIR'}/tensorflow_datasets, $TFDS_DATA_DIR or "
            f"~/tensorflow_datasets. Put ILSVRC2012_img_train.tar and "
            f"ILSVRC2012_img_val.tar (from https://image-net.org) in a manual "
            f"dir and run `tfds build {NAME} --manual_dir=MANUAL "
            f"--data_dir={data_dir or 'DIR'}` or load(..., manual_dir=MANUAL, "
            f"prepare=True)")


def normalize_torch(x_uint8: np.ndarray) -> np.ndarray:
    """NumPy reference of the normalisation: ``(x/255 - MEAN) / STD``."""
    return ((np.asarray(x_uint8, np.float32) / np.float32(255.0) - MEAN)
            / STD).astype(np.float32)


def preprocess(image, image_size: int = IMAGE_SIZE, resize: int = RESIZE):
    """TF preprocessing of one uint8 (H, W, 3) image (module docstring).

    Returns:
      float32 (image_size, image_size, 3) tensor.
    """
    import tensorflow as tf  # heavy optional dependency (TF)
    image = tf.convert_to_tensor(image)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.cast(resize, tf.float32) / tf.reduce_min(shape)
    new = tf.cast(tf.round(shape * scale), tf.int32)
    new = tf.maximum(new, image_size)  # never smaller than the crop
    x = tf.image.resize(tf.cast(image, tf.float32), new, method="bilinear",
                        antialias=True)
    top = (new[0] - image_size) // 2
    left = (new[1] - image_size) // 2
    x = x[top:top + image_size, left:left + image_size, :]
    x = tf.clip_by_value(x, 0.0, 255.0) / 255.0
    x = (x - tf.constant(MEAN)) / tf.constant(STD)
    return tf.ensure_shape(x, (image_size, image_size, 3))


@dataclasses.dataclass(frozen=True)
class StreamSplit:
    """One streamed split: iterate to get ``base.Split`` batches.

    Attributes:
      builder: the TFDS builder (prepared, or mocked in tests).
      tfds_split: TFDS split string, e.g. ``"validation[:25000]"``.
      num_examples: rows in the split, or None when TFDS does not know it.
      batch_size: rows per batch (the last batch may be smaller).
      shuffle: whether to shuffle (train only), seeded by ``seed``.
      seed: shuffle seed.
      image_size, resize: preprocessing sizes.
    """

    builder: object
    tfds_split: str
    num_examples: int | None
    batch_size: int
    shuffle: bool = False
    seed: int = 0
    image_size: int = IMAGE_SIZE
    resize: int = RESIZE

    def __len__(self) -> int:
        if self.num_examples is None:
            raise TypeError(f"size of {self.tfds_split} is unknown")
        return self.num_examples

    @property
    def num_batches(self) -> int:
        return -(-len(self) // self.batch_size)

    def tf_dataset(self):
        """The ``tf.data.Dataset`` of (x, y) batches."""
        import tensorflow as tf  # heavy optional dependency (TF)
        import tensorflow_datasets as tfds  # heavy optional dependency (TFDS)
        read = tfds.ReadConfig(shuffle_seed=self.seed)
        ds = self.builder.as_dataset(split=self.tfds_split,
                                     shuffle_files=self.shuffle,
                                     read_config=read, as_supervised=True)
        if self.shuffle:
            ds = ds.shuffle(SHUFFLE_BUFFER, seed=self.seed,
                            reshuffle_each_iteration=False)
        size, resize = self.image_size, self.resize
        ds = ds.map(lambda im, y: (preprocess(im, size, resize),
                                   tf.cast(y, tf.int32)),
                    num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True)
        return ds.batch(self.batch_size).prefetch(tf.data.AUTOTUNE)

    def __iter__(self) -> Iterator[base.Split]:
        import tensorflow_datasets as tfds  # heavy optional dependency (TFDS)
        for x, y in tfds.as_numpy(self.tf_dataset()):
            yield base.Split(x, y)

    def take(self, n: int) -> base.Split:
        """The first ``n`` rows as one in-memory Split (e.g. a repair
        subset small enough for a fixer)."""
        xs, ys, got = [], [], 0
        for b in self:
            xs.append(b.x[:n - got])
            ys.append(b.y[:n - got])
            got += len(xs[-1])
            if got >= n:
                break
        return base.Split(np.concatenate(xs), np.concatenate(ys))


@dataclasses.dataclass(frozen=True)
class StreamingDataset(base.Dataset):
    """A :class:`~dlfix_jax.data.base.Dataset` whose splits are
    :class:`StreamSplit` s (iterables of numpy batches), not arrays."""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.train.image_size, self.train.image_size, 3)

    def summary(self) -> str:
        def n(s):
            return "?" if s.num_examples is None else f"{s.num_examples:,}"
        sizes = " / ".join(f"{k} {n(v)}" for k, v in self.splits.items())
        return (f"{self.name} (streamed): {sizes}; {self.num_classes} "
                f"classes; input {self.input_shape}; source {self.source}")


def _num(builder, split: str) -> int | None:
    try:
        return int(builder.info.splits[split].num_examples)
    except (KeyError, TypeError, ValueError):
        return None


def from_builder(builder, seed: int = 0, batch_size: int = 64,
                 image_size: int = IMAGE_SIZE, resize: int = RESIZE,
                 valid_size: int = VALID_SIZE, repair_size: int = REPAIR_SIZE,
                 source: str = "") -> StreamingDataset:
    """A :class:`StreamingDataset` over a TFDS ImageNet builder."""
    n_train, n_val = _num(builder, "train"), _num(builder, "validation")
    common = dict(builder=builder, batch_size=batch_size, seed=seed,
                  image_size=image_size, resize=resize)
    train = StreamSplit(tfds_split=f"train[{valid_size}:]",
                        num_examples=None if n_train is None
                        else n_train - valid_size, shuffle=True, **common)
    valid = StreamSplit(tfds_split=f"train[:{valid_size}]",
                        num_examples=valid_size if n_train else None, **common)
    repair = StreamSplit(tfds_split=f"validation[:{repair_size}]",
                         num_examples=repair_size if n_val else None, **common)
    test = StreamSplit(tfds_split=f"validation[{repair_size}:]",
                       num_examples=None if n_val is None
                       else n_val - repair_size, **common)
    label = builder.info.features["label"]
    return StreamingDataset(
        NAME, train, valid, repair, test, num_classes=label.num_classes,
        class_names=tuple(label.names), normalization=_NORM, mean=MEAN,
        std=STD, seed=seed, source=source or f"tfds:{NAME}")


def load(data_dir: str | None = None, seed: int = 0, batch_size: int = 64,
         image_size: int = IMAGE_SIZE, manual_dir: str | None = None,
         prepare: bool = False) -> StreamingDataset:
    """Streamed ImageNet (module docstring).

    Args:
      data_dir: TFDS data dir holding (or to hold) ``imagenet2012``.
      seed: train-stream shuffle seed.
      batch_size: rows per streamed batch.
      image_size: crop size (224 for DenseNet121).
      manual_dir: folder with the two ILSVRC2012 tars (only for ``prepare``).
      prepare: build the TFDS dataset from ``manual_dir`` into ``data_dir``
        when it is not prepared yet (hours; never downloads).

    Raises:
      DataError: not prepared (and not asked or not able to prepare).
    """
    root = _common.find_prepared_tfds(NAME, data_dir)
    if root is None and prepare:
        tars = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
        if not (data_dir and manual_dir and all(
                os.path.isfile(os.path.join(manual_dir, t)) for t in tars)):
            raise base.DataError(
                f"cannot prepare {NAME}: need data_dir and a manual_dir with "
                f"{' and '.join(tars)} (manual_dir={manual_dir!r}); "
                + _how_to_get(data_dir))
        import tensorflow_datasets as tfds  # heavy optional dependency (TFDS)
        tfds.builder(NAME, data_dir=data_dir).download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=manual_dir))
        root = data_dir
    if root is None:
        raise base.DataError(f"{NAME} is not prepared; "
                             + _how_to_get(data_dir))
    import tensorflow_datasets as tfds  # heavy optional dependency (TFDS)
    builder = tfds.builder(NAME, data_dir=root)
    return from_builder(builder, seed=seed, batch_size=batch_size,
                        image_size=image_size,
                        source=f"tfds:{NAME} ({root})")
