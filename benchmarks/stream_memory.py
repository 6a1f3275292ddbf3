"""Peak memory of a streamed evaluation vs the same data in memory.

  python -m benchmarks.stream_memory [--model=densenet121] [--n=1000]
      [--batch_size=50] [--out=FILE.json]

No ImageNet is available here, so the stream is **synthetic and
ImageNet-shaped**: ``--n`` inputs of the model's input shape (224 x 224 x 3
for DenseNet121, 1,000 classes), generated batch by batch from a fixed key,
labels drawn the same way. Each mode runs in its own subprocess (peak RSS is
per process: ``resource.getrusage`` ``ru_maxrss``):

* ``streamed``: the test split is an iterable of ``Split`` batches (the kind
  :mod:`dlfix_jax.data.imagenet` gives); :func:`evaluate_models` reads it
  batch by batch (one pass; labels, predictions and finiteness flags kept);
* ``in_memory``: the same inputs concatenated into one ``Split`` first.

Both evaluate the original and one fixed model (ACC, RR, NFR; no PGD: on a
random model almost no input is classified correctly, and the ASR pass
gathers only ``n_samples`` rows anyway). The two results must be equal;
the table gives both peaks, the split's size in memory and the ratio.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_string("model", "densenet121", "Model (random weights).")
flags.DEFINE_integer("n", 1000, "Test inputs.")
flags.DEFINE_integer("batch_size", 50, "Rows per streamed batch and per "
                     "compiled prediction call.")
flags.DEFINE_enum("mode", None, ["streamed", "in_memory"],
                  "Internal: run one mode in this process.")
flags.DEFINE_string("out", None, "Write the measurements as JSON here.")
FLAGS = flags.FLAGS


def _one(mode: str, model_name: str, n: int, bs: int) -> dict:
    import resource
    import types

    import jax
    import numpy as np

    from dlfix_jax import models
    from dlfix_jax.data import Split
    from dlfix_jax.metrics import evaluate

    m = models.get(model_name)
    v = m.init(jax.random.key(0))
    fixed = jax.tree_util.tree_map(lambda a: a * 1.01, v)
    shape = tuple(m.input_shape)

    def batch(i, rows):
        k = jax.random.fold_in(jax.random.key(1), i)
        x = np.asarray(jax.random.normal(k, (rows,) + shape), np.float32)
        y = np.asarray(jax.random.randint(jax.random.fold_in(k, 1), (rows,),
                                          0, m.num_classes), np.int32)
        return Split(x, y)

    class Stream:
        def __len__(self):
            return n

        def __iter__(self):
            for i, start in enumerate(range(0, n, bs)):
                yield batch(i, min(bs, n - start))

    test = Stream()
    if mode == "in_memory":
        parts = list(test)
        test = Split(np.concatenate([p.x for p in parts]),
                     np.concatenate([p.y for p in parts]))
        del parts
    ds = types.SimpleNamespace(test=test, name="synthetic_imagenet",
                               num_classes=m.num_classes)
    t0 = time.perf_counter()
    res = evaluate.evaluate_models(jax.random.key(2), m, v, [(m, fixed)], ds,
                                   batch_size=bs)
    secs = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "peak_rss_gib": peak_kib / 2**20, "seconds": secs,
            "acc_orig": res["acc_orig"], "acc": res["acc"],
            "nfr": res["nfr"], "rr": res["rr"]}


def main(argv):
    del argv
    if FLAGS.mode:
        print("RESULT " + json.dumps(_one(FLAGS.mode, FLAGS.model, FLAGS.n,
                                          FLAGS.batch_size)), flush=True)
        return
    rows = []
    for mode in ("streamed", "in_memory"):
        cmd = [sys.executable, "-m", "benchmarks.stream_memory",
               f"--mode={mode}", f"--model={FLAGS.model}", f"--n={FLAGS.n}",
               f"--batch_size={FLAGS.batch_size}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines()
                if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{mode} run failed (exit {proc.returncode}): "
                     f"{proc.stderr.strip().splitlines()[-1:]}")
        rows.append(json.loads(line[0][len("RESULT "):]))
        r = rows[-1]
        print(f"{mode:9s} peak RSS {r['peak_rss_gib']:.2f} GiB, "
              f"{r['seconds']:.0f} s, acc {r['acc_orig']:.2f} / "
              f"{r['acc'][0]:.2f}", flush=True)
    from dlfix_jax import models
    shape = tuple(models.get(FLAGS.model).input_shape)
    split_gib = FLAGS.n * 4 * int(__import__("math").prod(shape)) / 2**30
    same = all(rows[0][k] == rows[1][k] for k in ("acc_orig", "acc", "nfr",
                                                   "rr"))
    print(f"test split in memory: {split_gib:.2f} GiB; streamed / in-memory "
          f"peak: {rows[0]['peak_rss_gib'] / rows[1]['peak_rss_gib']:.2f}; "
          f"results identical: {same}; load {os.getloadavg()}")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"model": FLAGS.model, "n": FLAGS.n,
                       "batch_size": FLAGS.batch_size,
                       "split_gib": split_gib, "identical": same,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
