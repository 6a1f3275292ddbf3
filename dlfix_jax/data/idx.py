"""MNIST and Fashion-MNIST: TFDS when prepared, else local IDX files.

Sources, in order:

1. A prepared TFDS dataset (``mnist`` / ``fashion_mnist``) under ``data_dir``,
   ``data_dir/tensorflow_datasets``, ``$TFDS_DATA_DIR`` or
   ``~/tensorflow_datasets``. Nothing is ever downloaded.
2. The four IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
   ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (gzip-compressed
   with ``.gz`` or not; a ``.`` instead of the last ``-`` as some mirrors
   write it is accepted) in ``data_dir/<name>/`` or in ``data_dir``.

IDX files are validated: magic number (two zero bytes, type 0x08 = uint8, the
expected number of dimensions), the declared sizes against the file length,
28x28 images, equal image and label counts, labels in 0..9. A malformed file
gives a :class:`~dlfix_jax.data.base.DataError` naming it.

Splits (the study's, deterministic for ``seed``): train 54,000 / valid 6,000
drawn from the official 60,000 training images; repair 5,000 / test 5,000
drawn from the official 10,000 test images (``base.split_indices`` on each
pool with the same seed). ``sizes=`` overrides (train, valid, repair, test),
e.g. for tiny test data.

Normalisation: ``x/255`` (the study's), shape (28, 28, 1), float32.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib

import numpy as np

from dlfix_jax.data import _common, base

SIZES = (54_000, 6_000, 5_000, 5_000)

MNIST_CLASSES = tuple(str(i) for i in range(10))
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# (split, kind) -> stem; ``kind`` is images or labels.
_STEMS = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


def _how_to_get(name: str, data_dir: str | None) -> str:
    where = (f"{os.path.join(data_dir, name)}/ or {data_dir}/" if data_dir
             else "DATA_DIR/<name>/")
    files = ", ".join(s + ".gz" for s in _STEMS.values())
    return (f"put {files} (gzip or uncompressed IDX) in {where}, or prepare "
            f"TFDS {name!r} (`tfds build {name}`) under data_dir, "
            f"$TFDS_DATA_DIR or ~/tensorflow_datasets")


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Reads one uint8 IDX file (gzip or raw) with ``ndim`` dimensions.

    Raises:
      DataError: naming ``path`` when the file cannot be decompressed, has a
        wrong magic number or type, or its length disagrees with its header.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)  # checks the CRC-32 and length
    except EOFError as e:
        raise base.DataError(f"cannot read IDX file {path}: the gzip stream "
                             f"is truncated ({e})") from e
    except (OSError, zlib.error) as e:
        raise base.DataError(f"cannot read IDX file {path} (corrupt?): "
                             f"{type(e).__name__}: {e}") from e
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise base.DataError(f"malformed IDX file {path}: {len(raw)} bytes, "
                             f"shorter than its {header}-byte header")
    z0, z1, dtype, nd = raw[:4]
    if (z0, z1) != (0, 0) or dtype != 0x08 or nd != ndim:
        raise base.DataError(
            f"malformed IDX file {path}: magic {raw[:4].hex()} but expected "
            f"0000080{ndim} (uint8, {ndim} dimensions)")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    expected = header + math.prod(dims)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "malformed"
        raise base.DataError(
            f"{what} IDX file {path}: header declares shape {dims} "
            f"({expected:,} bytes) but the file has {len(raw):,} bytes")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _find(dirs: list[str], stem: str) -> str | None:
    names = [stem + ".gz", stem]
    # Some mirrors write e.g. train-images.idx3-ubyte.
    alt = stem.rsplit("-", 2)
    if len(alt) == 3:
        dotted = f"{alt[0]}.{alt[1]}-{alt[2]}"
        names += [dotted + ".gz", dotted]
    for d in dirs:
        for n in names:
            p = os.path.join(d, n)
            if os.path.isfile(p):
                return p
    return None


def read_idx_pair(data_dir: str | None, name: str, split: str
                  ) -> tuple[np.ndarray, np.ndarray, str]:
    """(images (N, 28, 28) uint8, labels (N,) int32, images path) of the
    official ``split`` ("train" or "test") from local IDX files."""
    dirs = _common.candidate_dirs(data_dir, name)
    paths = {k: _find(dirs, _STEMS[(split, k)]) for k in ("images", "labels")}
    missing = [_STEMS[(split, k)] for k, p in paths.items() if p is None]
    if missing:
        raise base.DataError(
            f"{name}: {', '.join(missing)}[.gz] not found in "
            f"{' or '.join(dirs) or '(no data_dir)'}; "
            + _how_to_get(name, data_dir))
    x = read_idx(paths["images"], 3)
    y = read_idx(paths["labels"], 1)
    if x.shape[1:] != (28, 28):
        raise base.DataError(f"malformed IDX file {paths['images']}: images "
                             f"are {x.shape[1:]}, expected (28, 28)")
    if len(x) != len(y):
        raise base.DataError(
            f"{paths['images']} has {len(x):,} images but {paths['labels']} "
            f"has {len(y):,} labels")
    if len(y) and y.max() > 9:
        raise base.DataError(f"malformed IDX file {paths['labels']}: label "
                             f"{int(y.max())} outside 0..9")
    return x, y.astype(np.int32), paths["images"]


def _load(name: str, class_names, data_dir, seed, sizes) -> base.Dataset:
    sizes = _common.check_sizes(sizes, SIZES)
    root = _common.find_prepared_tfds(name, data_dir)
    if root is not None:
        xtr, ytr = _common.read_tfds_arrays(name, root, "train")
        xte, yte = _common.read_tfds_arrays(name, root, "test")
        xtr, xte = xtr.reshape(-1, 28, 28), xte.reshape(-1, 28, 28)
        source = f"tfds:{name} ({root})"
    else:
        if not data_dir:
            raise base.DataError(f"no data_dir given for {name!r} and no "
                                 f"prepared TFDS dataset found; "
                                 + _how_to_get(name, data_dir))
        xtr, ytr, ptr = read_idx_pair(data_dir, name, "train")
        xte, yte, _ = read_idx_pair(data_dir, name, "test")
        source = os.path.dirname(ptr)
    i_tr, i_va = _common.pool_split(len(ytr), sizes[:2], seed,
                                    f"{name} official train set ({source})")
    i_re, i_te = _common.pool_split(len(yte), sizes[2:], seed,
                                    f"{name} official test set ({source})")

    def mk(x, y, idx):
        return base.Split((x[idx].astype(np.float32) / np.float32(255.0)
                           )[..., None], y[idx])

    return base.Dataset(
        name, mk(xtr, ytr, i_tr), mk(xtr, ytr, i_va), mk(xte, yte, i_re),
        mk(xte, yte, i_te), num_classes=10, class_names=class_names,
        normalization="x/255", mean=np.zeros(1, np.float32),
        std=np.ones(1, np.float32), seed=seed, source=source)


def load_mnist(data_dir: str | None = None, seed: int = 0,
               sizes=None) -> base.Dataset:
    """MNIST with the study's splits (see the module docstring).

    Args:
      data_dir: folder holding the IDX files (directly or in ``mnist/``) or a
        prepared TFDS ``mnist``.
      seed: split seed.
      sizes: (train, valid, repair, test); default 54,000 / 6,000 / 5,000 /
        5,000.
    """
    return _load("mnist", MNIST_CLASSES, data_dir, seed, sizes)


def load_fashion_mnist(data_dir: str | None = None, seed: int = 0,
                       sizes=None) -> base.Dataset:
    """Fashion-MNIST, same layout, splits and normalisation as MNIST."""
    return _load("fashion_mnist", FASHION_CLASSES, data_dir, seed, sizes)
