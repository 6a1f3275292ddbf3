"""UTKFace: gender classification with race as the sensitive attribute.

UTKFace (Zhang, Song, Qi, CVPR 2017) encodes labels in the file names,
``<age>_<gender>_<race>_<date>.jpg.chip.jpg`` with gender 0 male, 1 female and
race 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others.

Sources, in order:

1. A prepared TFDS dataset ``utkface`` built with :func:`tfds_builder_class`
   (manual download) under ``data_dir``, ``data_dir/tensorflow_datasets``,
   ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
2. A ``.tar`` / ``.tar.gz`` / ``.tgz`` of the face images in
   ``data_dir/utkface/`` or ``data_dir`` (or ``data_dir`` pointing at the
   archive), read member by member without extracting.
3. A folder of the ``*.jpg`` files, directly in ``data_dir/utkface/`` or
   ``data_dir``, or one folder level below (e.g. ``crop_part1/``,
   ``UTKFace/``).

Archives must be complete (``_common.iter_tar``: tar end-of-archive marker,
gzip trailer): tarfile alone reads a tar cut at a member boundary as a
smaller dataset. Images in a folder named like a published copy
(``crop_part1/`` 9,780 files, ``UTKFace/`` 23,708) must all be there; fewer
is refused as truncated or incomplete.

File names that do not parse (e.g. UTKFace's known ``61_1_<date>.jpg.chip.jpg``
with the race field missing) are skipped and counted in one warning.

Task: gender (0 male, 1 female; 2 classes). ``group`` = race white (0) vs
non-white (1), ``group_names = ("white", "non-white")``. Images are resized
(Pillow bilinear, antialiased) to ``image_size`` x ``image_size`` RGB; the
FaceNet model uses 64x64x3.

Splits: the study's proportions 17,778 / 1,975 / 1,976 / 1,976 of its
23,705 images, scaled to the ``n`` valid images found (valid, repair and test
rounded, train the rest), drawn with ``base.split_indices`` from the images
sorted by file name. For the shared ``crop_part1`` copy (9,780 files, 2
malformed, n = 9,778) that is 7,333 / 815 / 815 / 815.

Normalisation: ``(x/255 - MEAN) / STD`` per channel with fixed constants
measured once on all 9,778 valid ``crop_part1`` images at 64x64 (numbers
below), not the study's ``(x - 0.03317774) / 0.18214759``: the study applied
that to float images stored in its own ``.h5`` file whose scaling is not
documented, and on ``x/255`` images it would give inputs with mean about 2.6
and std about 1.3 instead of about 0 and 1. Fixed constants (rather than
statistics of whatever copy is loaded) keep one model valid across copies.
"""

from __future__ import annotations

import glob
import io
import os
import warnings

import numpy as np
from PIL import Image

from dlfix_jax.data import _common, base

STUDY_SIZES = (17_778, 1_975, 1_976, 1_976)
IMAGE_SIZE = 64
# Per-channel mean / std of x/255 over the 9,778 valid crop_part1 images
# resized to 64x64 (computed with this module's decoder; see module docstring).
MEAN = np.array([0.63603, 0.48746, 0.41884], np.float32)
STD = np.array([0.24673, 0.22277, 0.22068], np.float32)
GROUP_NAMES = ("white", "non-white")
CLASS_NAMES = ("male", "female")
_ARCHIVES = ("*.tar", "*.tar.gz", "*.tgz")
# Image files (parseable names or not) in the published UTKFace folders:
# crop_part1 (the shared copy, /work/shared/data/utkface/README.txt) and the
# aligned-and-cropped UTKFace/ (23,708 files, 23,705 with parseable names).
KNOWN_COPIES = {"crop_part1": 9_780, "UTKFace": 23_708}
_EXTS = (".jpg", ".jpeg", ".png")


def _how_to_get(data_dir) -> str:
    where = (f"{os.path.join(data_dir, 'utkface')}/ or {data_dir}/"
             if data_dir else "DATA_DIR/utkface/")
    return (f"expected UTKFace images named <age>_<gender>_<race>_<date>"
            f".jpg[.chip.jpg] in a .tar/.tar.gz or a folder in {where}; get "
            f"them from https://susanqq.github.io/UTKFace/ (research use "
            f"only), or prepare the TFDS builder "
            f"dlfix_jax.data.utkface.tfds_builder_class() with "
            f"--manual_dir")


def parse_name(name: str) -> tuple[int, int, int] | None:
    """(age, gender, race) from a UTKFace file name, or None if malformed."""
    base_name = os.path.basename(name)
    if not base_name.lower().endswith(_EXTS) or base_name.startswith("."):
        return None
    parts = base_name.split("_")
    if len(parts) < 4:
        return None
    try:
        age, gender, race = int(parts[0]), int(parts[1]), int(parts[2])
    except ValueError:
        return None
    if not (0 <= age <= 130 and gender in (0, 1) and 0 <= race <= 4):
        return None
    return age, gender, race


def split_sizes(n: int) -> tuple[int, int, int, int]:
    """The study's proportions scaled to ``n`` images (train takes the
    rounding remainder)."""
    total = sum(STUDY_SIZES)
    rest = [int(round(n * s / total)) for s in STUDY_SIZES[1:]]
    return (n - sum(rest), *rest)


def _decode(blob: bytes, where: str, size: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(blob)) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im)
    except Exception as e:  # Pillow raises several types for bad files
        raise base.DataError(f"cannot decode image {where}: "
                             f"{type(e).__name__}: {e}") from e


def _iter_archive(path: str):
    """(member name, bytes) of every image-named file in a complete
    tar(.gz) (``_common.iter_tar`` refuses a truncated or corrupt one)."""
    return _common.iter_tar(path, lambda n: n.lower().endswith(_EXTS))


def _check_known_copies(names: list[str], path: str) -> None:
    """Image files per folder of a known UTKFace copy (:data:`KNOWN_COPIES`)
    must be all of it; fewer is a truncated or incomplete copy."""
    counts: dict[str, int] = {}
    for n in names:
        folder = os.path.basename(os.path.dirname(n.replace("\\", "/")))
        if folder in KNOWN_COPIES:
            counts[folder] = counts.get(folder, 0) + 1
    for folder, n in sorted(counts.items()):
        if n != KNOWN_COPIES[folder]:
            raise base.DataError(
                f"{path} is truncated or incomplete: {folder}/ holds {n:,} "
                f"image files but UTKFace's {folder} has "
                f"{KNOWN_COPIES[folder]:,}; copy it again (or rename the "
                f"folder if it is a deliberate subset)")


def _folder_images(d: str) -> list[str]:
    def imgs(folder):
        return [os.path.join(folder, f) for f in os.listdir(folder)
                if f.lower().endswith(_EXTS) and not f.startswith(".")]
    found = imgs(d)
    if not found:
        for sub in sorted(os.listdir(d)):
            if os.path.isdir(os.path.join(d, sub)):
                found += imgs(os.path.join(d, sub))
    return found


def _find_source(data_dir: str):
    if os.path.isfile(data_dir):
        return "archive", data_dir
    for d in _common.candidate_dirs(data_dir, "utkface"):
        if not os.path.isdir(d):
            continue
        archives = sorted(set(sum((glob.glob(os.path.join(d, p))
                                   for p in _ARCHIVES), [])))
        if archives:
            named = [a for a in archives
                     if "utk" in os.path.basename(a).lower()]
            return "archive", (named or archives)[0]
        files = _folder_images(d)
        if any(parse_name(f) for f in files):
            return "folder", d
    return None


def _read(kind: str, path: str, size: int) -> dict[str, np.ndarray]:
    """Decoded uint8 images, labels and the malformed names, sorted by file
    name."""
    if kind == "archive":
        blobs = _iter_archive(path)
    else:
        def blobs():
            for f in _folder_images(path):
                with open(f, "rb") as fh:
                    yield f, fh.read()
        blobs = blobs()
    rows, bad, names = [], [], []
    for name, blob in blobs:
        names.append(name)
        lab = parse_name(name)
        if lab is None:
            bad.append(os.path.basename(name))
            continue
        rows.append((os.path.basename(name), lab,
                     _decode(blob, f"{path}:{name}", size)))
    _check_known_copies(names, path)
    rows.sort(key=lambda r: r[0])
    if not rows:
        raise base.DataError(f"no UTKFace images with parseable names in "
                             f"{path}; " + _how_to_get(os.path.dirname(path)))
    labels = np.array([r[1] for r in rows], np.int32)
    return {"x": np.stack([r[2] for r in rows]), "age": labels[:, 0],
            "gender": labels[:, 1], "race": labels[:, 2],
            "malformed": np.array(sorted(bad), dtype=str)}


def read_utkface_uint8(data_dir: str | None, image_size: int = IMAGE_SIZE):
    """(arrays dict, source) of the whole local UTKFace copy; see ``_read``.
    Warns once with the count of skipped malformed names."""
    root = _common.find_prepared_tfds("utkface", data_dir,
                                      register=tfds_builder_class)
    if root is not None:
        arr = _read_tfds(root, image_size)
        source = f"tfds:utkface ({root})"
    else:
        if not data_dir or not os.path.exists(data_dir):
            raise base.DataError(f"UTKFace data_dir {data_dir!r} does not "
                                 f"exist; " + _how_to_get(data_dir))
        found = _find_source(data_dir)
        if found is None:
            raise base.DataError(
                f"no UTKFace archive or image folder found in "
                f"{' or '.join(_common.candidate_dirs(data_dir, 'utkface'))}"
                f"; " + _how_to_get(data_dir))
        kind, source = found
        if kind == "archive":
            arr = _common.cached_arrays(
                source, f"utkface-uint8-v1-{image_size}",
                lambda: _read(kind, source, image_size))
        else:
            arr = _read(kind, source, image_size)
    bad = [str(b) for b in arr["malformed"]]
    if bad:
        warnings.warn(
            f"UTKFace: skipped {len(bad)} file(s) with malformed names in "
            f"{source}: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}",
            stacklevel=3)
    return arr, source


def load(data_dir: str | None = None, seed: int = 0,
         image_size: int = IMAGE_SIZE, sizes=None) -> base.Dataset:
    """UTKFace gender with race groups (see the module docstring).

    Args:
      data_dir: folder holding the archive or images (directly or in
        ``utkface/``), the archive itself, or a TFDS data dir.
      seed: split seed.
      image_size: output height and width (FaceNet: 64).
      sizes: (train, valid, repair, test); default the study's proportions
        of the valid images found (:func:`split_sizes`).
    """
    arr, source = read_utkface_uint8(data_dir, image_size)
    x, y = arr["x"], arr["gender"].astype(np.int32)
    group = (arr["race"] != 0).astype(np.int32)
    n = len(y)
    sizes = _common.check_sizes(sizes, split_sizes(n))
    idx = _common.pool_split(n, sizes, seed, f"UTKFace ({source})")
    splits = [base.Split(_common.normalize(x[i], MEAN, STD), y[i], group[i])
              for i in idx]
    return base.Dataset(
        "utkface", *splits, num_classes=2, class_names=CLASS_NAMES,
        group_names=GROUP_NAMES,
        normalization=(f"resize {image_size}x{image_size} bilinear, "
                       f"(x/255 - mean) / std per channel, mean="
                       f"{MEAN.tolist()}, std={STD.tolist()}"),
        mean=MEAN, std=STD, seed=seed, source=source)


# ---------------------------------------------------------------- TFDS ---

_BUILDER = None


def tfds_builder_class():
    """The TFDS ``utkface`` builder (manual download), created on first call
    so that importing this module does not import TensorFlow.

    Prepare once with::

        from dlfix_jax.data import utkface
        import tensorflow_datasets as tfds
        cls = utkface.tfds_builder_class()
        b = cls(data_dir=DATA_DIR)
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=MANUAL_DIR))  # MANUAL_DIR holds the tar or the jpgs

    after which ``load(DATA_DIR)`` reads the prepared dataset. The builder
    has one split, ``train``, with every parseable image at its original
    size (200x200); ``load`` resizes and splits it.
    """
    global _BUILDER
    if _BUILDER is not None:
        return _BUILDER
    import tensorflow_datasets as tfds  # heavy optional dependency (TFDS)

    class Utkface(tfds.core.GeneratorBasedBuilder):
        """UTKFace faces with age, gender and race from the file names."""

        # Defined at run time, so it has no code file: without this TFDS
        # 4.9 looks for a checksums file next to the code and needs the
        # optional importlib_resources package to do so.
        code_path = None
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Initial release."}
        MANUAL_DOWNLOAD_INSTRUCTIONS = (
            "Download UTKFace (https://susanqq.github.io/UTKFace/, research "
            "use only) and place the .tar/.tar.gz archive (e.g. "
            "crop_part1.tar.gz or UTKFace.tar.gz) or the folder of "
            "<age>_<gender>_<race>_<date>.jpg.chip.jpg images in manual_dir.")

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "age": tfds.features.Scalar(np.int32),
                    "gender": tfds.features.ClassLabel(names=CLASS_NAMES),
                    "race": tfds.features.ClassLabel(
                        names=("white", "black", "asian", "indian", "others")),
                    "file_name": tfds.features.Text(),
                }),
                supervised_keys=("image", "gender"),
                homepage="https://susanqq.github.io/UTKFace/")

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(
                str(dl_manager.manual_dir))}

        def _generate_examples(self, manual_dir):
            found = _find_source(manual_dir)
            if found is None:
                raise base.DataError(f"no UTKFace data in manual_dir "
                                     f"{manual_dir}; " + _how_to_get(None))
            kind, path = found
            if kind == "archive":
                blobs = _iter_archive(path)
            else:
                blobs = ((f, open(f, "rb").read())
                         for f in _folder_images(path))
            for name, blob in blobs:
                lab = parse_name(name)
                if lab is None:
                    continue
                with Image.open(io.BytesIO(blob)) as im:
                    img = np.asarray(im.convert("RGB"))
                fname = os.path.basename(name)
                yield fname, {"image": img, "age": lab[0], "gender": lab[1],
                              "race": lab[2], "file_name": fname}

    _BUILDER = Utkface
    return Utkface


def _read_tfds(root: str, image_size: int) -> dict[str, np.ndarray]:
    tfds_builder_class()  # registers the "utkface" name with TFDS
    import tensorflow_datasets as tfds  # heavy optional dependency (TFDS)
    b = tfds.builder("utkface", data_dir=root)
    rows = []
    for ex in tfds.as_numpy(b.as_dataset(split="train", shuffle_files=False)):
        img = Image.fromarray(ex["image"]).resize(
            (image_size, image_size), Image.Resampling.BILINEAR)
        rows.append((ex["file_name"].decode(), ex["age"], ex["gender"],
                     ex["race"], np.asarray(img)))
    rows.sort(key=lambda r: r[0])
    return {"x": np.stack([r[4] for r in rows]),
            "age": np.array([r[1] for r in rows], np.int32),
            "gender": np.array([r[2] for r in rows], np.int32),
            "race": np.array([r[3] for r in rows], np.int32),
            "malformed": np.array([], dtype=str)}
