"""Apricot's reduced models end to end: this checkout vs an earlier one.

  git worktree add /tmp/dlfix_ad3de2b ad3de2b     # issue 13's baseline
  python -m benchmarks.apricot_vs_checkout --baseline=/tmp/dlfix_ad3de2b
      [--k=20] [--per_class=100] [--epochs=3] [--rounds=2]

Times ``dlfix_jax.fixers.apricot.train_rdlms`` (K LeNet5s from random
initialisations, ``--per_class`` random MNIST-shaped images per class each,
``--epochs`` epochs, Adam, batch 128) as each checkout implements it:
at ad3de2b one jitted ``lax.scan`` per epoch over a ``vmap``-ed step, now
through the strategy layer (CPU ``auto``: one model after another). Each
measurement runs in a fresh process with the checkout's directory first
on ``sys.path`` (the process prints which ``dlfix_jax`` it imported); a
warm-up call of one epoch compiles first. The two checkouts alternate for
``--rounds`` rounds; the table gives training examples per second summed
over the K models (each checkout counts the steps it ran: ad3de2b drops
the last partial batch of an epoch, the current code does not) and the
per-round ratio.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

flags.DEFINE_string("baseline", None, "Directory of the earlier checkout "
                    "(a git worktree), e.g. of ad3de2b.")
flags.DEFINE_integer("k", 20, "Reduced models K.")
flags.DEFINE_integer("per_class", 100, "Images per class per model.")
flags.DEFINE_integer("epochs", 3, "Timed epochs.")
flags.DEFINE_integer("rounds", 2, "Alternating rounds.")
flags.DEFINE_string("single", None, "Internal: measure the checkout in "
                    "this directory in this process and print JSON.")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check_checkout(path, flag) -> str:
    if not os.path.isfile(os.path.join(path, "dlfix_jax", "fixers",
                                       "apricot.py")):
        raise app.UsageError(f"{flag}={path}: no dlfix_jax/fixers/apricot.py "
                             "there (give a checkout's root directory)")
    return os.path.abspath(path)


def measure(code: str) -> dict:
    """Examples/s of ``train_rdlms`` as the checkout at ``code`` has it."""
    sys.path.insert(0, code)
    import jax
    import jax.numpy as jnp
    import numpy as np

    import dlfix_jax
    from dlfix_jax import models
    from dlfix_jax.fixers import apricot, base

    rng = np.random.default_rng(0)
    n = 10 * FLAGS.per_class
    x = rng.random((n, 28, 28, 1), dtype=np.float32)
    y = np.repeat(np.arange(10), FLAGS.per_class).astype(np.int32)
    try:
        from dlfix_jax.data.base import Split
        from dlfix_jax.data.source import Source
        train = Source(Split(x, y), "train")
    except ImportError:  # ad3de2b: a device-side Data
        train = base.Data(jnp.asarray(x), jnp.asarray(y))

    def config(epochs):
        c = apricot.default_config()
        c.num_rdlms, c.rdlm_per_class, c.rdlm_epochs = (
            FLAGS.k, FLAGS.per_class, epochs)
        if "rdlm_init" in c:  # later checkouts: as ad3de2b, from scratch
            c.rdlm_init = "scratch"
        return c

    m = models.get("lenet5")
    jax.block_until_ready(apricot.train_rdlms(jax.random.key(0), m, train,
                                              10, config(1))[0])
    t = time.perf_counter()
    variables, subsets = apricot.train_rdlms(jax.random.key(1), m, train, 10,
                                             config(FLAGS.epochs))
    jax.block_until_ready(variables)
    seconds = time.perf_counter() - t
    n_sub = int(subsets.shape[1])
    bs = min(128, n_sub)
    # ad3de2b ran n_sub // bs steps an epoch; the strategy-layer code
    # (fit_rdlms) ceil(n_sub / bs), its last batch wrapping around.
    per_epoch = (-(-n_sub // bs) if hasattr(apricot, "fit_rdlms")
                 else n_sub // bs)
    steps = FLAGS.epochs * per_epoch
    return {"dlfix_jax": dlfix_jax.__file__, "seconds": seconds,
            "steps_per_model": steps, "batch": bs,
            "examples_per_s": FLAGS.k * steps * bs / seconds}


def main(argv):
    del argv
    if min(FLAGS.k, FLAGS.per_class, FLAGS.epochs, FLAGS.rounds) < 1:
        raise app.UsageError("--k, --per_class, --epochs and --rounds must "
                             "be positive")
    if FLAGS.single:
        print(json.dumps({"result": measure(
            _check_checkout(FLAGS.single, "--single"))}), flush=True)
        return
    if not FLAGS.baseline:
        raise app.UsageError("--baseline is required (an earlier checkout's "
                             "directory)")
    checkouts = {"baseline": _check_checkout(FLAGS.baseline, "--baseline"),
                 "current": ROOT}
    from benchmarks._subprocess import run_single
    rows = []
    for r in range(FLAGS.rounds):
        row = {}
        for name, path in checkouts.items():
            row[name] = run_single("benchmarks.apricot_vs_checkout", [
                f"--single={path}", f"--k={FLAGS.k}",
                f"--per_class={FLAGS.per_class}",
                f"--epochs={FLAGS.epochs}"], "result")
            print(f"round {r + 1} {name}: "
                  f"{row[name]['examples_per_s']:,.0f} ex/s "
                  f"({row[name]['dlfix_jax']})", flush=True)
        rows.append(row)
    print("\n| round | baseline ex/s | current ex/s | current / baseline |")
    print("|---|---:|---:|---:|")
    for r, row in enumerate(rows, 1):
        b, c = (row[n]["examples_per_s"] for n in ("baseline", "current"))
        print(f"| {r} | {b:,.0f} | {c:,.0f} | {c / b:.2f}x |")
    print(f"load average (1 min): {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    app.run(main)
