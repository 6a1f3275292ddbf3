"""Our L∞ PGD vs foolbox 3's ``LinfPGD`` (JAX backend), same model and inputs.

  python -m benchmarks.pgd [--model=lenet5] [--n=500] [--steps=40]
      [--eps=0.15] [--repeats=2]

Both attack the same model (random weights from a fixed key; the model's
test-free speed does not depend on them) on the same ``n`` inputs with the
random start off, so the adversarial decisions must agree; the script
prints both wall-clock times (first call = with compilation, then best
steady-state call), the speed-up and the fraction of agreeing decisions.
foolbox gets the jitted model function (its best case): its loop over
steps runs in Python with eager eagerpy ops around it.
"""

import time

from absl import app, flags

flags.DEFINE_string("model", "lenet5", "Zoo model.")
flags.DEFINE_integer("n", 500, "Inputs attacked.")
flags.DEFINE_integer("steps", 40, "PGD steps.")
flags.DEFINE_float("eps", 0.15, "L∞ radius.")
flags.DEFINE_integer("repeats", 2, "Steady-state calls (best reported).")
flags.DEFINE_bool("softmax", False, "Attack probabilities.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import foolbox as fb
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dlfix_jax import models
    from dlfix_jax.metrics import pgd

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
          f"steps={FLAGS.steps}, eps={FLAGS.eps}, softmax={FLAGS.softmax}")
    res = {}
    for name, fn in (("ours", run_ours), ("foolbox", run_fb)):
        t0 = time.perf_counter()
        out = fn()
        first = time.perf_counter() - t0
        best = float("inf")
        for _ in range(FLAGS.repeats):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
        res[name] = (out, first, best)
        print(f"{name:8s} first {first:7.2f}s steady {best:7.2f}s "
              f"({FLAGS.n * FLAGS.steps / best:,.0f} input-steps/s) "
              f"ASR {100 * out.mean():.1f}%", flush=True)
    agree = np.mean(res["ours"][0] == res["foolbox"][0])
    print(f"speed-up (steady) {res['foolbox'][2] / res['ours'][2]:.2f}x; "
          f"first call {res['foolbox'][1] / res['ours'][1]:.2f}x; "
          f"decisions agree on {100 * agree:.1f}% of inputs")


if __name__ == "__main__":
    app.run(main)
