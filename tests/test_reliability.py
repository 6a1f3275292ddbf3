"""Reliability under bad input, crashes and concurrent runs (issue 11).

One section per item of the issue that the library owns; each test fails
on the behaviour the issue describes (a hang, a plausible number, a silent
partial load, lost checkpoints, a file read from outside the model) and
passes now. Items at the CLI level (5, 8-11, 13, 15) are the pipeline's.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dlfix_jax import data as data_lib
from dlfix_jax import fileio, fixers, search
from dlfix_jax.data import _common, base, cifar, idx, utkface
from dlfix_jax.data.source import Source
from dlfix_jax.fixers import _localize
from dlfix_jax.metrics import evaluate, pgd
from dlfix_jax.models import keras_h5, zoo
from dlfix_jax.models.layers import spec
from dlfix_jax.training import checkpoint, loop, train
from experiments.configs import digits_lenet5
from tests.conftest import shared_data_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def deadline(seconds: int):
    """Fails the test instead of hanging (SIGALRM interrupts Python loops)."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"did not finish within {seconds} s (a hang)")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _one_line(e) -> str:
    msg = str(e.value if hasattr(e, "value") else e)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture(autouse=True)
def _no_data_cache(monkeypatch, tmp_path_factory):
    monkeypatch.setattr(_common, "default_tfds_roots", lambda: [])
    monkeypatch.setenv(_common.CACHE_DIR_ENV,
                       str(tmp_path_factory.mktemp("cache")))


# ------------------------------------------------- 1. hangs on NaN models

def test_pareto_front_terminates_and_refuses_nan():
    g = np.array([1.0, np.nan, 0.5])
    f = np.array([0.5, 1.0, np.nan])
    with deadline(10):  # the old loop never advanced past a NaN score
        with pytest.raises(ValueError, match="NaN") as e:
            _localize.pareto_front(g, f)
    _one_line(e)


def test_pareto_front_matches_brute_force_with_ties_and_inf():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(1, 40))
        g = rng.integers(0, 5, n).astype(float)
        f = rng.integers(0, 5, n).astype(float)
        g[rng.random(n) < 0.1] = np.inf
        f[rng.random(n) < 0.1] = -np.inf
        with deadline(10):
            got = _localize.pareto_front(g, f)
        want = [not any(g[q] >= g[p] and f[q] >= f[p]
                        and (g[q] > g[p] or f[q] > f[p]) for q in range(n))
                for p in range(n)]
        assert got.tolist() == want


def test_make_problem_refuses_nan_weights_and_nan_activations():
    model, variables, ds, _ = _tiny()
    bad = jax.tree_util.tree_map(lambda a: a, variables)
    k = np.array(bad["params"]["dense2"]["kernel"])
    k[0, 0] = np.nan
    bad["params"]["dense2"]["kernel"] = jnp.asarray(k)
    with pytest.raises(ValueError, match="non-finite.*dense2") as e:
        fixers.make_problem(model, bad, ds)
    _one_line(e)
    # Finite weights, but activations that overflow to Inf/NaN.
    huge = jax.tree_util.tree_map(lambda a: a * 1e30, variables)
    with pytest.raises(ValueError, match="non-finite logits") as e:
        fixers.make_problem(model, huge, ds)
    _one_line(e)


@pytest.mark.parametrize("algo", ["de", "pso_global_best",
                                  "pso_constriction", "ga"])
def test_search_terminates_on_nan_fitness(algo):
    """The driver's while_loop is bounded by max_generations whatever the
    fitness is (NaN never equals itself, so no stop rule ever fires)."""
    x0 = jax.random.normal(jax.random.key(0), (8, 3))
    fit = lambda x: jnp.nan * jnp.sum(x)  # noqa: E731
    key = jax.random.key(1)
    with deadline(120):
        if algo == "de":
            r = search.de(key, fit, x0, -1.0, 1.0, max_generations=7)
        elif algo == "ga":
            r = search.ga(key, fit, x0, -1.0, 1.0, max_generations=7)
        else:
            r = getattr(search, algo)(key, fit, x0, max_iterations=7)
    assert 0 < int(r.generations) <= 7


def test_nan_loss_in_training_raises(tmp_path):
    ds = data_lib.load("digits")
    # Finite inputs so large that the logits overflow: the loss becomes NaN.
    tr = base.Split(ds.train.x * np.float32(3e38), ds.train.y)
    big = base.Dataset("digits", tr, ds.valid, ds.repair, ds.test, 10)
    with pytest.raises(FloatingPointError, match="non-finite loss") as e:
        train.train_and_evaluate(_config(1), str(tmp_path / "a"), dataset=big)
    _one_line(e)
    # Non-finite inputs are refused before training starts.
    x = ds.train.x.copy()
    x[3, 0, 0, 0] = np.nan
    nan = base.Dataset("digits", base.Split(x, ds.train.y), ds.valid,
                       ds.repair, ds.test, 10)
    with pytest.raises(ValueError, match="non-finite.*1 of 1,197 rows") as e:
        train.train_and_evaluate(_config(1), str(tmp_path / "b"), dataset=nan)
    _one_line(e)


def test_take_steps_terminates_on_empty_stream_and_bad_batch_size():
    class Empty:  # a streamed split that yields nothing
        def __iter__(self):
            return iter(())

        def __len__(self):
            return 0
    with deadline(10):
        with pytest.raises(ValueError, match="no batch"):
            list(Source(Empty(), "train").take_steps(jax.random.key(0), 4, 3))
        with pytest.raises(ValueError, match="batch_size"):
            list(Source(Empty(), "train").ordered(0))
    s = Source(data_lib.load("digits").train, "train")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        next(s.epoch(jax.random.key(0), 0))  # was ZeroDivisionError


# ------------------------------ 2. non-finite models get plausible numbers

def _tiny():
    from tests.fixtures import tiny_mlp_problem
    return tiny_mlp_problem()


def _nan_copy(variables):
    return jax.tree_util.tree_map(lambda a: a * jnp.nan, variables)


def _strict_json(obj) -> dict:
    """json round trip that fails on NaN/Infinity tokens."""
    def bad(token):
        raise AssertionError(f"invalid JSON token {token}")
    return json.loads(json.dumps(obj, allow_nan=False), parse_constant=bad)


def test_corrupted_original_gets_no_numbers():
    model, variables, ds, _ = _tiny()
    r = evaluate.evaluate_models(jax.random.key(0), model,
                                 _nan_copy(variables), [(model, variables)],
                                 ds, asr=True, eps=0.08, n_samples=20)
    assert r["corrupted_orig"] and not r["finite_orig"]
    assert r["corrupted_reason_orig"] == "non-finite parameters"
    for k in ("acc_orig", "wrong_orig", "asr_orig"):
        assert r[k] is None, k      # was acc_orig 12.50 (argmax of NaN)
    for k in ("d_acc", "rr", "nfr", "repaired", "broken", "asr", "d_asr"):
        assert r[k] == [None], k
    assert r["asr_samples"] == 0
    # The fixed model's own accuracy is still its own.
    assert r["acc"][0] == pytest.approx(
        100 * train.accuracy(model, variables, ds.test))
    assert r["corrupted"] == [False]
    _strict_json(r)


def test_corrupted_fixed_model_excluded_from_the_shared_pgd_sample():
    model, variables, ds, _ = _tiny()
    other = jax.tree_util.tree_map(
        lambda a: a + 0.01 * jax.random.normal(jax.random.key(3), a.shape),
        variables)
    kw = dict(asr=True, eps=0.08, n_samples=30, strategy="sequential")
    key = jax.random.key(5)
    clean = evaluate.evaluate_models(key, model, variables,
                                     [(model, other)], ds, **kw)
    mixed = evaluate.evaluate_models(
        key, model, variables, [(model, _nan_copy(variables)),
                                (model, other)], ds, **kw)
    assert mixed["corrupted"] == [True, False]
    assert mixed["corrupted_reason"][0] == "non-finite parameters"
    for k in ("acc", "d_acc", "rr", "nfr", "asr", "d_asr"):
        assert mixed[k][0] is None, k   # was ASR 0% / ⇑ASR +100%
    # The NaN model does not shrink the others' sample or change their ASR.
    assert mixed["asr_samples"] == clean["asr_samples"] == 30
    assert mixed["asr_orig"] == clean["asr_orig"]
    assert mixed["asr"][1] == clean["asr"][0]
    assert mixed["acc"][1] == clean["acc"][0]
    _strict_json(mixed)


def test_pgd_asr_excludes_non_finite_models_itself():
    model, variables, ds, _ = _tiny()
    x, y = ds.test.x[:80], ds.test.y[:80]
    r = pgd.asr(jax.random.key(0), model, variables,
                [(model, _nan_copy(variables)), (model, variables)], x, y,
                eps=0.08, n_samples=20)
    assert r["attacked"].tolist() == [False, True]
    assert np.isnan(r["asr_fixed"][0]) and r["asr_fixed"][1] == r["asr_orig"]
    with pytest.raises(ValueError, match="original model outputs non-finite"):
        pgd.asr(jax.random.key(0), model, _nan_copy(variables),
                [(model, variables)], x, y, eps=0.08, n_samples=20)


def test_json_writers_never_emit_nan(tmp_path):
    obj = {"a": float("nan"), "b": [1.0, float("inf")], "c": 2.0}
    for write in (checkpoint.atomic_write_json, fileio.atomic_write_json):
        path = tmp_path / f"{write.__module__}.json"
        write(str(path), obj)
        text = path.read_text()
        assert "NaN" not in text and "Infinity" not in text
        assert json.loads(text) == {"a": None, "b": [1.0, None], "c": 2.0}


# ------------------------------------------------ 3. bad numbers, up front

def _config(epochs=1, seed=0):
    c = digits_lenet5.get_config()
    c.train.epochs = epochs
    c.seed = seed
    return c


BAD_TRAIN = [
    ("train.epochs", -1, "train.epochs must be an int >= 1"),
    ("train.epochs", 0, "train.epochs must be an int >= 1"),
    ("train.batch_size", 0, "train.batch_size must be an int >= 1"),
    ("train.learning_rate", -1e-3, "train.learning_rate must be"),
    ("train.learning_rate", 0.0, "train.learning_rate must be"),
    ("train.learning_rate", 1e3, "train.learning_rate must be"),
    ("train.learning_rate", float("nan"), "train.learning_rate must be"),
    ("train.optimizer", "adagrad", "train.optimizer 'adagrad' is unknown"),
    ("train.schedule", "step", "train.schedule 'step' is unknown"),
    ("train.weight_decay", -0.1, "train.weight_decay must be"),
    ("train.momentum", 1.0, "train.momentum must be"),
    ("train.warmup_epochs", 5.0, "train.warmup_epochs must be"),
    ("train.steps_per_call", 0, "train.steps_per_call must be"),
    ("eval_batch_size", 0, "eval_batch_size must be"),
    ("model.name", "lenet6", "model.name 'lenet6' is unknown"),
    ("dataset.name", "svhn", "dataset.name 'svhn' is unknown"),
]


@pytest.mark.parametrize("key,value,msg", BAD_TRAIN,
                         ids=[f"{k}={v}" for k, v, _ in BAD_TRAIN])
def test_training_config_validated_up_front(tmp_path, key, value, msg):
    c = _config()
    sec, _, leaf = key.rpartition(".")
    target = c[sec] if sec else c
    with target.ignore_type():
        target[leaf] = value
    wd = tmp_path / "wd"
    with pytest.raises(ValueError, match="bad training config: "
                       + msg.replace("(", r"\(")) as e:
        train.train_and_evaluate(c, str(wd))
    _one_line(e)
    assert not wd.exists()  # refused before anything was created


def test_metric_arguments_validated():
    model, variables, ds, _ = _tiny()
    x, y = ds.test.x[:20], ds.test.y[:20]
    cases = [(dict(eps=-0.1), "eps must be a finite number > 0"),
             (dict(eps=0.0), "eps must be"),
             (dict(eps=float("nan")), "eps must be"),
             (dict(eps=0.1, n_samples=0), "n_samples must be an int >= 1"),
             (dict(eps=0.1, steps=0), "steps must be an int >= 1"),
             (dict(eps=0.1, rel_stepsize=0.0), "rel_stepsize must be"),
             (dict(eps=0.1, batch_size=0), "batch_size must be an int >= 1")]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            pgd.asr(jax.random.key(0), model, variables, [(model, variables)],
                    x, y, **kw)
        _one_line(e)
    with pytest.raises(ValueError, match="steps must be"):
        pgd.linf_pgd(model, variables, x, y, eps=0.1, bounds=(0, 1), steps=0)
    with pytest.raises(ValueError, match="batch_size must be"):
        pgd.attack_stack(model, jax.tree_util.tree_map(lambda a: a[None],
                                                       variables),
                         x, y, eps=0.1, bounds=(0, 1), batch_size=0)
    split = base.Split(x, y)
    for kw, msg in [(dict(asr=True, eps=-1.0), "eps must be"),
                    (dict(asr=True, eps=0.1, n_samples=0), "n_samples"),
                    (dict(batch_size=0), "batch_size must be"),
                    (dict(pgd_batch_size=0), "pgd_batch_size must be")]:
        with pytest.raises(ValueError, match=msg):
            evaluate.evaluate_models(jax.random.key(0), model, variables,
                                     [(model, variables)], split, **kw)


# ------------------------------------------------------ 4. truncated archives

def _png(rng, size=8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                    ).save(buf, "PNG")
    return buf.getvalue()


def _tar_bytes(files: dict[str, bytes], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            info.mtime = 946684800
            tf.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def _member_offsets(blob: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tf:
        return [m.offset for m in tf.getmembers()]


def _utk_files(n=12, folder="faces"):
    rng = np.random.default_rng(0)
    return {f"{folder}/{20 + i}_{i % 2}_{i % 5}_2017{i:04d}.jpg.chip.jpg":
            _png(rng, 16) for i in range(n)}


def _cifar_files(classes=("ant", "bee"), n_train=3, n_test=2, size=32):
    rng = np.random.default_rng(1)
    out = {}
    for split, n in (("test", n_test), ("train", n_train)):
        for c in classes:
            for i in range(n):
                out[f"cifar10/{split}/{c}/{i:04d}.png"] = _png(rng, size)
    return out


def test_utkface_tar_cut_at_a_member_boundary_is_truncated(tmp_path):
    blob = _tar_bytes(_utk_files())
    full = tmp_path / "faces.tar"
    full.write_bytes(blob)
    assert len(utkface.load(str(full), image_size=8).train) > 0
    cut = tmp_path / "cut" / "utkface.tar"
    cut.parent.mkdir()
    cut.write_bytes(blob[:_member_offsets(blob)[7]])  # members 0-6 intact
    with pytest.raises(base.DataError, match="truncated") as e:
        utkface.load(str(cut), image_size=8)  # was: a smaller dataset
    assert str(cut) in _one_line(e)
    half = tmp_path / "half.tar"
    half.write_bytes(blob[:_member_offsets(blob)[5] + 300])  # in a header
    with pytest.raises(base.DataError, match="truncated"):
        utkface.load(str(half), image_size=8)


def test_cifar_targz_truncated_anywhere_is_truncated(tmp_path):
    raw = _tar_bytes(_cifar_files())
    gz = gzip.compress(raw, mtime=0)
    ok = tmp_path / "ok.tar.gz"
    ok.write_bytes(gz)
    assert len(cifar.load_cifar10(str(ok), sizes=(4, 2, 2, 2)).train) == 4
    for n, cut_bytes in enumerate([gz[:len(gz) // 2], gz[:-4],
                                   # valid gzip of a tar cut at a member
                                   gzip.compress(raw[:_member_offsets(raw)[6]],
                                                 mtime=0)]):
        p = tmp_path / f"cut{n}.tar.gz"
        p.write_bytes(cut_bytes)
        with pytest.raises(base.DataError, match="truncated") as e:
            cifar.load_cifar10(str(p), sizes=(1, 1, 1, 1))
        assert str(p) in _one_line(e)


def test_incomplete_known_copies_are_refused(tmp_path):
    # A CIFAR-10 tree (its ten class names) with 2 images per class.
    files = _cifar_files(classes=cifar.CLASS_NAMES, n_train=2, n_test=2)
    for name, blob in files.items():
        p = tmp_path / "tree" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blob)
    with pytest.raises(base.DataError,
                       match="truncated or incomplete.*5,000 per class"):
        cifar.load_cifar10(str(tmp_path / "tree"), sizes=(1, 1, 1, 1))
    # A crop_part1 folder with 12 of its 9,780 files.
    for name, blob in _utk_files(folder="crop_part1").items():
        p = tmp_path / "utk" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blob)
    with pytest.raises(base.DataError, match="crop_part1/ holds 12 image "
                       "files but UTKFace's crop_part1 has 9,780"):
        utkface.load(str(tmp_path / "utk"), image_size=8)


def test_idx_truncation_says_truncated(tmp_path):
    arr = np.zeros((5, 28, 28), np.uint8)
    raw = bytes([0, 0, 8, 3]) + (5).to_bytes(4, "big") + (28).to_bytes(
        4, "big") * 2 + arr.tobytes()
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(base.DataError, match="truncated IDX"):
        idx.read_idx(str(p), 3)
    p.write_bytes(gzip.compress(raw)[:-30])
    with pytest.raises(base.DataError, match="gzip stream is truncated"):
        idx.read_idx(str(p), 3)


def _cut_copy(src: str, dst, size: int) -> None:
    with open(src, "rb") as f:
        dst.write_bytes(f.read(size))


def test_shared_utkface_tar_cut_at_a_member_boundary(tmp_path):
    src = os.path.join(shared_data_dir("utkface"), "utkface_crop_part1.tar")
    with tarfile.open(src, "r:") as tf:
        offsets = [m.offset for m, _ in zip(tf, range(200))]
    cut = tmp_path / "utkface_crop_part1.tar"
    _cut_copy(src, cut, offsets[150])  # 149 whole images, then nothing
    with pytest.raises(base.DataError, match="truncated") as e:
        utkface.load(str(cut))
    assert str(cut) in _one_line(e)


def test_shared_cifar_targz_truncated(tmp_path):
    src = os.path.join(shared_data_dir("cifar10"), "cifar10_jpg.tar.gz")
    cut = tmp_path / "cifar10_jpg.tar.gz"
    _cut_copy(src, cut, 300_000)
    with pytest.raises(base.DataError, match="truncated") as e:
        cifar.load_cifar10(str(cut))  # was: "no images under train/"
    assert str(cut) in _one_line(e)


# ------------------------ 6/7. locked workdirs, validate before delete, resume

@pytest.fixture(scope="module")
def digits():
    return data_lib.load("digits")


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, digits):
    """A completed 1-epoch digits run (copied before tests that change it)."""
    wd = str(tmp_path_factory.mktemp("done") / "run")
    return train.train_and_evaluate(_config(1), wd, dataset=digits)


def _snapshot(wd) -> dict:
    out = {}
    for root, _, files in os.walk(wd):
        for f in files:
            p = os.path.join(root, f)
            if f != "train.lock":
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, wd)] = fh.read()
    return out


def test_second_training_on_a_locked_workdir_is_refused(done_run, tmp_path,
                                                        digits):
    wd = tmp_path / "run"
    shutil.copytree(done_run.workdir, wd)
    before = _snapshot(wd)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, sys, time
            fd = os.open({str(wd / "train.lock")!r}, os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX)
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for force in (False, True):
            with pytest.raises(RuntimeError, match="another process is "
                               "training in .*train.lock") as e:
                train.train_and_evaluate(_config(1), str(wd), force=force,
                                         dataset=digits)
            _one_line(e)
    finally:
        holder.kill()
        holder.wait()
    assert _snapshot(wd) == before  # the live run's files are untouched
    # Two readers of a completed run may load it at the same time.
    with train.workdir_lock(str(wd)):
        again = train.train_and_evaluate(_config(1), str(wd), dataset=digits)
    assert again.loaded


def test_force_validates_before_deleting(done_run, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(done_run.workdir, wd)
    before = _snapshot(wd)
    bad = _config(1)
    bad.train.learning_rate = -1.0
    with pytest.raises(ValueError, match="learning_rate"):
        train.train_and_evaluate(bad, str(wd), force=True)
    missing = _config(1)
    missing.dataset.name = "mnist"
    missing.dataset.data_dir = str(tmp_path / "no_data")
    with pytest.raises(base.DataError):
        train.train_and_evaluate(missing, str(wd), force=True)
    assert _snapshot(wd) == before  # the completed run survives both


_KILLER = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from dlfix_jax.training import train
from experiments.configs import digits_lenet5

orig = train._save_resume

def save_then_die(workdir, epoch, *a, **kw):
    orig(workdir, epoch, *a, **kw)
    if epoch == {kill_after}:
        os.kill(os.getpid(), signal.SIGKILL)

train._save_resume = save_then_die
c = digits_lenet5.get_config()
c.train.epochs = {epochs}
train.train_and_evaluate(c, {workdir!r})
"""


def _killed_run(workdir, epochs, kill_after):
    out = subprocess.run(
        [sys.executable, "-c", _KILLER.format(repo=REPO, workdir=str(workdir),
                                              epochs=epochs,
                                              kill_after=kill_after)],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]


def _bitwise_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_killed_training_resumes_from_its_last_complete_epoch(tmp_path,
                                                              digits, caplog):
    ref = train.train_and_evaluate(_config(3), str(tmp_path / "ref"),
                                   dataset=digits)
    wd = tmp_path / "killed"
    _killed_run(wd, epochs=3, kill_after=2)
    assert not (wd / checkpoint.METRICS_FILE).exists()
    assert checkpoint.history_epochs(str(wd)) == [1, 2]
    fresh = tmp_path / "killed_copy"
    shutil.copytree(wd, fresh)

    with caplog.at_level("INFO", logger="absl"):
        res = train.train_and_evaluate(_config(3), str(wd), dataset=digits)
    assert res.resumed_from == 2 and res.metrics["resumed_from_epoch"] == 2
    assert "resuming" in caplog.text and "after epoch 2/3" in caplog.text
    assert _bitwise_equal(res.variables, ref.variables)
    assert [h["epoch"] for h in res.metrics["history"]] == [1, 2, 3]
    assert checkpoint.history_epochs(str(wd)) == [1, 2, 3]
    assert not (wd / train.RESUME_FILE).exists()

    # Without a usable resume state it restarts cleanly, and says so.
    (fresh / train.RESUME_FILE).write_bytes(b"\x00damaged")
    caplog.clear()
    with caplog.at_level("INFO", logger="absl"):
        res2 = train.train_and_evaluate(_config(3), str(fresh),
                                        dataset=digits)
    assert res2.resumed_from == 0
    assert "from scratch" in caplog.text
    assert _bitwise_equal(res2.variables, ref.variables)


# --------------------------------------------- 12. .h5 reading other files

def write_tiny_keras(path, seed=0):
    """A minimal tf.keras-2-layout .h5 (Flatten -> Dense softmax), written
    with h5py only; returns (kernel, bias)."""
    rs = np.random.RandomState(seed)
    cfg = {"class_name": "Sequential", "config": {"name": "seq", "layers": [
        {"class_name": "InputLayer",
         "config": {"name": "in", "batch_input_shape": [None, 4, 4, 1],
                    "dtype": "float32"}},
        {"class_name": "Flatten", "config": {"name": "flat"}},
        {"class_name": "Dense",
         "config": {"name": "dense", "units": 3, "activation": "softmax"}}]}}
    k = rs.normal(size=(16, 3)).astype("f4")
    b = rs.normal(size=3).astype("f4")
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(cfg)
        g = f.create_group("model_weights").create_group("dense")
        g.attrs["weight_names"] = [b"dense/kernel:0", b"dense/bias:0"]
        g.create_dataset("dense/kernel:0", data=k)
        g.create_dataset("dense/bias:0", data=b)
    return k, b


def _replace_bias(path, make):
    with h5py.File(path, "a") as f:
        g = f["model_weights/dense/dense"]
        del g["bias:0"]
        make(g)


def test_h5_plain_file_loads(tmp_path):
    k, b = write_tiny_keras(tmp_path / "ok.h5")
    model, v = keras_h5.load(tmp_path / "ok.h5")
    assert model.num_classes == 3 and model.output_softmax
    np.testing.assert_array_equal(v["params"]["dense"]["bias"], b)


def test_h5_external_storage_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.array([7.0, 8.0, 9.0], "f4").tobytes())
    p = tmp_path / "ext.h5"
    write_tiny_keras(p)
    _replace_bias(p, lambda g: g.create_dataset(
        "bias:0", shape=(3,), dtype="f4", external=[(str(secret), 0, 12)]))
    with h5py.File(p, "r") as f:  # h5py itself would read the secret
        assert f["model_weights/dense/dense/bias:0"][()].tolist() == [7, 8, 9]
    with pytest.raises(keras_h5.KerasImportError,
                       match="uses external storage.*secret.bin") as e:
        keras_h5.load(p)
    _one_line(e)


def test_h5_virtual_dataset_refused(tmp_path):
    other = tmp_path / "other.h5"
    write_tiny_keras(other, seed=1)
    p = tmp_path / "virt.h5"
    write_tiny_keras(p)

    def make(g):
        lay = h5py.VirtualLayout(shape=(3,), dtype="f4")
        lay[:] = h5py.VirtualSource(str(other),
                                    "model_weights/dense/dense/bias:0", (3,))
        g.create_virtual_dataset("bias:0", lay)
    _replace_bias(p, make)
    with pytest.raises(keras_h5.KerasImportError, match="virtual dataset"):
        keras_h5.load(p)


def test_h5_external_link_refused(tmp_path):
    other = tmp_path / "other.h5"
    write_tiny_keras(other, seed=1)
    p = tmp_path / "link.h5"
    write_tiny_keras(p)
    _replace_bias(p, lambda g: g.__setitem__("bias:0", h5py.ExternalLink(
        str(other), "model_weights/dense/dense/bias:0")))
    with pytest.raises(keras_h5.KerasImportError,
                       match="external link to .*other.h5"):
        keras_h5.load(p)
    # Also through checkpoint.load_model (the evaluate/fix entry point).
    with pytest.raises(keras_h5.KerasImportError, match="external link"):
        checkpoint.load_model(str(p))


# ----------------------------------------- 14. evaluation ignores the history

def test_damaged_history_does_not_break_evaluating_the_model(done_run,
                                                             tmp_path, digits):
    wd = tmp_path / "run"
    shutil.copytree(done_run.workdir, wd)
    ckpt = wd / checkpoint.CHECKPOINT_DIR / "1"
    for root, _, files in os.walk(ckpt):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    model, variables, hist = checkpoint.load_model(str(wd))
    assert hist is None
    assert _bitwise_equal(variables, done_run.variables)
    r = evaluate.evaluate_models(jax.random.key(0), model, variables,
                                 [(model, variables)], digits)
    assert r["acc_orig"] == pytest.approx(
        100 * done_run.metrics["test_accuracy"])
    with pytest.raises(checkpoint.CheckpointError,
                       match="epoch checkpoint .*1.* is damaged") as e:
        checkpoint.load_model(str(wd), history=True)
    _one_line(e)


@pytest.mark.parametrize("argv, needle", [
    (["experiments.run_study",
      "--config=experiments/configs/study_digits.py", "--workdir={tmp}/s",
      "--config.approaches=nope"], "unknown fixer 'nope'"),
    (["experiments.train", "--config=experiments/configs/digits_lenet5.py",
      "--workdir={tmp}/t", "--config.dataset.name=nope"], "'nope' is unknown"),
    (["experiments.run_study",
      "--config=experiments/configs/study_digits.py",
      "--workdir={tmp}/afile"], "File exists"),
])
def test_expected_errors_are_one_line_without_traceback(tmp_path, argv,
                                                        needle):
    """Issue 11 item 13: an expected error prints one line naming it, exits
    2, and shows no traceback (DLFIX_TRACEBACK=1 brings it back)."""
    import subprocess
    import sys
    (tmp_path / "afile").write_text("")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m"] + [a.format(tmp=tmp_path) for a in argv]
    env = {k: v for k, v in os.environ.items() if k != "DLFIX_TRACEBACK"}
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    env["DLFIX_TRACEBACK"] = "1"
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
