"""Helpers shared by the file-based loaders: TFDS detection, split sizes,
normalisation, path lookup and complete-archive reading. Private to
``dlfix_jax.data``.

TFDS is only imported when a prepared dataset is actually on disk (a
``<root>/<name>/<version>/dataset_info.json`` file), so loading local files
never pays for importing TensorFlow, and nothing is ever downloaded.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import os
import tarfile
import zlib
from typing import Callable, Iterator, Sequence

import numpy as np

from dlfix_jax.data import base

TFDS_DATA_DIR_ENV = "TFDS_DATA_DIR"


def default_tfds_roots() -> list[str]:
    """``$TFDS_DATA_DIR`` and ``~/tensorflow_datasets`` (TFDS's defaults)."""
    roots = []
    env = os.environ.get(TFDS_DATA_DIR_ENV)
    if env:
        roots.append(env)
    roots.append(os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))
    return roots


def tfds_roots(data_dir: str | None) -> list[str]:
    """Directories searched for a prepared TFDS dataset, in order:
    ``data_dir``, ``data_dir/tensorflow_datasets``, then TFDS's defaults."""
    roots = []
    if data_dir:
        roots += [data_dir, os.path.join(data_dir, "tensorflow_datasets")]
    roots += default_tfds_roots()
    out = []
    for r in roots:
        if r not in out:
            out.append(r)
    return out


def find_prepared_tfds(name: str, data_dir: str | None, register=None
                       ) -> str | None:
    """The first root holding a prepared TFDS dataset ``name``, else None.

    A cheap file check comes first; only a hit imports TFDS and confirms
    with ``tfds.builder(name, data_dir=root).is_prepared()``. Never
    downloads or prepares anything. ``register`` (optional) is called
    before ``tfds.builder`` to define a builder class that TFDS does not ship.
    """
    for root in tfds_roots(data_dir):
        if not glob.glob(os.path.join(root, name, "*", "dataset_info.json")):
            continue
        import tensorflow_datasets as tfds  # heavy optional dependency (TFDS)
        try:
            if register is not None:
                register()
            if tfds.builder(name, data_dir=root).is_prepared():
                return root
        except Exception as e:  # a broken TFDS folder is a data error
            raise base.DataError(
                f"TFDS dataset {name!r} under {root} could not be opened "
                f"({type(e).__name__}: {e}); delete or re-prepare it with "
                f"`tfds build {name} --data_dir={root}`") from e
    return None


def read_tfds_arrays(name: str, root: str, split: str
                     ) -> tuple[np.ndarray, np.ndarray]:
    """A whole TFDS ``split`` of a small dataset as (uint8 images, int32
    labels)."""
    import tensorflow_datasets as tfds  # heavy optional dependency (TFDS)
    builder = tfds.builder(name, data_dir=root)
    ds = builder.as_dataset(split=split, as_supervised=True,
                            shuffle_files=False).batch(4096)
    xs, ys = [], []
    for x, y in tfds.as_numpy(ds):
        xs.append(np.asarray(x, np.uint8))
        ys.append(np.asarray(y, np.int32))
    if not xs:
        raise base.DataError(f"TFDS {name!r} split {split!r} under {root} "
                             f"is empty")
    return np.concatenate(xs), np.concatenate(ys)


def check_sizes(sizes: Sequence[int] | None, default: Sequence[int]
                ) -> tuple[int, int, int, int]:
    """``sizes`` (train, valid, repair, test) or the study's ``default``."""
    if sizes is None:
        return tuple(int(s) for s in default)
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) != 4 or min(sizes) < 0:
        raise ValueError(f"sizes must be 4 non-negative ints (train, valid, "
                         f"repair, test), got {sizes}")
    return sizes


def pool_split(n: int, sizes: Sequence[int], seed: int, what: str
               ) -> list[np.ndarray]:
    """``base.split_indices`` with a DataError that says the source is too
    small for the requested split sizes."""
    if sum(sizes) > n:
        raise base.DataError(
            f"{what} holds {n:,} examples but the splits need "
            f"{' + '.join(f'{s:,}' for s in sizes)} = {sum(sizes):,}; the "
            f"source is incomplete (or pass smaller sizes=...)")
    return base.split_indices(n, sizes, seed)


def normalize(x_uint8: np.ndarray, mean: np.ndarray, std: np.ndarray,
              chunk: int = 8192) -> np.ndarray:
    """``(x/255 - mean) / std`` as float32, in chunks to bound the temporary
    memory (CIFAR-10 in float64 would need 1.5 GB at once)."""
    out = np.empty(x_uint8.shape, np.float32)
    mean = np.asarray(mean, np.float32)
    scale = np.float32(1.0) / (np.float32(255.0) * np.asarray(std, np.float32))
    shift = mean / np.asarray(std, np.float32)
    for i in range(0, len(x_uint8), chunk):
        # (x/255 - m)/s == x * (1/(255 s)) - m/s; float32, in place.
        o = out[i:i + chunk]
        o[...] = x_uint8[i:i + chunk]
        o *= scale
        o -= shift
    return out


def candidate_dirs(data_dir: str | None, name: str) -> list[str]:
    """``data_dir/name`` then ``data_dir`` (both layouts are accepted)."""
    if not data_dir:
        return []
    return [os.path.join(data_dir, name), data_dir]


CACHE_DIR_ENV = "DLFIX_CACHE_DIR"
NO_CACHE_ENV = "DLFIX_NO_CACHE"


def cache_dir() -> str | None:
    """``$DLFIX_CACHE_DIR``, else ``$XDG_CACHE_HOME/dlfix_jax`` or
    ``~/.cache/dlfix_jax``; None when ``$DLFIX_NO_CACHE=1``."""
    if os.environ.get(NO_CACHE_ENV) == "1":
        return None
    d = os.environ.get(CACHE_DIR_ENV)
    if d:
        return d
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "dlfix_jax")


def cached_arrays(source: str, tag: str, compute) -> dict[str, np.ndarray]:
    """``compute()`` (a dict of arrays) cached as an ``.npz`` keyed by the
    source file's absolute path, size and mtime, plus ``tag``.

    A changed source gets a new key, so a stale cache is never read. The file
    is written to a temporary name and renamed, so readers never see a
    partial file; it is read with ``allow_pickle=False`` (plain arrays only).
    Any cache I/O problem falls back to ``compute()`` — the result is the
    same either way, only slower.
    """
    d = cache_dir()
    if d is None:
        return compute()
    st = os.stat(source)
    key = hashlib.sha256(
        f"{os.path.abspath(source)}|{st.st_size}|{st.st_mtime_ns}|{tag}"
        .encode()).hexdigest()[:24]
    path = os.path.join(d, f"{tag}-{key}.npz")
    if os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception:  # corrupt cache: recompute and overwrite
            pass
    arrays = compute()
    try:
        os.makedirs(d, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:
        try:
            os.remove(tmp)
        except (OSError, UnboundLocalError):
            pass
    return arrays


# --------------------------------------------------------------- archives ---


class _EndRecordingInfo(tarfile.TarInfo):
    """A TarInfo that records on the TarFile why its member list ended.

    Past the first member, tarfile ends the iteration *silently* at the end
    of the file, at a truncated header and at a corrupt header; only a zero
    block is a real end-of-archive marker. The header error that ended the
    list is kept as ``tf.dlfix_end`` so :func:`iter_tar` can tell them apart.
    """

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf.dlfix_end = e
            raise


def iter_tar(path: str, accept: Callable[[str], bool]
             ) -> Iterator[tuple[str, bytes]]:
    """``(member name, bytes)`` of the regular files of a ``.tar`` /
    ``.tar.gz`` whose name ``accept`` accepts, in archive order, in one
    sequential pass (nothing is extracted to disk).

    The archive must be complete: the tar stream must end in its
    end-of-archive zero block and a gzip stream in its trailer (CRC-32 and
    length checked), so a copy cut anywhere, even at a member boundary, is
    refused instead of loading as a smaller dataset.

    Raises:
      DataError: naming ``path``; the message says "truncated" when the
        archive ends early and "corrupt" for a bad header or checksum.
    """
    members = 0
    try:
        with open(path, "rb") as raw:
            is_gz = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if is_gz else raw
            with tarfile.open(fileobj=stream, mode="r|" if is_gz else "r|*",
                              tarinfo=_EndRecordingInfo) as tf:
                for m in tf:
                    members += 1
                    if m.isfile() and accept(m.name):
                        yield m.name, tf.extractfile(m).read()
                end, offset = getattr(tf, "dlfix_end", None), tf.offset
            if not isinstance(end, tarfile.EOFHeaderError):
                what = ("corrupt" if isinstance(
                    end, tarfile.InvalidHeaderError) else "truncated")
                raise base.DataError(
                    f"cannot read archive {path}: it is {what}, its tar "
                    f"stream stops after {members:,} members at byte "
                    f"{offset:,} without the end-of-archive marker ({end}); "
                    f"copy it again")
            if is_gz:  # read to the end: checks the gzip CRC and length
                while stream.read(1 << 20):
                    pass
    except EOFError as e:
        raise base.DataError(f"cannot read archive {path}: it is truncated "
                             f"after {members:,} members ({e}); copy it "
                             f"again") from e
    except tarfile.ReadError as e:
        what = "truncated" if "unexpected end" in str(e) else "corrupt"
        raise base.DataError(f"cannot read archive {path}: it is {what} "
                             f"after {members:,} members ({e})") from e
    except (tarfile.TarError, OSError, zlib.error) as e:
        raise base.DataError(f"cannot read archive {path}: corrupt or "
                             f"unreadable after {members:,} members "
                             f"({type(e).__name__}: {e})") from e
