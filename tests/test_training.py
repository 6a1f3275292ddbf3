"""Tests of base-model training, checkpoints and model loading.

Trains LeNet5 on the embedded digits for 2 epochs (a few seconds) in a
module-scoped workdir and checks what the trainer promises: metrics.json,
one orbax checkpoint per epoch, bitwise determinism for a seed, loading
instead of retraining, and load_model on a workdir.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dlfix_jax import data as data_lib
from dlfix_jax import models
from dlfix_jax.models import zoo
from dlfix_jax.training import checkpoint, train
from experiments.configs import digits_lenet5, mnist_lenet5
from tests.conftest import shared_data_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(epochs=2, seed=0):
    c = digits_lenet5.get_config()
    c.train.epochs = epochs
    c.seed = seed
    return c


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


def _assert_bitwise_equal(a, b):
    sa = jax.tree_util.tree_structure(a)
    sb = jax.tree_util.tree_structure(b)
    assert sa == sb
    for x, y in zip(_leaves(a), _leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y)


@pytest.fixture(scope="module")
def digits():
    return data_lib.load("digits")


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits):
    workdir = str(tmp_path_factory.mktemp("digits_run"))
    return train.train_and_evaluate(_config(), workdir, dataset=digits)


def test_metrics_json(run):
    with open(os.path.join(run.workdir, "metrics.json")) as f:
        m = json.load(f)
    assert m["status"] == "complete"
    assert m["epochs"] == 2 and m["seed"] == 0
    assert m["config"] == train.config_to_dict(_config())
    assert m["model"] == {"name": "lenet5", "num_classes": 10,
                          "input_shape": [28, 28, 1], "num_params": 29450}
    for k in ("train_accuracy", "valid_accuracy", "test_accuracy"):
        assert 0.0 <= m[k] <= 1.0
    # 2 epochs of LeNet5 on digits already learn something (chance is 0.1).
    assert m["test_accuracy"] > 0.3
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    assert all(h["examples_per_s"] > 0 for h in m["history"])
    assert m["time_s"] > 0
    assert not [f for f in os.listdir(run.workdir) if f.endswith(".tmp")]
    # The returned variables are the reported model.
    acc = train.accuracy(run.model, run.variables, data_lib.load("digits").test)
    assert acc == pytest.approx(m["test_accuracy"])


def test_history_per_epoch(run):
    assert checkpoint.history_epochs(run.workdir) == [1, 2]
    assert sorted(os.listdir(os.path.join(run.workdir, "checkpoints"))) == [
        "1", "2"]
    hist = checkpoint.load_history(run.workdir)
    assert len(hist) == 2
    # The last epoch's checkpoint is the final model; epoch 1 differs.
    _assert_bitwise_equal(hist[-1], run.variables)
    assert not np.array_equal(
        np.asarray(hist[0]["params"]["dense3"]["kernel"]),
        np.asarray(hist[1]["params"]["dense3"]["kernel"]))


def test_same_seed_same_variables_bitwise(run, digits, tmp_path):
    again = train.train_and_evaluate(_config(), str(tmp_path), dataset=digits)
    assert not again.loaded
    _assert_bitwise_equal(again.variables, run.variables)
    assert again.metrics["test_accuracy"] == run.metrics["test_accuracy"]


def test_other_seed_other_variables(run, digits, tmp_path):
    other = train.train_and_evaluate(_config(epochs=1, seed=1),
                                     str(tmp_path), dataset=digits)
    a = np.asarray(other.variables["params"]["conv1"]["kernel"])
    b = np.asarray(run.variables["params"]["conv1"]["kernel"])
    assert not np.array_equal(a, b)


def test_rerun_loads(run, digits):
    mtime = os.path.getmtime(os.path.join(run.workdir, "metrics.json"))
    again = train.train_and_evaluate(_config(), run.workdir, dataset=digits)
    assert again.loaded
    assert again.metrics == run.metrics
    _assert_bitwise_equal(again.variables, run.variables)
    assert os.path.getmtime(os.path.join(run.workdir, "metrics.json")) == mtime


def test_rerun_with_other_config_raises(run, digits):
    with pytest.raises(ValueError, match="different config.*epochs"):
        train.train_and_evaluate(_config(epochs=3), run.workdir,
                                 dataset=digits)


def test_load_model_on_workdir(run):
    model, variables, history = checkpoint.load_model(run.workdir,
                                                      history=True)
    assert model.name == "lenet5" and model.num_classes == 10
    _assert_bitwise_equal(variables, run.variables)
    assert len(history) == 2
    # Default: no history read (evaluation paths).
    assert checkpoint.load_model(run.workdir)[2] is None
    x = data_lib.load("digits").test.x[:8]
    np.testing.assert_array_equal(model.predict(variables, x),
                                  run.model.predict(run.variables, x))
    _, _, last = checkpoint.load_model(run.workdir, history=1)
    assert len(last) == 1
    _assert_bitwise_equal(last[0], run.variables)
    assert checkpoint.load_model(run.workdir, history=False)[2] is None


def test_load_model_bad_paths(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load_model(str(tmp_path / "nope"))
    with pytest.raises(checkpoint.CheckpointError, match="variables.msgpack"):
        checkpoint.load_model(str(tmp_path))
    txt = tmp_path / "model.txt"
    txt.write_text("not a model")
    with pytest.raises(checkpoint.CheckpointError, match="not a Keras HDF5"):
        checkpoint.load_model(str(txt))


def test_variables_roundtrip_and_target_mismatch(tmp_path):
    model = models.get("lenet5")
    # A small BN model: exercise batch_stats through save/load.
    small = models.sequential("tiny", [
        models.spec("conv", "conv1", features=4, kernel=(3, 3)),
        models.spec("bn", "bn1"), models.spec("relu", "relu1"),
        models.spec("flatten", "flatten"),
        models.spec("dense", "dense1", features=3)], (8, 8, 1), 3)
    v = small.init(jax.random.key(0))
    path = str(tmp_path / "v.msgpack")
    checkpoint.save_variables(path, v)
    _assert_bitwise_equal(checkpoint.load_variables(path), v)
    _assert_bitwise_equal(checkpoint.load_variables(path, target=v), v)
    with pytest.raises(checkpoint.CheckpointError, match="lacks|shape"):
        checkpoint.load_variables(
            path, target=jax.eval_shape(model.init, jax.random.key(0)))
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load_variables(str(bad))


def test_batch_norm_model_trains_and_checkpoints(tmp_path, monkeypatch):
    """BatchNorm stats are updated, checkpointed and restored; dropout runs."""
    small = models.sequential("tiny_bn", [
        models.spec("conv", "conv1", features=4, kernel=(3, 3)),
        models.spec("bn", "bn1"), models.spec("relu", "relu1"),
        models.spec("flatten", "flatten"),
        models.spec("dropout", "dropout", rate=0.5),
        models.spec("dense", "dense1", features=10)], (28, 28, 1), 10)
    # Registered only for this test (the registry is restored after it).
    with zoo.MODELS.temporary(tiny_bn_for_test=lambda **kw: small):
        c = _config(epochs=1)
        c.model.name = "tiny_bn_for_test"
        res = train.train_and_evaluate(c, str(tmp_path),
                                       dataset=data_lib.load("digits"))
        init = small.init(jax.random.key(0))
        stats = res.variables["batch_stats"]["bn1"]
        assert not np.allclose(stats["mean"], init["batch_stats"]["bn1"]["mean"])
        hist = checkpoint.load_history(str(tmp_path))
        _assert_bitwise_equal(hist[-1], res.variables)
        _, loaded, _ = checkpoint.load_model(str(tmp_path))
        _assert_bitwise_equal(loaded, res.variables)


def test_optimizer_choices():
    c = _config().train
    for name in ("adam", "adamw", "sgd", "momentum"):
        c.optimizer = name
        tx = train.make_optimizer(c, 10)
        assert tx.init({"w": np.zeros(3)}) is not None
    c.optimizer = "rmsprop"
    with pytest.raises(ValueError, match="unknown train.optimizer"):
        train.make_optimizer(c, 10)


def test_epoch_batches_cover_every_example():
    idx = train.epoch_batches(jax.random.key(0), 10, 4)
    assert idx.shape == (3, 4)
    assert set(idx.reshape(-1).tolist()) == set(range(10))
    again = train.epoch_batches(jax.random.key(0), 10, 4)
    np.testing.assert_array_equal(idx, again)


CONFIGS = ("digits_lenet5", "mnist_lenet5", "fashion_mnist_lenet5",
           "utkface_facenet", "cifar10_vgg16", "cifar10s_resnet18",
           "imagenet2012_densenet121")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_declares_the_keys(name):
    import importlib
    mod = importlib.import_module(f"experiments.configs.{name}")
    c = mod.get_config()
    assert f"--config=experiments/configs/{name}.py" in mod.__doc__
    assert f"{c.dataset.name}_{c.model.name}" == name
    assert c.dataset.name in data_lib.names()
    assert c.model.name in models.names()
    for k in ("epochs", "batch_size", "learning_rate", "optimizer",
              "weight_decay", "schedule"):
        assert k in c.train, k
    assert c.dataset.data_dir is None and c.eval_batch_size > 0
    train.make_optimizer(c.train, 10)  # names a known optimizer/schedule


def test_cli_with_data_dir_override(tmp_path):
    """The absl entry point trains, writes config.json and accepts
    --config.dataset.data_dir (ignored by the embedded digits)."""
    workdir = tmp_path / "cli"
    cmd = [sys.executable, "-m", "experiments.train",
           "--config=experiments/configs/digits_lenet5.py",
           f"--workdir={workdir}", "--config.train.epochs=1",
           f"--config.dataset.data_dir={tmp_path}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "trained lenet5 on digits" in out.stdout
    cfg = json.loads((workdir / "config.json").read_text())
    assert cfg["dataset"]["data_dir"] == str(tmp_path)
    assert cfg["train"]["epochs"] == 1


def test_cli_rejects_unknown_key(tmp_path):
    cmd = [sys.executable, "-m", "experiments.train",
           "--config=experiments/configs/digits_lenet5.py",
           f"--workdir={tmp_path}", "--config.train.no_such_key=1"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0
    assert "no_such_key" in out.stderr


@pytest.mark.shared_data
def test_mnist_lenet5_reaches_98_percent(tmp_path):
    """Acceptance: LeNet5 on real MNIST >= 98.0% test accuracy."""
    data_dir = os.path.dirname(shared_data_dir("mnist"))
    c = mnist_lenet5.get_config()
    c.dataset.data_dir = data_dir
    res = train.train_and_evaluate(c, str(tmp_path))
    assert res.metrics["dataset"]["sizes"] == {
        "train": 54000, "valid": 6000, "repair": 5000, "test": 5000}
    assert res.metrics["test_accuracy"] >= 0.98
