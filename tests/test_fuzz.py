"""Fuzz-style robustness of the loaders and importers (issue 11).

Small synthetic files of every format we read from disk: MNIST IDX ``.gz``
files, a CIFAR-10 class-folder ``.tar.gz``, a UTKFace ``.tar``, a Keras
``.h5`` and a ``variables.msgpack``. Each is truncated and has single bits
flipped at random offsets (fixed seed). Every case must end, within a
deadline, in either

* the loader's own one-line error (DataError, KerasImportError,
  CheckpointError), or
* a load equal to the clean one; a *different* load is allowed only when
  the flipped byte lies inside raw payload that the format cannot check
  (image bytes in an uncompressed tar, raw HDF5 dataset bytes, msgpack
  array bytes: none of them carries a checksum), and then the structure
  (counts, shapes, labels) must still be the clean one.

Never a hang, another exception type, or a silent partial load. gzip
carries a CRC-32, so for the ``.gz`` formats every successful load must be
the clean one.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import struct
import tarfile
import warnings

import h5py
import jax
import numpy as np
import pytest
from PIL import Image

from dlfix_jax.data import _common, base, cifar, idx, utkface
from dlfix_jax.models import keras_h5, zoo
from dlfix_jax.models.layers import spec
from dlfix_jax.training import checkpoint

CASES_PER_FORMAT = 24  # half truncations, half bit flips
SEED = 20240611


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    monkeypatch.setattr(_common, "default_tfds_roots", lambda: [])
    monkeypatch.setenv(_common.NO_CACHE_ENV, "1")


class _Deadline(Exception):
    pass


def _run(fn, seconds=20):
    def on_alarm(signum, frame):
        raise _Deadline(f"no answer within {seconds} s (a hang)")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _mutations(raw: bytes, rng):
    """(kind, offset, mutated bytes): truncations then single-bit flips."""
    n = CASES_PER_FORMAT // 2
    cuts = [0, len(raw) - 1] + sorted(
        int(c) for c in rng.integers(1, len(raw) - 1, n - 2))
    for c in cuts:
        yield "truncate", c, raw[:c]
    for o in rng.integers(0, len(raw), n):
        b = bytearray(raw)
        b[int(o)] ^= 1 << int(rng.integers(0, 8))
        yield "flip", int(o), bytes(b)


def _fuzz(raw, write, load, same, errors, payload=(), rng=None):
    """Runs every mutation of ``raw``; returns the outcome counts."""
    clean = load()
    out = {"error": 0, "clean": 0, "payload": 0}
    for kind, off, data in _mutations(raw, rng):
        write(data)
        where = f"{kind} at byte {off} of {len(raw)}"
        try:
            got = _run(load)
        except errors as e:
            msg = str(e)
            assert msg and "\n" not in msg, (where, msg)
            out["error"] += 1
            continue
        except _Deadline:
            pytest.fail(f"{where}: hang")
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{where}: unexpected {type(e).__name__}: {e}")
        verdict = same(clean, got)
        if verdict == "equal":
            out["clean"] += 1
            continue
        in_payload = kind == "flip" and any(a <= off < b for a, b in payload)
        assert in_payload and verdict == "same structure", (
            f"{where}: silent wrong load ({verdict}) outside unchecked "
            f"payload")
        out["payload"] += 1
    write(raw)
    assert out["error"] > 0  # the mutations do hit checked structure
    print(f"fuzz outcomes: {out}")
    return out


def _png(rng, size):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                    ).save(buf, "PNG")
    return buf.getvalue()


def _dataset_same(a, b) -> str:
    if [len(s) for s in a.splits.values()] != [len(s) for s in
                                               b.splits.values()]:
        return "different sizes"
    for s in a.splits:
        sa, sb = a.splits[s], b.splits[s]
        if not np.array_equal(sa.y, sb.y) or (
                sa.group is not None and not np.array_equal(sa.group,
                                                            sb.group)):
            return "different labels"
    if all(np.array_equal(a.splits[s].x, b.splits[s].x) for s in a.splits):
        return "equal"
    return "same structure"


def test_fuzz_idx_gz(tmp_path):
    rng = np.random.default_rng(SEED)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, 12),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (6, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, 6)}
    raws = {}
    for stem, a in arrays.items():
        head = bytes([0, 0, 8, a.ndim]) + struct.pack(">" + "I" * a.ndim,
                                                       *a.shape)
        raws[stem] = gzip.compress(head + a.astype(np.uint8).tobytes(),
                                   mtime=0)
        (tmp_path / f"{stem}.gz").write_bytes(raws[stem])
    for stem in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        path = tmp_path / f"{stem}.gz"
        _fuzz(raws[stem], path.write_bytes,
              lambda: idx.load_mnist(str(tmp_path), sizes=(8, 4, 3, 3)),
              _dataset_same, base.DataError, rng=rng)


def test_fuzz_cifar_targz(tmp_path):
    rng = np.random.default_rng(SEED + 1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for split, n in (("test", 2), ("train", 3)):
            for c in ("ant", "bee"):
                for i in range(n):
                    blob = _png(rng, 32)
                    info = tarfile.TarInfo(f"cifar10/{split}/{c}/{i}.png")
                    info.size = len(blob)
                    tf.addfile(info, io.BytesIO(blob))
    raw = gzip.compress(buf.getvalue(), mtime=0)
    path = tmp_path / "cifar10.tar.gz"
    path.write_bytes(raw)
    _fuzz(raw, path.write_bytes,
          # small sizes, so that a partial load would pass the split
          lambda: cifar.load_cifar10(str(path), sizes=(1, 1, 1, 1)),
          _dataset_same, base.DataError, rng=rng)


def test_fuzz_utkface_tar(tmp_path):
    rng = np.random.default_rng(SEED + 2)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(8):
            blob = _png(rng, 12)
            info = tarfile.TarInfo(
                f"faces/{20 + i}_{i % 2}_{i % 5}_2017{i:04d}.jpg.chip.jpg")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        payload = [(m.offset_data, m.offset_data + m.size) for m in tf]
    path = tmp_path / "utkface.tar"
    path.write_bytes(raw)
    _fuzz(raw, path.write_bytes,
          # default sizes: scaled to what was read (a partial load is silent)
          lambda: utkface.load(str(path), image_size=8),
          _dataset_same, base.DataError, payload=payload, rng=rng)


def _tree_same(a, b) -> str:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    if (jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b)
            or [np.shape(x) for x in la] != [np.shape(x) for x in lb]):
        return "different structure"
    if all(np.array_equal(np.asarray(x), np.asarray(y))
           for x, y in zip(la, lb)):
        return "equal"
    return "same structure"


def test_fuzz_keras_h5(tmp_path):
    rng = np.random.default_rng(SEED + 3)
    path = tmp_path / "model.h5"
    cfg = {"class_name": "Sequential", "config": {"name": "seq", "layers": [
        {"class_name": "InputLayer",
         "config": {"name": "in", "batch_input_shape": [None, 4, 4, 1]}},
        {"class_name": "Flatten", "config": {"name": "flat"}},
        {"class_name": "Dense",
         "config": {"name": "dense", "units": 3, "activation": "softmax"}}]}}
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(cfg)
        g = f.create_group("model_weights").create_group("dense")
        g.attrs["weight_names"] = [b"dense/kernel:0", b"dense/bias:0"]
        g.create_dataset("dense/kernel:0",
                         data=rng.normal(size=(16, 3)).astype("f4"))
        g.create_dataset("dense/bias:0", data=rng.normal(size=3).astype("f4"))
    with h5py.File(path, "r") as f:
        payload = []
        for name in ("kernel:0", "bias:0"):
            d = f["model_weights/dense/dense"][name]
            payload.append((d.id.get_offset(),
                            d.id.get_offset() + d.id.get_storage_size()))
    raw = path.read_bytes()
    _fuzz(raw, path.write_bytes, lambda: keras_h5.load(path)[1], _tree_same,
          keras_h5.KerasImportError, payload=payload, rng=rng)


def test_fuzz_variables_msgpack(tmp_path):
    rng = np.random.default_rng(SEED + 4)
    model = zoo.sequential("fuzz_mlp", [
        spec("flatten", "f"), spec("dense", "d1", features=5),
        spec("relu", "r"), spec("dense", "d2", features=3)], (2, 2, 1), 3)
    variables = model.init(jax.random.key(0))
    path = tmp_path / checkpoint.VARIABLES_FILE
    checkpoint.save_variables(str(path), variables)
    raw = path.read_bytes()
    payload = []
    for leaf in jax.tree_util.tree_leaves(variables):
        b = np.asarray(leaf).tobytes()
        at = raw.find(b)
        assert at >= 0
        payload.append((at, at + len(b)))
    target = model.abstract_variables()
    _fuzz(raw, path.write_bytes,
          lambda: checkpoint.load_variables(str(path), target=target),
          _tree_same, checkpoint.CheckpointError, payload=payload, rng=rng)
