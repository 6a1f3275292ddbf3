"""CIFAR-10 and CIFAR-10S (skewed colour/grey CIFAR-10).

Sources for both, in order:

1. A prepared TFDS ``cifar10`` under ``data_dir``,
   ``data_dir/tensorflow_datasets``, ``$TFDS_DATA_DIR`` or
   ``~/tensorflow_datasets`` (never downloaded).
2. A class-folder tree ``train/<class>/*.jpg|png`` and ``test/<class>/...``
   in ``data_dir/cifar10/`` or ``data_dir``.
3. A ``.tar.gz`` / ``.tgz`` / ``.tar`` of that tree (an optional leading
   folder inside the archive is allowed) in ``data_dir/cifar10/`` or
   ``data_dir``, or ``data_dir`` pointing at the archive itself. Members are
   decoded straight from the archive with Pillow; nothing is extracted to
   disk. The archive must be complete (``_common.iter_tar``: tar
   end-of-archive marker, gzip trailer). The shared ``cifar10_jpg.tar.gz``
   (60,000 JPEGs) decodes in about 8 s on one idle CPU core; the decoded
   uint8 arrays are then cached as an ``.npz`` (about 184 MB) in
   ``$DLFIX_CACHE_DIR`` or ``~/.cache/dlfix_jax``, keyed by the archive's
   path, size and mtime, written atomically; set ``DLFIX_NO_CACHE=1`` to
   turn the cache off.

A copy whose class folders are CIFAR-10's ten must hold all of it (5,000
training and 1,000 test images per class); fewer is refused as truncated
or incomplete (a tar cut at a member boundary otherwise loads as a smaller
dataset).

Class order = sorted folder names (airplane, automobile, bird, cat, deer,
dog, frog, horse, ship, truck for CIFAR-10, which is also TFDS's and Keras's
order). Images must be 32x32; greyscale/RGBA files are converted to RGB.
Files are read in sorted path order, so the result does not depend on the
archive's member order.

CIFAR-10 splits (deterministic for ``seed``): train 45,000 / valid 5,000
drawn from the 50,000 training images; repair 5,000 / test 5,000 drawn from
the 10,000 test images. Normalisation (the study's): ``x/255`` then
``(x - mean) / std`` per channel with ``MEAN``/``STD`` below.

CIFAR-10S: see :func:`load_cifar10s`.
"""

from __future__ import annotations

import glob
import io
import os

import numpy as np
from PIL import Image

from dlfix_jax.data import _common, base

SIZES = (45_000, 5_000, 5_000, 5_000)
# CIFAR-10S: repair and test hold a colour and a grey copy of 5,000 images.
SIZES_S = (45_000, 5_000, 10_000, 10_000)
MEAN = np.array([0.4914009, 0.48215896, 0.4465308], np.float32)
STD = np.array([0.24703279, 0.24348423, 0.26158753], np.float32)
GREY_FRACTION_MINORITY = 0.05
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog",
               "frog", "horse", "ship", "truck")
# Images per class in CIFAR-10's training and test sets.
PER_CLASS = {"train": 5_000, "test": 1_000}
_EXTS = (".jpg", ".jpeg", ".png")
_ARCHIVES = ("*.tar.gz", "*.tgz", "*.tar")
_NORM = ("(x/255 - mean) / std per channel, mean=[0.4914009, 0.48215896, "
         "0.4465308], std=[0.24703279, 0.24348423, 0.26158753]")


def _how_to_get(data_dir) -> str:
    where = (f"{os.path.join(data_dir, 'cifar10')}/ or {data_dir}/"
             if data_dir else "DATA_DIR/cifar10/")
    return (f"expected train/<class>/*.jpg|png and test/<class>/*.jpg|png "
            f"(or a .tar.gz of that tree) in {where}, or a prepared TFDS "
            f"'cifar10' (`tfds build cifar10`) under data_dir, $TFDS_DATA_DIR "
            f"or ~/tensorflow_datasets")


def _parse_member(path: str):
    """(split, class, path) for ``[prefix/]train|test/<class>/<file>.<ext>``,
    else None."""
    parts = path.replace("\\", "/").split("/")
    if len(parts) < 3 or not parts[-1].lower().endswith(_EXTS):
        return None
    if parts[-3] not in ("train", "test") or parts[-1].startswith("."):
        return None
    return parts[-3], parts[-2]


def _decode(blob: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(blob)) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as e:  # Pillow raises several types for bad files
        raise base.DataError(f"cannot decode image {where}: "
                             f"{type(e).__name__}: {e}") from e
    if arr.shape != (32, 32, 3):
        raise base.DataError(f"image {where} is {arr.shape[1]}x{arr.shape[0]}"
                             f", CIFAR-10 images must be 32x32")
    return arr


def _read_archive(path: str):
    """[(split, class, member name, image)] from a complete tar(.gz)
    archive (``_common.iter_tar`` refuses a truncated or corrupt one)."""
    items = []
    for name, blob in _common.iter_tar(
            path, lambda n: _parse_member(n) is not None):
        items.append((*_parse_member(name), name,
                      _decode(blob, f"{path}:{name}")))
    return items


def _read_tree(root: str):
    items = []
    for split in ("train", "test"):
        for cls in sorted(os.listdir(os.path.join(root, split))):
            cdir = os.path.join(root, split, cls)
            if not os.path.isdir(cdir):
                continue
            for f in sorted(os.listdir(cdir)):
                if f.lower().endswith(_EXTS) and not f.startswith("."):
                    p = os.path.join(cdir, f)
                    with open(p, "rb") as fh:
                        items.append((split, cls, p, _decode(fh.read(), p)))
    return items


def _find_source(data_dir: str) -> tuple[str, str] | None:
    """("tree" | "archive", path) or None."""
    if os.path.isfile(data_dir):
        return "archive", data_dir
    for d in _common.candidate_dirs(data_dir, "cifar10"):
        if (os.path.isdir(os.path.join(d, "train"))
                and os.path.isdir(os.path.join(d, "test"))):
            return "tree", d
        archives = sorted(set(sum((glob.glob(os.path.join(d, pat))
                                   for pat in _ARCHIVES), [])))
        if archives:
            # Prefer an archive named like cifar*; else the first in order.
            named = [a for a in archives
                     if os.path.basename(a).lower().startswith("cifar")]
            return "archive", (named or archives)[0]
    return None


def read_cifar10_uint8(data_dir: str | None):
    """Raw CIFAR-10 from the first available source.

    Returns:
      (x_train, y_train, x_test, y_test, class_names, source) with uint8
      (N, 32, 32, 3) images and int32 labels.

    Raises:
      DataError: no source, an unreadable archive or image, or train/test
        class folders that differ.
    """
    root = _common.find_prepared_tfds("cifar10", data_dir)
    if root is not None:
        xtr, ytr = _common.read_tfds_arrays("cifar10", root, "train")
        xte, yte = _common.read_tfds_arrays("cifar10", root, "test")
        return xtr, ytr, xte, yte, CLASS_NAMES, f"tfds:cifar10 ({root})"
    if not data_dir or not os.path.exists(data_dir):
        raise base.DataError(f"CIFAR-10 data_dir {data_dir!r} does not exist; "
                             + _how_to_get(data_dir))
    found = _find_source(data_dir)
    if found is None:
        dirs = " or ".join(_common.candidate_dirs(data_dir, "cifar10"))
        raise base.DataError(f"no CIFAR-10 found in {dirs}; "
                             + _how_to_get(data_dir))
    kind, path = found
    if kind == "archive":
        # Decoding 60,000 JPEGs takes seconds; the decoded uint8 arrays are
        # cached (keyed by the archive's path, size and mtime; see
        # _common.cached_arrays; $DLFIX_NO_CACHE=1 turns this off).
        arr = _common.cached_arrays(
            path, "cifar10-uint8-v1",
            lambda: _to_arrays(_read_archive(path), path, data_dir))
    else:
        arr = _to_arrays(_read_tree(path), path, data_dir)
    names = tuple(str(n) for n in arr["names"])
    return (arr["x_train"], arr["y_train"], arr["x_test"], arr["y_test"],
            names, path)


def _check_complete(items, classes, path) -> None:
    """A copy with CIFAR-10's ten class folders must hold all of CIFAR-10
    (:data:`PER_CLASS`); a smaller one is a truncated or incomplete copy."""
    if tuple(classes) != CLASS_NAMES:
        return  # another class-folder dataset: nothing known to count
    for split, want in PER_CLASS.items():
        counts = {c: 0 for c in classes}
        for sp, c, _, _ in items:
            if sp == split:
                counts[c] += 1
        short = {c: n for c, n in counts.items() if n != want}
        if short:
            c, n = next(iter(short.items()))
            raise base.DataError(
                f"{path} is truncated or incomplete: {split}/{c} holds "
                f"{n:,} images but CIFAR-10 has {want:,} per class "
                f"({len(short)} of 10 {split} classes differ); copy it again")


def _to_arrays(items, path, data_dir) -> dict[str, np.ndarray]:
    items.sort(key=lambda t: (t[0], t[1], t[2]))
    classes = {s: sorted({c for sp, c, _, _ in items if sp == s})
               for s in ("train", "test")}
    if not classes["train"] or not classes["test"]:
        raise base.DataError(f"{path} has no images under "
                             f"{'train' if not classes['train'] else 'test'}"
                             f"/<class>/; " + _how_to_get(data_dir))
    if classes["train"] != classes["test"]:
        raise base.DataError(f"{path}: train classes {classes['train']} differ"
                             f" from test classes {classes['test']}")
    _check_complete(items, classes["train"], path)
    cid = {c: i for i, c in enumerate(classes["train"])}
    out = {"names": np.array(classes["train"])}
    for s in ("train", "test"):
        sel = [t for t in items if t[0] == s]
        out[f"x_{s}"] = np.stack([t[3] for t in sel])
        out[f"y_{s}"] = np.array([cid[t[1]] for t in sel], np.int32)
    return out


def _split_pools(ytr, yte, sizes, seed, source):
    i_tr, i_va = _common.pool_split(len(ytr), sizes[:2], seed,
                                    f"CIFAR-10 train set ({source})")
    i_re, i_te = _common.pool_split(len(yte), sizes[2:], seed,
                                    f"CIFAR-10 test set ({source})")
    return i_tr, i_va, i_re, i_te


def load_cifar10(data_dir: str | None = None, seed: int = 0,
                 sizes=None) -> base.Dataset:
    """CIFAR-10 with the study's splits and normalisation (module docstring).

    Args:
      data_dir: folder with the tree or archive (directly or in
        ``cifar10/``), the archive itself, or a TFDS data dir.
      seed: split seed.
      sizes: (train, valid, repair, test); default 45,000 / 5,000 / 5,000 /
        5,000.
    """
    sizes = _common.check_sizes(sizes, SIZES)
    xtr, ytr, xte, yte, names, source = read_cifar10_uint8(data_dir)
    i_tr, i_va, i_re, i_te = _split_pools(ytr, yte, sizes, seed, source)

    def mk(x, y, idx):
        return base.Split(_common.normalize(x[idx], MEAN, STD), y[idx])

    return base.Dataset(
        "cifar10", mk(xtr, ytr, i_tr), mk(xtr, ytr, i_va), mk(xte, yte, i_re),
        mk(xte, yte, i_te), num_classes=len(names), class_names=names,
        normalization=_NORM, mean=MEAN, std=STD, seed=seed, source=source)


def to_grey(x: np.ndarray) -> np.ndarray:
    """uint8 RGB -> uint8 luminance replicated to 3 channels.

    ITU-R 601-2 luma in Pillow's fixed-point form, so the result equals
    ``Image.convert("L")``, which Wang et al.'s CIFAR-10S code uses (and
    torchvision's ``Grayscale``).
    """
    x = x.astype(np.uint32)
    lum = ((x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471
            + 0x8000) >> 16).astype(np.uint8)
    return np.repeat(lum[..., None], 3, axis=-1)


def skew_grey_mask(y: np.ndarray, num_classes: int, rng: np.random.Generator
                   ) -> np.ndarray:
    """Which training images become grey in CIFAR-10S.

    Classes ``0 .. num_classes//2 - 1`` (airplane, automobile, bird, cat,
    deer) keep 95% colour and get 5% grey; the other classes (dog, frog,
    horse, ship, truck) get 95% grey and 5% colour. Per class, exactly
    ``round(fraction * count)`` images, chosen with ``rng``.
    """
    grey = np.zeros(len(y), bool)
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        frac = (GREY_FRACTION_MINORITY if c < num_classes // 2
                else 1.0 - GREY_FRACTION_MINORITY)
        k = int(round(frac * len(idx)))
        grey[rng.choice(idx, size=k, replace=False)] = True
    return grey


def load_cifar10s(data_dir: str | None = None, seed: int = 0,
                  sizes=None) -> base.Dataset:
    """CIFAR-10S (Wang et al., "Towards Fairness in Visual Recognition",
    CVPR 2020, arXiv 1911.11834), derived from any CIFAR-10 source above.

    * Train and valid (from the 50,000 training images, 45,000 / 5,000):
      classes 0-4 (airplane, automobile, bird, cat, deer) are 95% colour and
      5% grey, classes 5-9 (dog, frog, horse, ship, truck) 5% colour and 95%
      grey; the grey images are chosen per class and per split with the seed
      (``skew_grey_mask``).
    * Repair and test (5,000 + 5,000 drawn from the 10,000 test images): each
      image appears twice, first the colour copy, then the grey copy, so
      each split has 10,000 rows (the study's 10,000 / 10,000).
    * Grey = ITU-R 601-2 luminance replicated to 3 channels (``to_grey``).
    * ``group`` = 1 grey, 0 colour; ``group_names`` = ("color", "gray").

    Normalisation: CIFAR-10's ``(x/255 - mean) / std`` per channel (MEAN, STD),
    not the study's ``(x - 0.16384) / [0.3321, 0.3289, 0.3250]``. The study
    applied those constants to float images stored in its own ``.h5`` file
    whose scaling is not documented; on ``x/255`` images they would leave the
    inputs off-centre (mean about 0.9, std about 0.75). CIFAR-10's constants
    centre the colour images at about 0 with unit scale, keep one input
    scale for the CIFAR-10 and CIFAR-10S models, and make attack bounds
    comparable.

    Args:
      data_dir: any CIFAR-10 source accepted by :func:`load_cifar10`.
      seed: split and grey-selection seed.
      sizes: (train, valid, repair, test) *after* doubling; repair and test
        must be even. Default 45,000 / 5,000 / 10,000 / 10,000.
    """
    sizes = _common.check_sizes(sizes, SIZES_S)
    if sizes[2] % 2 or sizes[3] % 2:
        raise ValueError(f"CIFAR-10S repair/test sizes must be even (colour "
                         f"+ grey copies), got {sizes}")
    xtr, ytr, xte, yte, names, source = read_cifar10_uint8(data_dir)
    base_sizes = (sizes[0], sizes[1], sizes[2] // 2, sizes[3] // 2)
    i_tr, i_va, i_re, i_te = _split_pools(ytr, yte, base_sizes, seed, source)
    k = len(names)

    def skewed(idx, stream):
        rng = np.random.default_rng([seed, stream])
        x, y = xtr[idx], ytr[idx]
        grey = skew_grey_mask(y, k, rng)
        x[grey] = to_grey(x[grey])
        return base.Split(_common.normalize(x, MEAN, STD), y,
                          grey.astype(np.int32))

    def doubled(idx):
        x = xte[idx]
        x2 = np.concatenate([x, to_grey(x)])
        g = np.repeat(np.array([0, 1], np.int32), len(idx))
        return base.Split(_common.normalize(x2, MEAN, STD),
                          np.concatenate([yte[idx], yte[idx]]), g)

    return base.Dataset(
        "cifar10s", skewed(i_tr, 1), skewed(i_va, 2), doubled(i_re),
        doubled(i_te), num_classes=k, class_names=names,
        group_names=("color", "gray"), normalization=_NORM, mean=MEAN,
        std=STD, seed=seed, source=f"{source} (CIFAR-10S derived)")
