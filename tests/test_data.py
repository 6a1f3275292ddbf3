"""Tests of the dataset loaders: tiny generated sources (layouts, splits,
determinism, normalisation, errors) and the real data in ../shared/data."""

from __future__ import annotations

import gzip
import os
import struct
import tarfile
import warnings

import numpy as np
import pytest
from PIL import Image

from dlfix_jax import data
from dlfix_jax.data import _common, base, cifar, idx, imagenet, utkface
from tests.conftest import shared_data_dir


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory, request):
    """No TFDS dirs of the developer's; tiny-data caches in a temp dir."""
    monkeypatch.setattr(_common, "default_tfds_roots", lambda: [])
    if "real" not in request.node.name:
        monkeypatch.setenv(_common.CACHE_DIR_ENV,
                           str(tmp_path_factory.mktemp("cache")))


# ------------------------------------------------------------------ IDX ---

def _idx_bytes(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 8, arr.ndim]) + struct.pack(">" + "I" * arr.ndim,
                                                     *arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _write_idx(folder, n_train=20, n_test=10, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for stem, a in arrays.items():
        raw = _idx_bytes(a)
        path = os.path.join(folder, stem + (".gz" if gz else ""))
        with open(path, "wb") as f:
            f.write(gzip.compress(raw) if gz else raw)
    return arrays


@pytest.mark.parametrize("layout", ["subdir_gz", "flat_raw"])
def test_idx_layouts_splits_normalisation(tmp_path, layout):
    folder = tmp_path / "mnist" if layout == "subdir_gz" else tmp_path
    arrays = _write_idx(folder, gz=layout == "subdir_gz")
    d = idx.load_mnist(str(tmp_path), seed=3, sizes=(14, 6, 4, 6))
    assert [len(s) for s in d.splits.values()] == [14, 6, 4, 6]
    assert d.input_shape == (28, 28, 1) and d.train.x.dtype == np.float32
    i_tr, i_va = base.split_indices(20, (14, 6), 3)
    i_re, i_te = base.split_indices(10, (4, 6), 3)
    xtr = arrays["train-images-idx3-ubyte"]
    np.testing.assert_array_equal(d.valid.x[..., 0],
                                  (xtr[i_va] / 255.0).astype(np.float32))
    np.testing.assert_array_equal(d.test.y,
                                  arrays["t10k-labels-idx1-ubyte"][i_te])
    np.testing.assert_array_equal(d.repair.y,
                                  arrays["t10k-labels-idx1-ubyte"][i_re])
    np.testing.assert_array_equal(d.train.y,
                                  arrays["train-labels-idx1-ubyte"][i_tr])
    assert d.normalization == "x/255" and d.group_names is None


def test_idx_determinism_and_fashion(tmp_path):
    _write_idx(tmp_path / "fashion_mnist")
    a = data.load("fashion_mnist", str(tmp_path), seed=1, sizes=(15, 5, 5, 5))
    b = data.load("fashion_mnist", str(tmp_path), seed=1, sizes=(15, 5, 5, 5))
    c = data.load("fashion_mnist", str(tmp_path), seed=2, sizes=(15, 5, 5, 5))
    np.testing.assert_array_equal(a.train.x, b.train.x)
    assert not np.array_equal(a.train.x, c.train.x)
    assert a.class_names[0] == "T-shirt/top" and a.name == "fashion_mnist"


def test_idx_errors(tmp_path):
    with pytest.raises(base.DataError, match="train-images-idx3-ubyte") as e:
        idx.load_mnist(str(tmp_path))
    assert str(tmp_path) in str(e.value) and "tfds" in str(e.value).lower()
    _write_idx(tmp_path)
    with pytest.raises(base.DataError, match="54,000 \\+ 6,000"):
        idx.load_mnist(str(tmp_path))  # study sizes need 60,000 images
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 20))
    with pytest.raises(base.DataError, match="malformed IDX.*t10k-labels"):
        idx.load_mnist(str(tmp_path), sizes=(10, 5, 5, 5))
    trunc = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(trunc.read_bytes())
    trunc.write_bytes(gzip.compress(raw[:-7]))
    with pytest.raises(base.DataError, match="train-images.*bytes"):
        idx.read_idx(str(trunc), 3)
    trunc.write_bytes(b"\x1f\x8bnot gzip at all")
    with pytest.raises(base.DataError, match="cannot read IDX.*train-images"):
        idx.read_idx(str(trunc), 3)


# ---------------------------------------------------------------- CIFAR ---

_CLASSES = ("dog", "ant", "cat", "bee")  # sorted: ant bee cat dog


def _write_tree(root, n_train=20, n_test=5, seed=0):
    """PNG tree (lossless, so pixels can be compared exactly)."""
    rng = np.random.default_rng(seed)
    pix = {}
    for split, n in (("train", n_train), ("test", n_test)):
        for c in _CLASSES:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(a).save(root / split / c / f"{i:04d}.png")
                pix[(split, c, i)] = a
    return pix


def _tar_gz(src_root, path, prefix="cifar10"):
    with tarfile.open(path, "w:gz") as tf:
        for split in ("test", "train"):  # unsorted order on purpose
            tf.add(src_root / split, arcname=f"{prefix}/{split}")


def test_cifar_tree_and_targz_agree(tmp_path):
    pix = _write_tree(tmp_path / "tree" / "cifar10")
    _tar_gz(tmp_path / "tree" / "cifar10", tmp_path / "c.tar.gz")
    sizes = (60, 20, 10, 10)
    a = cifar.load_cifar10(str(tmp_path / "tree"), seed=0, sizes=sizes)
    b = cifar.load_cifar10(str(tmp_path / "c.tar.gz"), seed=0, sizes=sizes)
    assert a.class_names == ("ant", "bee", "cat", "dog")
    assert [len(s) for s in a.splits.values()] == list(sizes)
    for s in a.splits:
        np.testing.assert_array_equal(a.splits[s].x, b.splits[s].x)
        np.testing.assert_array_equal(a.splits[s].y, b.splits[s].y)
    # Normalisation: (x/255 - mean)/std of the original pixels.
    i_tr, _ = base.split_indices(80, (60, 20), 0)
    k = i_tr[0]
    cls, i = sorted(_CLASSES)[k // 20], k % 20
    want = (pix[("train", cls, i)] / 255.0 - cifar.MEAN) / cifar.STD
    np.testing.assert_allclose(a.train.x[0], want, atol=1e-5)
    assert a.train.y[0] == k // 20
    # Second load of the archive comes from the cache, identically.
    cached = os.listdir(os.environ[_common.CACHE_DIR_ENV])
    assert len(cached) == 1 and cached[0].endswith(".npz")
    c = cifar.load_cifar10(str(tmp_path / "c.tar.gz"), seed=0, sizes=sizes)
    np.testing.assert_array_equal(b.test.x, c.test.x)
    d = cifar.load_cifar10(str(tmp_path / "c.tar.gz"), seed=5, sizes=sizes)
    assert not np.array_equal(b.test.y, d.test.y) or not np.array_equal(
        b.test.x, d.test.x)


def test_cifar10s_skew_and_copies(tmp_path):
    _write_tree(tmp_path / "cifar10")
    d = cifar.load_cifar10s(str(tmp_path), seed=0, sizes=(60, 20, 10, 10))
    assert [len(s) for s in d.splits.values()] == [60, 20, 10, 10]
    assert d.group_names == ("color", "gray")
    raw = {k: np.rint((s.x * cifar.STD + cifar.MEAN) * 255)
           for k, s in d.splits.items()}
    for k, s in d.splits.items():
        is_grey = np.all(raw[k][..., 0] == raw[k][..., 1], axis=(1, 2)) & \
            np.all(raw[k][..., 1] == raw[k][..., 2], axis=(1, 2))
        np.testing.assert_array_equal(is_grey, s.group == 1)
    tr = d.train
    for c in range(4):
        n_c = int(np.sum(tr.y == c))
        want = round((0.05 if c < 2 else 0.95) * n_c)
        assert int(np.sum(tr.group[tr.y == c])) == want
    rep = d.repair
    np.testing.assert_array_equal(rep.group, [0] * 5 + [1] * 5)
    np.testing.assert_array_equal(rep.y[:5], rep.y[5:])
    pil = [np.asarray(Image.fromarray(im.astype(np.uint8)).convert("L"))
           for im in raw["repair"][:5]]
    np.testing.assert_array_equal(raw["repair"][5:, ..., 0], np.stack(pil))
    e = cifar.load_cifar10s(str(tmp_path), seed=0, sizes=(60, 20, 10, 10))
    np.testing.assert_array_equal(d.train.group, e.train.group)


def test_cifar_errors(tmp_path):
    with pytest.raises(base.DataError, match="train/<class>") as e:
        cifar.load_cifar10(str(tmp_path))
    assert "cifar10" in str(e.value) and str(tmp_path) in str(e.value)
    bad = tmp_path / "cifar10.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08 truncated")
    with pytest.raises(base.DataError, match="cannot read archive.*cifar10"):
        cifar.load_cifar10(str(tmp_path))
    os.remove(bad)
    _write_tree(tmp_path, n_train=1, n_test=1)
    Image.new("RGB", (30, 32)).save(tmp_path / "train" / "ant" / "big.png")
    with pytest.raises(base.DataError, match="big.png.*32x32"):
        cifar.load_cifar10(str(tmp_path), sizes=(1, 1, 1, 1))


# -------------------------------------------------------------- UTKFace ---

_UTK = [(25, 0, 0), (31, 1, 1), (8, 1, 2), (60, 0, 3), (44, 1, 4), (2, 0, 0),
        (19, 1, 0), (70, 0, 2), (33, 1, 0), (51, 0, 1), (27, 1, 3), (12, 0, 0)]


def _write_utk(folder):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (a, g, r) in enumerate(_UTK):
        img = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(img).save(
            folder / f"{a}_{g}_{r}_2017011{i:02d}.jpg.chip.jpg", "JPEG")
    Image.fromarray(img).save(folder / "61_1_20170109142408075.jpg.chip.jpg",
                              "JPEG")


def test_utkface_folder_and_tar(tmp_path):
    _write_utk(tmp_path / "utkface" / "faces")
    with pytest.warns(UserWarning, match="skipped 1 file.*61_1_"):
        a = utkface.load(str(tmp_path), seed=0, image_size=8)
    sizes = utkface.split_sizes(12)
    assert [len(s) for s in a.splits.values()] == list(sizes)
    assert a.input_shape == (8, 8, 3) and a.group_names == ("white",
                                                            "non-white")
    ys = np.concatenate([s.y for s in a.splits.values()])
    gs = np.concatenate([s.group for s in a.splits.values()])
    assert sorted(zip(ys, gs)) == sorted((g, int(r != 0)) for _, g, r in _UTK)
    with tarfile.open(tmp_path / "faces.tar", "w") as tf:
        tf.add(tmp_path / "utkface" / "faces", arcname="faces")
    with pytest.warns(UserWarning, match="skipped 1"):
        b = utkface.load(str(tmp_path / "faces.tar"), seed=0, image_size=8)
    for s in a.splits:
        np.testing.assert_array_equal(a.splits[s].x, b.splits[s].x)
        np.testing.assert_array_equal(a.splits[s].group, b.splits[s].group)
    with pytest.warns(UserWarning):
        c = utkface.load(str(tmp_path), seed=0, image_size=8,
                         sizes=(6, 2, 2, 2))
    assert len(c.train) == 6
    raw = np.rint((c.test.x * utkface.STD + utkface.MEAN) * 255)
    assert raw.min() >= 0 and raw.max() <= 255


def test_utkface_names_sizes_errors(tmp_path):
    assert utkface.parse_name("a/25_1_3_2017.jpg.chip.jpg") == (25, 1, 3)
    assert utkface.parse_name("61_1_20170109142408075.jpg.chip.jpg") is None
    assert utkface.parse_name("25_2_0_x.jpg") is None
    assert utkface.split_sizes(23_705) == utkface.STUDY_SIZES
    assert utkface.split_sizes(9_778) == (7_333, 815, 815, 815)
    with pytest.raises(base.DataError, match="utkface.*<age>_<gender>"):
        utkface.load(str(tmp_path))


# ------------------------------------------------------------- ImageNet ---

def test_imagenet_preprocess_and_errors(tmp_path):
    with pytest.raises(base.DataError, match="ILSVRC2012_img_train.tar"):
        imagenet.load(str(tmp_path))
    img = np.zeros((300, 400, 3), np.uint8) + np.array([10, 128, 250],
                                                       np.uint8)
    out = np.asarray(imagenet.preprocess(img))
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.broadcast_to(
        imagenet.normalize_torch(img[:1, :1]), out.shape), atol=1e-4)
    # Centre crop: a bright centre column survives, the edges are cropped.
    img = np.zeros((256, 512, 3), np.uint8)
    img[:, 255:257] = 255
    out = np.asarray(imagenet.preprocess(img))
    assert out[:, 112, 0].min() > out[:, 0, 0].max()


def test_imagenet_streaming_mock():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=5):
        b = tfds.builder("imagenet2012")
        d = imagenet.from_builder(b, seed=0, batch_size=2, image_size=16,
                                  valid_size=2, repair_size=2)
        batches = list(d.repair)
        assert [len(x) for x in batches] == [2, 2, 1]
        assert batches[0].x.shape == (2, 16, 16, 3)
        assert batches[0].x.dtype == np.float32
        assert batches[0].y.dtype == np.int32
        assert d.num_classes == 1000 and d.input_shape == (16, 16, 3)
        t1 = np.concatenate([x.y for x in d.train])
        t2 = np.concatenate([x.y for x in d.train])
        np.testing.assert_array_equal(t1, t2)
        assert len(d.test.take(3)) == 3


# ----------------------------------------------------------------- TFDS ---

def test_tfds_detection_is_file_based(tmp_path):
    assert _common.find_prepared_tfds("mnist", str(tmp_path)) is None
    (tmp_path / "mnist" / "3.0.1").mkdir(parents=True)
    assert _common.find_prepared_tfds("mnist", str(tmp_path)) is None


def test_tfds_sources_mocked(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(_common, "find_prepared_tfds",
                        lambda name, data_dir, register=None: "/mock")
    with tfds.testing.mock_data(num_examples=12):
        m = idx.load_mnist("/nowhere", seed=0, sizes=(8, 4, 6, 6))
        c = cifar.load_cifar10s("/nowhere", seed=0, sizes=(8, 4, 12, 12))
    assert m.source.startswith("tfds:mnist") and m.input_shape == (28, 28, 1)
    assert [len(s) for s in m.splits.values()] == [8, 4, 6, 6]
    assert 0.0 <= m.train.x.min() and m.train.x.max() <= 1.0
    assert c.source.startswith("tfds:cifar10") and len(c.test) == 12
    assert c.class_names[0] == "airplane"


def test_utkface_tfds_builder(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    _write_utk(tmp_path / "manual")
    builder = utkface.tfds_builder_class()(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(tmp_path / "manual")))
    assert builder.info.splits["train"].num_examples == len(_UTK)
    a = utkface.load(str(tmp_path / "tfds"), seed=0, image_size=8)
    assert a.source.startswith("tfds:utkface")
    with pytest.warns(UserWarning, match="skipped 1"):
        b = utkface.load(str(tmp_path / "manual"), seed=0, image_size=8)
    for s in a.splits:  # same images, labels and splits as the plain loader
        np.testing.assert_array_equal(a.splits[s].x, b.splits[s].x)
        np.testing.assert_array_equal(a.splits[s].y, b.splits[s].y)


# ------------------------------------------------------------ real data ---

def _sizes(d):
    return [len(s) for s in d.splits.values()]


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_real_idx(name):
    d = data.load(name, shared_data_dir(name), seed=0)
    assert _sizes(d) == [54_000, 6_000, 5_000, 5_000]
    assert 0.0 <= d.train.x.min() and d.train.x.max() <= 1.0
    assert np.bincount(d.test.y, minlength=10).min() > 300


def test_real_cifar10_and_cifar10s():
    path = shared_data_dir("cifar10")
    d = data.load("cifar10", path, seed=0)
    assert _sizes(d) == [45_000, 5_000, 5_000, 5_000]
    assert d.class_names[0] == "airplane" and d.class_names[9] == "truck"
    m = d.train.x.mean(axis=(0, 1, 2))
    assert np.all(np.abs(m) < 0.02), m  # the JPEG copy is close to CIFAR-10
    del d
    s = data.load("cifar10s", path, seed=0)
    assert _sizes(s) == [45_000, 5_000, 10_000, 10_000]
    grey_frac = [s.train.group[s.train.y == c].mean() for c in range(10)]
    np.testing.assert_allclose(grey_frac, [0.05] * 5 + [0.95] * 5, atol=2e-3)
    assert s.test.group.mean() == 0.5


def test_real_utkface():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        d = data.load("utkface", shared_data_dir("utkface"), seed=0)
    assert any("skipped 2" in str(x.message) for x in w)
    assert _sizes(d) == [7_333, 815, 815, 815]
    assert d.input_shape == (64, 64, 3)
    x = d.train.x
    assert np.all(np.abs(x.mean(axis=(0, 1, 2))) < 0.05)
    assert np.all(np.abs(x.std(axis=(0, 1, 2)) - 1) < 0.05)
    n_white = sum(int(np.sum(s.group == 0)) for s in d.splits.values())
    assert n_white == 5_265  # README: White 5,265
