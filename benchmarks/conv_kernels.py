"""VGG16's convolutions one by one: XLA:CPU's kernels (what our JAX models
run) vs TensorFlow's oneDNN kernels (what Keras runs), same shapes, same
machine, each framework in its own subprocess.

Run:
  python -m benchmarks.conv_kernels [--frameworks=xla,onednn,callback]
      (optional frameworks: xla_kgrad, winograd)
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
  path, the others take XLA's kernels for the value and the input
  gradient and the chunked kernel gradient); the two gradients are
  ``jax.vjp`` pullbacks whose unused forward value XLA removes as dead
  code, so no forward pass is timed with them
  (``jax.linear_transpose`` would transpose a ``custom_jvp``'s primal
  and time XLA's filter gradient instead of the chunked one);
* ``xla_kgrad``: the same with ``layers.CHUNKED_KERNEL_GRAD`` off, i.e.
  XLA:CPU's own filter-gradient convolution (optional);
* ``winograd`` (optional, an experiment): ``benchmarks._winograd``'s
  F(2x2, 3x3) convolution in plain JAX, both gradients by autodiff (every
  shape, the 2x2 maps included);
* ``onednn``: TensorFlow's ``Conv2D``, ``Conv2DBackpropInput`` and
  ``Conv2DBackpropFilter`` (oneDNN on x86) on TensorFlow tensors;
* ``callback``: the same TensorFlow kernels called from jitted JAX through
  ``jax.pure_callback`` (``benchmarks._onednn_conv``), so the cost of
  handing the arrays over is included.

The table gives milliseconds per kernel and XLA's time over each other
framework's, then two sums: each shape once, and weighted by how often the
shape occurs in VGG16 (``--shapes`` entries count once unless given as
``side:cin:cout:count``), without the first layer's input gradient, which
training does not compute (the first listed shape is taken as the first
layer). These are kernels timed alone, not their share
of a training step (``benchmarks.train_throughput`` measures that).
Results are also written as JSON (machine facts included).
"""

from __future__ import annotations

import json
import os
import platform
import time

from absl import app, flags

flags.DEFINE_list("frameworks", ["xla", "onednn", "callback"],
                  "Frameworks to measure (xla, onednn, callback; optional: "
                  "xla_kgrad, winograd).")
flags.DEFINE_list("shapes", None, "Layers as side:cin:cout[:count] "
                  "(default: every distinct VGG16 convolution on CIFAR-10, "
                  "with its count in the model).")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("repeats", 5, "Timed calls per kernel (minimum kept).")
flags.DEFINE_string("out", "runs/bench/conv_kernels.json",
                    "JSON output path ('' for none).")
flags.DEFINE_string("single", None, "Internal: measure one framework in "
                    "this process and print its times as JSON.")
FLAGS = flags.FLAGS

FRAMEWORKS = ("xla", "xla_kgrad", "winograd", "onednn", "callback")
KERNELS = ("fwd", "grad_input", "grad_kernel")
# (input side, input channels, filters, occurrences) of VGG16's 13
# convolutions on 32x32x3 inputs (dlfix_jax.models.zoo.vgg16).
VGG16 = ((32, 3, 64, 1), (32, 64, 64, 1), (16, 64, 128, 1),
         (16, 128, 128, 1), (8, 128, 256, 1), (8, 256, 256, 2),
         (4, 256, 512, 1), (4, 512, 512, 2), (2, 512, 512, 3))


def parse_shapes(spec) -> tuple:
    """``["32:64:64", "8:256:256:2", ...]`` -> ``((32, 64, 64, 1),
    (8, 256, 256, 2), ...)``; a one-line ``ValueError`` otherwise."""
    if not spec:
        return VGG16
    out = []
    for s in spec:
        parts = s.split(":")
        if len(parts) not in (3, 4) or not all(
                p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--shapes entry {s!r}: expected "
                             "side:cin:cout[:count], positive integers")
        if int(parts[1]) == 1:
            raise ValueError(f"--shapes entry {s!r}: one input channel "
                             "takes layers.Conv's one-channel path, not a "
                             "convolution kernel; use cin >= 2")
        out.append(tuple(int(p) for p in parts) + ((1,) if len(parts) == 3
                                                   else ()))
    return tuple(out)


def check_flags() -> tuple:
    """Validated (shapes, frameworks); ``app.UsageError`` with one line."""
    try:
        shapes = parse_shapes(FLAGS.shapes)
    except ValueError as e:
        raise app.UsageError(str(e))
    frameworks = [FLAGS.single] if FLAGS.single else FLAGS.frameworks
    for fw in frameworks:
        if fw not in FRAMEWORKS:
            raise app.UsageError(f"unknown framework {fw!r}; known: "
                                 f"{', '.join(FRAMEWORKS)}")
    if FLAGS.batch_size < 1 or FLAGS.repeats < 1:
        raise app.UsageError("--batch_size and --repeats must be positive, "
                             f"got {FLAGS.batch_size} and {FLAGS.repeats}")
    return shapes, list(dict.fromkeys(frameworks))


def _data(batch, side, cin, cout, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, side, side, cin), dtype=np.float32)
    w = 0.05 * rng.standard_normal((3, 3, cin, cout), dtype=np.float32)
    dy = rng.standard_normal((batch, side, side, cout), dtype=np.float32)
    return x, w, dy


def _time(fn, repeats) -> float:
    """Best steady-state milliseconds of ``fn`` after one warm-up call."""
    from benchmarks._timing import timed
    return 1e3 * timed(fn, repeats)[1]


def _jax_kernels(framework, x, w, dy):
    import jax
    import jax.numpy as jnp

    x, w, dy = jnp.asarray(x), jnp.asarray(w), jnp.asarray(dy)
    if framework in ("xla", "xla_kgrad", "winograd"):
        if framework == "winograd":
            from benchmarks._winograd import conv3x3_same as conv
        else:
            from dlfix_jax.models import layers
            layers.CHUNKED_KERNEL_GRAD = framework == "xla"
            mod = layers.Conv(w.shape[-1], (3, 3), padding="SAME",
                              use_bias=False)

            def conv(x_, w_):
                return mod.apply({"params": {"kernel": w_}}, x_)

        fwd = jax.jit(conv)
        gx = jax.jit(lambda w_, dy_: jax.vjp(
            lambda a: conv(a, w_), x)[1](dy_)[0])
        gw = jax.jit(lambda x_, dy_: jax.vjp(
            lambda b: conv(x_, b), w)[1](dy_)[0])
    else:
        from benchmarks import _onednn_conv
        fwd, gx, gw = (jax.jit(f) for f in _onednn_conv.callbacks(
            x.shape, w.shape, "SAME", x.dtype))
    return {"fwd": lambda: jax.block_until_ready(fwd(x, w)),
            "grad_input": lambda: jax.block_until_ready(gx(w, dy)),
            "grad_kernel": lambda: jax.block_until_ready(gw(x, dy))}


def _tf_kernels(x, w, dy):
    import tensorflow as tf

    from benchmarks import _onednn_conv
    fwd, gx, gw = (tf.function(f) for f in _onednn_conv.tf_ops(
        x.shape, w.shape, "SAME"))
    x, w, dy = tf.constant(x), tf.constant(w), tf.constant(dy)
    # .numpy() copies each result to a NumPy array; the copy is counted
    # against oneDNN (a conservative comparison for XLA).
    return {"fwd": lambda: fwd(x, w).numpy(),
            "grad_input": lambda: gx(w, dy).numpy(),
            "grad_kernel": lambda: gw(x, dy).numpy()}


def measure(framework: str, shapes, batch: int, repeats: int) -> list:
    """Per-layer milliseconds of the three kernels in this process."""
    rows = []
    for side, cin, cout, _ in shapes:
        data = _data(batch, side, cin, cout)
        kernels = (_tf_kernels(*data) if framework == "onednn"
                   else _jax_kernels(framework, *data))
        rows.append({"shape": [side, cin, cout],
                     **{k: _time(kernels[k], repeats) for k in KERNELS}})
    return rows


def sums(rows, shapes) -> dict:
    """Per-kernel sums: ``once`` (each shape once) and ``weighted`` (by
    count, without the first listed layer's input gradient)."""
    once = {k: sum(r[k] for r in rows) for k in KERNELS}
    weighted = {k: sum(r[k] * s[3] for r, s in zip(rows, shapes))
                for k in KERNELS}
    weighted["grad_input"] -= rows[0]["grad_input"]
    return {"once": once, "weighted": weighted}


def _row(label, k, vals, frameworks, ratio_to) -> str:
    line = (f"| {label} | {k} | "
            + " | ".join(f"{vals[fw]:.1f}" for fw in frameworks) + " |")
    if ratio_to:
        # A sum can be 0 ms: the weighted input gradient of a one-layer
        # --shapes list (the first layer's is left out).
        line += " " + " | ".join(
            f"{vals['xla'] / vals[fw]:.2f}x" if vals[fw] else "-"
            for fw in ratio_to) + " |"
    return line


def main(argv):
    del argv
    shapes, frameworks = check_flags()
    if FLAGS.single:
        print(json.dumps({"rows": measure(FLAGS.single, shapes,
                                          FLAGS.batch_size,
                                          FLAGS.repeats)}))
        return
    from benchmarks._subprocess import run_single
    load = [os.getloadavg()[0]]
    res = {}
    for fw in frameworks:
        args = [f"--single={fw}", f"--batch_size={FLAGS.batch_size}",
                f"--repeats={FLAGS.repeats}", "--out="]
        if FLAGS.shapes:
            args.append("--shapes=" + ",".join(FLAGS.shapes))
        res[fw] = run_single("benchmarks.conv_kernels", args, "rows")
        load.append(os.getloadavg()[0])
        print(f"measured {fw} (load {load[-1]:.1f})", flush=True)
    ratio_to = ([f for f in frameworks if f != "xla"] if "xla" in res
                else [])
    print(f"\n| layer | kernel | "
          + " | ".join(f"{fw} ms" for fw in frameworks) + " |"
          + "".join(f" xla / {fw} |" for fw in ratio_to))
    print("|---|---|" + "---:|" * (len(frameworks) + len(ratio_to)))
    for i, (side, cin, cout, _) in enumerate(shapes):
        for k in KERNELS:
            print(_row(f"{side}x{side}x{cin}->{cout}", k,
                       {fw: res[fw][i][k] for fw in frameworks},
                       frameworks, ratio_to))
    totals = {fw: sums(res[fw], shapes) for fw in frameworks}
    for which, label in (("once", "each shape once"),
                         ("weighted", "weighted by count")):
        for k in KERNELS:
            print(_row(label, k, {fw: totals[fw][which][k]
                                  for fw in frameworks},
                       frameworks, ratio_to))
    print(f"\nload average (1 min) over the run: {min(load):.1f}-"
          f"{max(load):.1f}")
    if FLAGS.out:
        import jax
        import jaxlib

        from dlfix_jax.fileio import atomic_write_json
        versions = {"jax": jax.__version__, "jaxlib": jaxlib.__version__}
        if "onednn" in res or "callback" in res:
            import tensorflow as tf
            versions["tensorflow"] = tf.__version__
        atomic_write_json(FLAGS.out, {
            "batch": FLAGS.batch_size, "repeats": FLAGS.repeats,
            "shapes": [list(s) for s in shapes],
            "results": res, "sums_ms": totals,
            "machine": {"cpus": os.cpu_count(),
                        "platform": platform.platform(),
                        "load_avg_1m": [min(load), max(load)]},
            "versions": versions})
        print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
