"""experiments/evaluate.py on tiny LeNet5 workdirs written with the
checkpoint API (digits data), including error cases."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dlfix_jax import data, models
from dlfix_jax.training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_lenet(ds, steps=80, seed=0):
    m = models.get("lenet5")
    v = m.init(jax.random.key(seed))
    tx = optax.adam(3e-3)
    opt = tx.init(v["params"])

    @jax.jit
    def step(params, opt, xb, yb):
        def loss(p):
            z = m.apply({"params": p}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(
                z, yb).mean()
        g = jax.grad(loss)(params)
        upd, opt = tx.update(g, opt)
        return optax.apply_updates(params, upd), opt

    params = v["params"]
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        i = rng.integers(0, len(ds.train), 64)
        params, opt = step(params, opt, ds.train.x[i], ds.train.y[i])
    return m, {"params": params}


def _save_workdir(path, model, variables):
    os.makedirs(path)
    checkpoint.save_variables(os.path.join(path, checkpoint.VARIABLES_FILE),
                              variables)
    checkpoint.atomic_write_json(
        os.path.join(path, checkpoint.METRICS_FILE),
        {"model": {"name": model.name, "num_classes": model.num_classes,
                   "input_shape": list(model.input_shape)}})


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cli")
    ds = data.load("digits")
    m, v = _train_lenet(ds)
    paths = [str(root / "orig")]
    _save_workdir(paths[0], m, v)
    for k in (1, 2):   # "fixed" models: small perturbations of the original
        vk = jax.tree_util.tree_map(
            lambda a, k=k: a + 0.02 * jax.random.normal(jax.random.key(k),
                                                        a.shape), v)
        paths.append(str(root / f"fixed{k}"))
        _save_workdir(paths[-1], m, vk)
    return root, paths, m, v, ds


def _run(args):
    return subprocess.run([sys.executable, "-m", "experiments.evaluate"]
                          + args, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_cli_accuracy_flips_asr(workdirs):
    root, paths, m, v, ds = workdirs
    out = str(root / "eval.json")
    p = _run(["--dataset=digits", f"--original={paths[0]}",
              f"--fixed={paths[1]}", f"--fixed={paths[2]}", f"--out={out}",
              "--asr", "--n_samples=30", "--seed=3"])
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.load(open(out))
    pred = np.asarray(m.predict(v, ds.test.x))
    assert r["acc_orig"] == pytest.approx(100 * np.mean(pred == ds.test.y))
    assert r["acc_orig"] > 50, "tiny model should learn digits a bit"
    assert r["n_fixed"] == 2 and len(r["rr"]) == 2 and len(r["asr"]) == 2
    assert r["asr_samples"] == 30 and r["eps"] == 0.08
    assert r["softmax"] is False
    assert "repaired numbers" in p.stdout and "break numbers" in p.stdout
    assert "ASR of original model" in p.stdout


def test_cli_errors_leave_no_output(workdirs):
    root, paths, *_ = workdirs
    out = str(root / "bad.json")
    p = _run(["--dataset=digits", f"--original={paths[0]}",
              f"--fixed={root / 'missing'}", f"--out={out}"])
    assert p.returncode != 0
    assert "does not exist" in p.stderr
    assert not os.path.exists(out)
    p = _run(["--dataset=digits", f"--original={paths[0]}",
              f"--fixed={paths[1]}", "--aaod", f"--out={out}"])
    assert p.returncode != 0
    assert "groups" in p.stderr
    assert not os.path.exists(out)
