"""``benchmarks.conv_kernels`` and its oneDNN-callback experiment
(``benchmarks._onednn_conv``): the callback convolution must be the same
function as XLA's (values and both gradients), otherwise the timings
compare different work; the benchmark runs end to end at tiny shapes."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("tensorflow")


def _xla_conv(x, w, padding):
    return lax.conv_general_dilated(
        x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_callback_conv_matches_xla_values_and_gradients(padding):
    from benchmarks import _onednn_conv
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 7, 6, 3))
    w = jax.random.normal(kw, (3, 2, 3, 4))
    conv = _onednn_conv.make_conv(padding)
    y = jax.jit(conv)(x, w)
    ref = _xla_conv(x, w, padding)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    dy = jax.random.normal(kd, ref.shape)
    loss = lambda f: lambda a, b: jnp.vdot(f(a, b), dy)  # noqa: E731
    got = jax.jit(jax.grad(loss(conv), argnums=(0, 1)))(x, w)
    want = jax.grad(loss(lambda a, b: _xla_conv(a, b, padding)),
                    argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_patched_layers_route_plain_convs_only(monkeypatch):
    """``patch_layers`` sends plain convolutions through the callback and
    leaves the CPU paths of ``layers.Conv`` alone; the model's outputs
    stay those of the unpatched layers."""
    from benchmarks import _onednn_conv
    from dlfix_jax.models import layers
    calls = []
    real = _onednn_conv.make_conv

    def counting(padding):
        conv = real(padding)

        def wrapped(x, w):
            calls.append((padding, x.shape))
            return conv(x, w)
        return wrapped

    monkeypatch.setattr(_onednn_conv, "make_conv", counting)
    monkeypatch.setattr(layers, "Conv", layers.Conv)  # restored afterwards
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    plain = layers.Conv(4, (3, 3), padding="SAME")
    small = layers.Conv(4, (3, 3), padding="SAME")
    v = plain.init(jax.random.key(2), x)
    vs = small.init(jax.random.key(3), x[:, :2, :1])
    want, want_small = plain.apply(v, x), small.apply(vs, x[:, :2, :1])
    _onednn_conv.patch_layers()
    assert layers.Conv is not plain.__class__
    got = layers.Conv(4, (3, 3), padding="SAME").apply(v, x)
    got_small = layers.Conv(4, (3, 3), padding="SAME").apply(
        vs, x[:, :2, :1])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_small, want_small, rtol=1e-5, atol=1e-5)
    # Only the plain one went through the callback (the 2x1 input under a
    # 3x3 window keeps the im2col path).
    assert calls == [("SAME", (2, 8, 8, 3))]


def test_conv_kernels_runs_and_writes_json(tmp_path):
    out = tmp_path / "ck.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.conv_kernels",
         "--shapes=4:3:5,2:4:4", "--batch_size=2", "--repeats=1",
         f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"xla", "onednn", "callback"}
    for rows in res["results"].values():
        assert [r["shape"] for r in rows] == [[4, 3, 5], [2, 4, 4]]
        assert all(r[k] > 0 for r in rows
                   for k in ("fwd", "grad_input", "grad_kernel"))
    assert "| all layers | grad_kernel |" in proc.stdout


@pytest.mark.parametrize("arg", ["--shapes=4:3", "--shapes=4:0:5",
                                 "--frameworks=cudnn"])
def test_conv_kernels_rejects_bad_flags(arg):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.conv_kernels", arg, "--out="],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert ("--shapes" in proc.stderr) or ("cudnn" in proc.stderr)
