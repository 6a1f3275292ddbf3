"""VGG16's convolutions one by one: XLA:CPU's kernels (what our JAX models
run) vs TensorFlow's oneDNN kernels (what Keras runs), same shapes, same
machine, each framework in its own subprocess.

Run:
  python -m benchmarks.conv_kernels [--frameworks=xla,onednn,callback]
      [--batch_size=128] [--repeats=5] [--out=runs/bench/conv_kernels.json]

For every distinct convolution of ``dlfix_jax.models.zoo.vgg16`` on
CIFAR-10 (3x3, stride 1, SAME; input side, input channels, filters), three
kernels are timed, each alone and jitted (the minimum over ``--repeats``
calls after one warm-up call):

* ``fwd``: the convolution;
* ``grad_input``: its input gradient (a transposed convolution);
* ``grad_kernel``: its kernel gradient.

Frameworks:

* ``xla``: ``dlfix_jax.models.layers.Conv`` under ``jax.jit``, with the
  CPU paths our models take (the 2x2 block-5 maps go through its im2col
  path); the two gradients are ``jax.linear_transpose`` of the convolution
  in x and in the kernel, so no forward pass is timed with them;
* ``onednn``: TensorFlow's ``Conv2D``, ``Conv2DBackpropInput`` and
  ``Conv2DBackpropFilter`` (oneDNN on x86) on TensorFlow tensors;
* ``callback``: the same TensorFlow kernels called from jitted JAX through
  ``jax.pure_callback`` (``benchmarks._onednn_conv``), so the cost of
  handing the arrays over is included.

The table gives milliseconds per kernel and XLA's time over each other
framework's. Results are also written as JSON (machine facts included).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_list("frameworks", ["xla", "onednn", "callback"],
                  "Frameworks to measure (xla, onednn, callback).")
flags.DEFINE_list("shapes", None, "Layers as side:cin:cout (default: "
                  "every distinct VGG16 convolution on CIFAR-10).")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("repeats", 5, "Timed calls per kernel (minimum kept).")
flags.DEFINE_string("out", "runs/bench/conv_kernels.json",
                    "JSON output path ('' for none).")
flags.DEFINE_string("single", None, "Internal: measure one framework in "
                    "this process and print its times as JSON.")
FLAGS = flags.FLAGS

FRAMEWORKS = ("xla", "onednn", "callback")
KERNELS = ("fwd", "grad_input", "grad_kernel")
# (input side, input channels, filters) of VGG16's 13 convolutions on
# 32x32x3 inputs, each distinct shape once.
VGG16 = ((32, 3, 64), (32, 64, 64), (16, 64, 128), (16, 128, 128),
         (8, 128, 256), (8, 256, 256), (4, 256, 512), (4, 512, 512),
         (2, 512, 512))


def parse_shapes(spec) -> tuple:
    """``["32:64:64", ...]`` -> ``((32, 64, 64), ...)``; one-line errors."""
    if not spec:
        return VGG16
    out = []
    for s in spec:
        parts = s.split(":")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0
                                      for p in parts):
            raise ValueError(f"--shapes entry {s!r}: expected "
                             "side:cin:cout with positive integers")
        out.append(tuple(int(p) for p in parts))
    return tuple(out)


def _data(batch, side, cin, cout, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, side, side, cin), dtype=np.float32)
    w = 0.05 * rng.standard_normal((3, 3, cin, cout), dtype=np.float32)
    dy = rng.standard_normal((batch, side, side, cout), dtype=np.float32)
    return x, w, dy


def _time(fn, repeats) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def _jax_kernels(framework, x, w, dy):
    import jax
    import jax.numpy as jnp

    x, w, dy = jnp.asarray(x), jnp.asarray(w), jnp.asarray(dy)
    if framework == "xla":
        from dlfix_jax.models import layers
        mod = layers.Conv(w.shape[-1], (3, 3), padding="SAME",
                          use_bias=False)

        def conv(x_, w_):
            return mod.apply({"params": {"kernel": w_}}, x_)

        fwd = jax.jit(conv)
        gx = jax.jit(lambda w_, dy_: jax.linear_transpose(
            lambda a: conv(a, w_), x)(dy_)[0])
        gw = jax.jit(lambda x_, dy_: jax.linear_transpose(
            lambda b: conv(x_, b), w)(dy_)[0])
    else:
        from benchmarks import _onednn_conv as oc
        conv = oc.make_conv("SAME")
        fwd = jax.jit(conv)
        xs, ws = tuple(x.shape), tuple(w.shape)
        gx = jax.jit(lambda w_, dy_: oc._callback(
            lambda a, b: oc.grad_input(a, b, xs, "SAME"), xs, w_, dy_))
        gw = jax.jit(lambda x_, dy_: oc._callback(
            lambda a, b: oc.grad_kernel(a, b, ws, "SAME"), ws, x_, dy_))
    return {"fwd": lambda: jax.block_until_ready(fwd(x, w)),
            "grad_input": lambda: jax.block_until_ready(gx(w, dy)),
            "grad_kernel": lambda: jax.block_until_ready(gw(x, dy))}


def _tf_kernels(x, w, dy):
    import tensorflow as tf

    from benchmarks import _onednn_conv as oc
    x, w, dy = tf.constant(x), tf.constant(w), tf.constant(dy)
    xs, ws = list(x.shape), list(w.shape)
    fwd = tf.function(lambda a, b: tf.nn.conv2d(a, b, 1, "SAME"))
    gx = tf.function(lambda b, d: tf.raw_ops.Conv2DBackpropInput(
        input_sizes=xs, filter=b, out_backprop=d, strides=oc.STRIDES,
        padding="SAME"))
    gw = tf.function(lambda a, d: tf.raw_ops.Conv2DBackpropFilter(
        input=a, filter_sizes=ws, out_backprop=d, strides=oc.STRIDES,
        padding="SAME"))
    # .numpy() waits for the result (TensorFlow's eager ops are async).
    return {"fwd": lambda: fwd(x, w).numpy(),
            "grad_input": lambda: gx(w, dy).numpy(),
            "grad_kernel": lambda: gw(x, dy).numpy()}


def measure(framework: str, shapes, batch: int, repeats: int) -> list:
    """Per-layer milliseconds of the three kernels in this process."""
    rows = []
    for side, cin, cout in shapes:
        data = _data(batch, side, cin, cout)
        kernels = (_tf_kernels(*data) if framework == "onednn"
                   else _jax_kernels(framework, *data))
        rows.append({"shape": [side, cin, cout],
                     **{k: _time(kernels[k], repeats) for k in KERNELS}})
    return rows


def _in_subprocess(framework: str) -> list:
    cmd = [sys.executable, "-m", "benchmarks.conv_kernels",
           f"--single={framework}", f"--batch_size={FLAGS.batch_size}",
           f"--repeats={FLAGS.repeats}", "--out="]
    if FLAGS.shapes:
        cmd.append("--shapes=" + ",".join(FLAGS.shapes))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("{\"rows\""):
            return json.loads(line)["rows"]
    raise RuntimeError(f"{framework} measurement failed:\n"
                       f"{out.stderr[-3000:]}")


def main(argv):
    del argv
    try:
        shapes = parse_shapes(FLAGS.shapes)
    except ValueError as e:
        raise app.UsageError(str(e))
    for fw in FLAGS.frameworks:
        if fw not in FRAMEWORKS:
            raise app.UsageError(f"unknown framework {fw!r}; known: "
                                 f"{', '.join(FRAMEWORKS)}")
    if FLAGS.single:
        print(json.dumps({"rows": measure(FLAGS.single, shapes,
                                          FLAGS.batch_size,
                                          FLAGS.repeats)}))
        return
    load = [os.getloadavg()[0]]
    res = {}
    for fw in FLAGS.frameworks:
        res[fw] = _in_subprocess(fw)
        load.append(os.getloadavg()[0])
        print(f"measured {fw} (load {load[-1]:.1f})", flush=True)
    others = [f for f in FLAGS.frameworks if f != "xla"]
    head = " | ".join(f"{fw} ms" for fw in FLAGS.frameworks)
    ratios = " | ".join(f"xla / {fw}" for fw in others
                        if "xla" in res)
    print(f"\n| layer | kernel | {head} |" + (f" {ratios} |"
                                               if ratios else ""))
    print("|---|---|" + "---:|" * (len(FLAGS.frameworks)
                                   + (len(others) if "xla" in res else 0)))
    totals = {fw: {k: 0.0 for k in KERNELS} for fw in res}
    for i, shape in enumerate(shapes):
        for k in KERNELS:
            ms = [res[fw][i][k] for fw in FLAGS.frameworks]
            for fw in res:
                totals[fw][k] += res[fw][i][k]
            line = (f"| {shape[0]}x{shape[0]}x{shape[1]}->{shape[2]} | {k} | "
                    + " | ".join(f"{m:.1f}" for m in ms) + " |")
            if "xla" in res and others:
                line += " " + " | ".join(
                    f"{res['xla'][i][k] / res[fw][i][k]:.2f}x"
                    for fw in others) + " |"
            print(line)
    for k in KERNELS:
        line = (f"| all layers | {k} | "
                + " | ".join(f"{totals[fw][k]:.1f}"
                             for fw in FLAGS.frameworks) + " |")
        if "xla" in res and others:
            line += " " + " | ".join(
                f"{totals['xla'][k] / totals[fw][k]:.2f}x"
                for fw in others) + " |"
        print(line)
    print(f"\nload average (1 min) over the run: {min(load):.1f}-"
          f"{max(load):.1f}")
    if FLAGS.out:
        import jax

        from dlfix_jax.training.checkpoint import atomic_write_json
        atomic_write_json(FLAGS.out, {
            "batch": FLAGS.batch_size, "repeats": FLAGS.repeats,
            "results": res, "totals_ms": totals,
            "note": "each distinct VGG16 shape once (block 3-5 layers "
                    "repeat in the model)",
            "machine": {"cpus": os.cpu_count(),
                        "platform": platform.platform(),
                        "load_avg_1m": [min(load), max(load)]},
            "versions": {"jax": jax.__version__}})
        print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
