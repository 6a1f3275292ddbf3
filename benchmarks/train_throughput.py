"""Training throughput (examples/s): our JAX trainer vs Keras, same run.

Run:
  python -m benchmarks.train_throughput [--models=lenet5,vgg16]
      [--frameworks=jax,keras,tf_keras] [--lenet5_steps=200]
      [--vgg16_steps=16] [--rounds=3] [--out=runs/bench/train_throughput.json]

For each model, the same architecture, batch size (128), optimizer (Adam,
lr 1e-3) and softmax cross-entropy are trained on the same **random data of
the right shape** (MNIST-shaped 28x28x1 for LeNet5, CIFAR-shaped 32x32x3 for
VGG16; throughput does not depend on the pixel values). Each framework first
runs warm-up steps (compilation, graph tracing), then ``--<model>_steps``
timed steps. The reported rate is **steady**: examples/s from the end of
the first timed step to the end of the last, stamped after each step (a
Keras batch callback; for ``jax`` a wrapper that waits for each step).
Keras's ``fit`` spends a variable time before its first and after its last
batch (measured: 2 ms to 16 s, and 4.5 s for LeNet5's first batch even
after a warm-up ``fit``), which would otherwise be counted as training;
the rate over the whole call is reported beside it.

* ``jax``: the shared training loop (:func:`dlfix_jax.training.loop.fit`
  with the cross-entropy step of :func:`~dlfix_jax.training.loop.make_step`:
  one jitted step per call, host-side batch gather from a shuffled epoch
  included, BatchNorm stats and dropout as in training).
* ``keras``: Keras 3 (TensorFlow backend, its defaults, incl.
  ``jit_compile="auto"``), ``model.fit`` on NumPy arrays.
* ``tf_keras``: Keras 2 (``tf_keras``, the API of the study's TF 2.3
  models), ``model.fit`` the same way.
* ``jax_plain`` (optional): ``jax`` with the XLA:CPU workarounds of
  :mod:`dlfix_jax.models.layers` switched off (``layers.on_cpu`` patched
  to False: plain ``nn.Conv`` / ``nn.max_pool``), to measure what they buy.
* ``jax_xla_kgrad`` (optional): ``jax`` with
  ``layers.CHUNKED_KERNEL_GRAD`` off, i.e. XLA:CPU's own filter-gradient
  convolution for the kernel gradients (to measure what the chunked
  kernel gradient buys).
* ``keras_xla`` (optional): ``keras`` with ``jit_compile=True``, i.e. Keras 3
  on TensorFlow's XLA:CPU, the compiler our JAX code runs on (Keras 3's
  ``"auto"`` turns XLA off on a machine with no accelerator, so ``keras``
  runs TensorFlow's own oneDNN kernels there).
* ``jax_onednn`` (optional, an experiment): ``jax`` with every convolution
  that ``layers.Conv`` gives ``nn.Conv`` routed through TensorFlow's oneDNN
  kernels by ``jax.pure_callback`` (``benchmarks._onednn_conv``), to measure
  what swapping XLA:CPU's convolution kernels would buy, transfers included.

The frameworks are measured in turn, ``--rounds`` times (A, B, C, A, B,
C, ...), and the median examples/s is reported with the median of the
per-round ratios, so that load from other jobs on a shared machine hits
all frameworks alike.

Every (model, framework) pair runs in a fresh subprocess, so one
framework's thread pools and imports (TensorFlow's oneDNN/OpenMP threads)
cannot slow down another. VGG16 on CPU is slow (over a second per step), so
16 timed steps are the default. Results are printed as a table and written
as JSON (machine facts included; ``examples_per_s`` is the steady rate,
``whole_call_examples_per_s`` the other).
"""

from __future__ import annotations

import json
import os
import platform
import time

from absl import app, flags

flags.DEFINE_list("models", ["lenet5", "vgg16"], "Models to measure.")
flags.DEFINE_list("frameworks", ["jax", "keras", "tf_keras"],
                  "Frameworks to measure.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("lenet5_steps", 200, "Timed LeNet5 steps.")
flags.DEFINE_integer("vgg16_steps", 16, "Timed VGG16 steps.")
flags.DEFINE_integer("warmup_steps", 2, "Warm-up steps (not timed).")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds over the frameworks "
                     "(medians reported).")
flags.DEFINE_string("out", "runs/bench/train_throughput.json",
                    "JSON output path.")
flags.DEFINE_string("single", None, "Internal: measure one 'model,framework'"
                    " in this process and print its steady and whole-call "
                    "examples/s as JSON.")
FLAGS = flags.FLAGS

SHAPES = {"lenet5": (28, 28, 1), "vgg16": (32, 32, 3)}
JAX_FRAMEWORKS = ("jax", "jax_plain", "jax_xla_kgrad", "jax_onednn")
FRAMEWORKS = JAX_FRAMEWORKS + ("keras", "keras_xla", "tf_keras")


def _data(model: str, steps: int, batch: int, seed: int = 0):
    import numpy as np
    rng = np.random.default_rng(seed)
    n = steps * batch
    x = rng.random((n,) + SHAPES[model], dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    return x, y


def _rates(t0: float, stamps: list, t1: float, batch: int,
           steps: int) -> dict:
    """``steady``: examples/s from the end of the first timed step to the
    end of the last (``len(stamps) - 1`` steps); ``whole``: over the whole
    call, ``t0`` to ``t1``, per-call costs included."""
    if len(stamps) != steps or steps < 2:
        raise ValueError(f"expected {steps} (>= 2) step stamps, got "
                         f"{len(stamps)}")
    return {"steady": (len(stamps) - 1) * batch / (stamps[-1] - stamps[0]),
            "whole": len(stamps) * batch / (t1 - t0)}


def bench_jax(model_name: str, steps: int, warmup: int, batch: int,
              plain: bool = False, onednn: bool = False,
              xla_kgrad: bool = False) -> dict:
    import jax

    from dlfix_jax import models
    from dlfix_jax.data import base as data_base
    from dlfix_jax.data.source import Source
    from dlfix_jax.training import loop

    from dlfix_jax.models import layers
    if plain:
        layers.on_cpu = lambda: False
    if xla_kgrad:
        layers.CHUNKED_KERNEL_GRAD = False
    if onednn:
        from benchmarks import _onednn_conv
        _onednn_conv.patch_layers()
    model = models.get(model_name)
    v = model.init(jax.random.key(0))
    tx = loop.optimizer("adam", 1e-3)
    jit_step = loop.make_step(loop.xent(model), tx)
    stamps: list = []

    def step(state, b, k):
        # Waits for each step so its end can be stamped, as Keras's batch
        # callback does; this costs ours the overlap of the host-side
        # batch gather with the previous step (a conservative timing).
        state, metrics = jit_step(state, b, k)
        jax.block_until_ready(state)
        stamps.append(time.perf_counter())
        return state, metrics

    key = jax.random.key(1)
    x, y = _data(model_name, max(steps, warmup), batch)
    src = Source(data_base.Split(x, y))

    def run(k, state):
        # As in train_and_evaluate: the shared loop, host-side batch gather
        # from a shuffled epoch, one jitted step per call.
        res = loop.fit(key, None, src.take_steps(key, batch, k),
                       step_fn=step, state=state, num_steps=k)
        jax.block_until_ready(res.state)
        return res.state

    state = run(warmup, loop.init_state(v, tx))  # compiles the step
    stamps.clear()
    t0 = time.perf_counter()
    run(steps, state)
    return _rates(t0, stamps, time.perf_counter(), batch, steps)


def _keras_model(keras, name: str, jit_compile="auto"):
    L = keras.layers
    if name == "lenet5":
        layers = [L.Conv2D(6, 5, activation="relu"),
                  L.MaxPooling2D(3, 3),
                  L.Conv2D(16, 3, activation="relu"),
                  L.MaxPooling2D(2),
                  L.Flatten(),
                  L.Dense(120, activation="relu"),
                  L.Dense(84, activation="relu"),
                  L.Dense(10)]
    else:  # vgg16, as dlfix_jax.models.zoo.vgg16
        layers = []
        for block in ((64, 64), (128, 128), (256,) * 3, (512,) * 3,
                      (512,) * 3):
            for f in block:
                layers += [L.Conv2D(f, 3, padding="same"),
                           L.BatchNormalization(), L.ReLU()]
            layers.append(L.MaxPooling2D(2))
        layers += [L.Flatten(), L.Dense(512), L.BatchNormalization(),
                   L.ReLU(), L.Dropout(0.5), L.Dense(10)]
    model = keras.Sequential([keras.Input(SHAPES[name])] + layers)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile)
    return model


def bench_keras(which: str, model_name: str, steps: int, warmup: int,
                batch: int) -> dict:
    if which in ("keras", "keras_xla"):
        import keras
    else:
        import tf_keras as keras
    if which == "keras_xla":
        model = _keras_model(keras, model_name, jit_compile=True)
    elif which == "keras":
        model = _keras_model(keras, model_name)
    else:  # tf_keras: its own default (no XLA)
        model = _keras_model(keras, model_name, jit_compile=None)
    x, y = _data(model_name, max(steps, warmup), batch)
    model.fit(x[:warmup * batch], y[:warmup * batch], batch_size=batch,
              epochs=1, verbose=0, shuffle=False)
    stamps: list = []

    class Stamp(keras.callbacks.Callback):
        # Takes TF logs as they are: tf_keras would otherwise convert them
        # to NumPy after every batch for this callback's sake.
        _supports_tf_logs = True

        def on_train_batch_end(self, b, logs=None):
            stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    model.fit(x[:steps * batch], y[:steps * batch], batch_size=batch,
              epochs=1, verbose=0, shuffle=False, callbacks=[Stamp()])
    return _rates(t0, stamps, time.perf_counter(), batch, steps)


def _measure(name: str, fw: str) -> dict:
    steps = getattr(FLAGS, f"{name}_steps")
    if fw in JAX_FRAMEWORKS:
        return bench_jax(name, steps, FLAGS.warmup_steps, FLAGS.batch_size,
                         plain=fw == "jax_plain", onednn=fw == "jax_onednn",
                         xla_kgrad=fw == "jax_xla_kgrad")
    return bench_keras(fw, name, steps, FLAGS.warmup_steps, FLAGS.batch_size)


def _check_flags(models, frameworks) -> None:
    """One-line ``app.UsageError`` for an unknown model or framework, or
    fewer than 2 timed steps, before anything is measured."""
    for name in models:
        if name not in SHAPES:
            raise app.UsageError(f"unknown model {name!r}; known: "
                                 f"{', '.join(sorted(SHAPES))}")
        steps = getattr(FLAGS, f"{name}_steps")
        if steps < 2:
            raise app.UsageError(f"--{name}_steps must be at least 2 (the "
                                 f"steady rate spans steps 1..n), got {steps}")
    for fw in frameworks:
        if fw not in FRAMEWORKS:
            raise app.UsageError(f"unknown framework {fw!r}; known: "
                                 f"{', '.join(FRAMEWORKS)}")
    if FLAGS.batch_size < 1 or FLAGS.warmup_steps < 1 or FLAGS.rounds < 1:
        raise app.UsageError("--batch_size, --warmup_steps and --rounds must "
                             "be positive")


def _in_subprocess(name: str, fw: str) -> dict:
    from benchmarks._subprocess import run_single
    return run_single("benchmarks.train_throughput", [
        f"--single={name},{fw}", f"--batch_size={FLAGS.batch_size}",
        f"--{name}_steps={getattr(FLAGS, f'{name}_steps')}",
        f"--warmup_steps={FLAGS.warmup_steps}", "--out="], "rates")


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if FLAGS.single:
        parts = FLAGS.single.split(",")
        if len(parts) != 2:
            raise app.UsageError(f"--single={FLAGS.single!r}: expected "
                                 "'model,framework'")
        _check_flags([parts[0]], [parts[1]])
        print(json.dumps({"rates": _measure(*parts)}))
        return
    _check_flags(FLAGS.models, FLAGS.frameworks)
    batch = FLAGS.batch_size
    import numpy as np
    results = []
    loads = [os.getloadavg()[0]]
    for name in FLAGS.models:
        steps = getattr(FLAGS, f"{name}_steps")
        runs = {fw: [] for fw in FLAGS.frameworks}
        whole = {fw: [] for fw in FLAGS.frameworks}
        for r in range(FLAGS.rounds):
            for fw in FLAGS.frameworks:
                rates = _in_subprocess(name, fw)
                runs[fw].append(rates["steady"])
                whole[fw].append(rates["whole"])
                loads.append(os.getloadavg()[0])
                print(f"round {r + 1} {name:8s} {fw:10s} "
                      f"{rates['steady']:10.1f} examples/s steady, "
                      f"{rates['whole']:10.1f} whole call "
                      f"(load {loads[-1]:.1f})", flush=True)
        for fw, v in runs.items():
            ref = runs.get("jax")
            ratio = (float(np.median(np.asarray(ref) / np.asarray(v)))
                     if ref else None)
            results.append({"model": name, "framework": fw, "batch": batch,
                            "timed_steps": steps, "rounds": v,
                            "examples_per_s": float(np.median(v)),
                            "jax_over_this": ratio,
                            "whole_call_rounds": whole[fw],
                            "whole_call_examples_per_s":
                                float(np.median(whole[fw]))})

    import jax
    versions = {"jax": jax.__version__}
    try:
        import tensorflow as tf
        import keras
        versions.update(tensorflow=tf.__version__, keras=keras.__version__)
    except ImportError:
        pass
    print(f"\nload average (1 min) over the run: {min(loads):.1f}-"
          f"{max(loads):.1f}")
    print("| model | framework | examples/s, steady (median) | JAX / this "
          "(median of per-round ratios) | whole call (median) |")
    print("|---|---|---:|---:|---:|")
    for r in results:
        ratio = (f"{r['jax_over_this']:.2f}x" if r["jax_over_this"]
                 else "-")
        print(f"| {r['model']} | {r['framework']} | "
              f"{r['examples_per_s']:.1f} | {ratio} | "
              f"{r['whole_call_examples_per_s']:.1f} |")
    out = {"results": results, "data": "random, right shape",
           "machine": {"cpus": os.cpu_count(),
                       "platform": platform.platform(),
                       "processor": platform.processor(),
                       "load_avg_1m": [min(loads), max(loads)]},
           "versions": versions}
    if FLAGS.out:
        from dlfix_jax.fileio import atomic_write_json
        atomic_write_json(FLAGS.out, out)
        print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
