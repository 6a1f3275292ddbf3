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


def _tf():
    pytest.importorskip("tensorflow")


def _xla_conv(x, w, padding):
    return lax.conv_general_dilated(
        x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_callback_conv_matches_xla_values_and_gradients(padding):
    _tf()
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


@pytest.mark.parametrize("hw", [(7, 5), (2, 2)])
def test_winograd_conv_matches_xla_values_and_gradients(hw):
    """The ``winograd`` experiment computes the same function as XLA's
    SAME 3x3 convolution, odd and smaller-than-kernel maps included."""
    from benchmarks._winograd import conv3x3_same
    kx, kw, kd = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (2, *hw, 3))
    w = jax.random.normal(kw, (3, 3, 3, 4))
    ref = _xla_conv(x, w, "SAME")
    np.testing.assert_allclose(jax.jit(conv3x3_same)(x, w), ref,
                               rtol=1e-5, atol=1e-5)
    dy = jax.random.normal(kd, ref.shape)
    loss = lambda f: lambda a, b: jnp.vdot(f(a, b), dy)  # noqa: E731
    got = jax.grad(loss(conv3x3_same), argnums=(0, 1))(x, w)
    want = jax.grad(loss(lambda a, b: _xla_conv(a, b, "SAME")),
                    argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="3x3 kernel"):
        conv3x3_same(x, w[:2])


def test_patched_layers_route_only_what_xla_would_run(monkeypatch):
    """``patch_layers`` sends the convolutions ``Conv.cpu_path`` leaves to
    XLA (SAME and VALID) through the callback and keeps the im2col and
    one-channel paths; every output stays that of the unpatched layers,
    with the same variables."""
    _tf()
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
    # Recorded so that monkeypatch puts the original back afterwards.
    monkeypatch.setattr(layers, "Conv", layers.Conv)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    cases = [(x, "SAME"), (x, "VALID"), (x[:, :2, :1], "SAME"),
             (x[..., :1], "VALID")]
    want = []
    for i, (xi, pad) in enumerate(cases):
        m = layers.Conv(4, (3, 3), padding=pad)
        v = m.init(jax.random.key(2 + i), xi)
        want.append((v, m.apply(v, xi)))
    _onednn_conv.patch_layers()
    assert layers.Conv.__name__ == "OneDnnConv"
    for (xi, pad), (v, ref) in zip(cases, want):
        got = layers.Conv(4, (3, 3), padding=pad).apply(v, xi)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert calls == [("SAME", (2, 8, 8, 3)), ("VALID", (2, 8, 8, 3))]


def test_conv_kernels_runs_and_writes_json(tmp_path):
    _tf()
    out = tmp_path / "ck.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.conv_kernels",
         "--shapes=4:3:5,2:4:4:3", "--batch_size=2", "--repeats=1",
         f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"xla", "onednn", "callback"}
    for rows in res["results"].values():
        assert [r["shape"] for r in rows] == [[4, 3, 5], [2, 4, 4]]
        assert all(r[k] > 0 for r in rows
                   for k in ("fwd", "grad_input", "grad_kernel"))
    sums = res["sums_ms"]["xla"]
    rows = res["results"]["xla"]
    assert sums["once"]["fwd"] == pytest.approx(rows[0]["fwd"]
                                                + rows[1]["fwd"])
    # Weighted: the second shape counts 3 times; the first layer's input
    # gradient is left out.
    assert sums["weighted"]["grad_input"] == pytest.approx(
        3 * rows[1]["grad_input"])
    assert "| weighted by count | grad_kernel |" in proc.stdout


def test_conv_kernels_winograd_framework_runs(tmp_path):
    out = tmp_path / "ck.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.conv_kernels",
         "--frameworks=xla,winograd", "--shapes=4:3:5", "--batch_size=2",
         "--repeats=1", f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"xla", "winograd"}
    assert all(res["winograd"][0][k] > 0
               for k in ("fwd", "grad_input", "grad_kernel"))
    assert "xla / winograd" in proc.stdout
    # One layer: its weighted input gradient is left out (0 ms), no ratio.
    assert "| weighted by count | grad_input | 0.0 | 0.0 | - |" in proc.stdout


@pytest.mark.parametrize("arg,message", [
    ("--shapes=4:3", "expected side:cin:cout[:count]"),
    ("--shapes=4:0:5", "expected side:cin:cout[:count]"),
    ("--shapes=4:1:5", "one input channel"),
    ("--frameworks=cudnn", "unknown framework 'cudnn'"),
    ("--single=cudnn", "unknown framework 'cudnn'"),
    ("--repeats=0", "must be positive"),
])
def test_conv_kernels_rejects_bad_flags(arg, message):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.conv_kernels", arg, "--out="],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
