"""Our L∞ PGD vs foolbox 3's ``LinfPGD`` (JAX backend), same model and inputs.

  python -m benchmarks.pgd [--model=lenet5] [--n=500] [--steps=40]
      [--eps=0.15] [--repeats=3] [--softmax] [--plain_layers]

Both attack the same model (random weights from a fixed key; the model's
test-free speed does not depend on them) on the same ``n`` inputs with the
random start off, so the adversarial decisions must agree; the script
prints both wall-clock times (first call = with compilation, then the
median of ``--repeats`` steady-state calls, taken in turn: ours, foolbox,
ours, foolbox, ... so that load from other jobs hits both alike), the
median of the per-round speed-ups, the load average, the attack success
rates and the fraction of agreeing decisions.
foolbox gets the jitted model function (its best case; the same layers
as ours, the XLA:CPU layer paths included unless ``--plain_layers``): its
loop over steps runs in Python with eager eagerpy ops around it.
"""

import time

from absl import app, flags

flags.DEFINE_string("model", "lenet5", "Zoo model.")
flags.DEFINE_integer("n", 500, "Inputs attacked.")
flags.DEFINE_integer("steps", 40, "PGD steps.")
flags.DEFINE_float("eps", 0.15, "L∞ radius.")
flags.DEFINE_integer("repeats", 3, "Interleaved steady-state calls "
                     "(medians reported).")
flags.DEFINE_bool("softmax", False, "Attack probabilities.")
flags.DEFINE_bool("plain_layers", False, "Switch off the XLA:CPU layer "
                  "paths of dlfix_jax.models.layers (one-channel conv, "
                  "tiled max pool) for both attacks, to measure them.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import foolbox as fb
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dlfix_jax import models
    from dlfix_jax.metrics import pgd

    if FLAGS.plain_layers:
        from dlfix_jax.models import layers
        layers.on_cpu = lambda: False
    m = models.get(FLAGS.model)
    v = m.init(jax.random.key(0))
    x = np.asarray(jax.random.uniform(jax.random.key(1),
                                      (FLAGS.n,) + tuple(m.input_shape)))
    y = np.asarray(m.predict(v, x))
    bounds = (float(x.min()), float(x.max()))

    @jax.jit
    def f(a):
        z = m.apply(v, a)
        return jax.nn.softmax(z) if FLAGS.softmax else z

    attack = fb.attacks.LinfPGD(random_start=False, steps=FLAGS.steps,
                                rel_stepsize=pgd.REL_STEPSIZE)
    fmodel = fb.JAXModel(f, bounds=bounds)

    def run_fb():
        _, xc, s = attack(fmodel, jnp.asarray(x), jnp.asarray(y),
                          epsilons=FLAGS.eps)
        return np.asarray(s)

    def run_ours():
        return pgd.linf_pgd(m, v, x, y, eps=FLAGS.eps, bounds=bounds,
                            steps=FLAGS.steps, softmax=FLAGS.softmax,
                            batch_size=FLAGS.n)[0]

    print(f"backend {jax.default_backend()}; {FLAGS.model}, n={FLAGS.n}, "
          f"steps={FLAGS.steps}, eps={FLAGS.eps}, softmax={FLAGS.softmax}, "
          f"plain_layers={FLAGS.plain_layers}")
    import os
    fns = {"ours": run_ours, "foolbox": run_fb}
    out, first, times = {}, {}, {k: [] for k in fns}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        out[name] = fn()
        first[name] = time.perf_counter() - t0
    loads = [os.getloadavg()[0]]
    for _ in range(FLAGS.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t0)
            loads.append(os.getloadavg()[0])
    for name in fns:
        med = float(np.median(times[name]))
        print(f"{name:8s} first {first[name]:7.2f}s steady (median) "
              f"{med:7.2f}s ({FLAGS.n * FLAGS.steps / med:,.0f} "
              f"input-steps/s) ASR {100 * out[name].mean():.1f}%", flush=True)
    ratio = float(np.median(np.asarray(times["foolbox"])
                            / np.asarray(times["ours"])))
    agree = np.mean(out["ours"] == out["foolbox"])
    print(f"speed-up (median of per-round foolbox/ours) {ratio:.2f}x; "
          f"first call {first['foolbox'] / first['ours']:.2f}x; "
          f"decisions agree on {100 * agree:.1f}% of inputs; "
          f"load average {min(loads):.1f}-{max(loads):.1f}")


if __name__ == "__main__":
    app.run(main)
