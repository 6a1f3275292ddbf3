"""Multi-layer search fitness: the low-rank form vs re-running the matmul.

  python -m benchmarks.tail_fitness [--model=PATH.h5] [--n=5000]
      [--population=100] [--k1_fractions=0.02,0.2,0.4,0.6,1.0] [--k2=5]
      [--rounds=3] [--out=FILE.json]

NeuRecover and Arachne's ``localisation="all"`` score candidates over
kernel entries of several Dense layers with
:func:`dlfix_jax.fixers._fitness.tail_logits`. Its two forms give the same
logits up to rounding: **low rank** (the earliest layer's cached output plus
``h[:, rows] @ ((v - w0) onehot(cols))``, then the rest of the model) and
**full** (that layer's matmul re-run with the genes written in).
:func:`~dlfix_jax.fixers._fitness.tail_setup` picks one by the rule of
``_fitness.LOW_RANK_MAX_FRACTION``. This measures both, for ``k1`` genes in
the first Dense layer (``k1 = fraction x`` its input width ``d``) plus
``--k2`` in the second, on ``--n`` random inputs. The population is scored
under the strategy the fixers use (``seed_axis.population_strategy(False)``).
After one compiling call each, ``--rounds`` rounds alternate the forms
(A, B, A, B, ...); the best round counts. The ratio is low rank / full
(below 1: low rank is faster), with the rule's choice beside it.

The model is ``--model``, else the study's MNIST LeNet5
(``fixingstudy/mnist_lenet5_original.h5`` under the data directory: d =
144), else the zoo LeNet5 (the same shapes). The weights and inputs only
set shapes here.
"""

import json
import os

from absl import app, flags

flags.DEFINE_string("model", None, "Keras .h5 model (default: see above).")
flags.DEFINE_integer("n", 5000, "Inputs scored per candidate.")
flags.DEFINE_integer("population", 100, "Candidates per call.")
flags.DEFINE_list("k1_fractions", ["0.02", "0.2", "0.4", "0.6", "1.0"],
                  "Genes in the first Dense layer, as fractions of its "
                  "input width.")
flags.DEFINE_integer("k2", 5, "Genes in the second Dense layer.")
flags.DEFINE_integer("rounds", 3, "Alternating timed rounds (best counts).")
flags.DEFINE_string("out", None, "Write the measurements as JSON here.")
FLAGS = flags.FLAGS


def _model():
    import jax

    from dlfix_jax import data as data_lib
    from dlfix_jax import models
    from dlfix_jax.models import keras_h5
    path = FLAGS.model
    if path is None:
        root = data_lib.default_data_dir()
        cand = os.path.join(root or "", "fixingstudy",
                            "mnist_lenet5_original.h5")
        path = cand if root and os.path.exists(cand) else None
    if path:
        m, v = keras_h5.load(path)
        return path, m, v
    m = models.get("lenet5")
    return "zoo:lenet5", m, m.init(jax.random.key(0))


def main(argv):
    del argv
    import jax

    from benchmarks._tail_fitness import measure
    try:
        source, model, variables = _model()
        rows = measure(model, variables, n=FLAGS.n,
                       population=FLAGS.population,
                       fractions=[float(f) for f in FLAGS.k1_fractions],
                       k2=FLAGS.k2, rounds=FLAGS.rounds, label=source)
    except (ValueError, OSError) as e:
        raise SystemExit(f"tail_fitness: {e}")
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)),
                    exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump({"model": source, "backend": jax.default_backend(),
                       "load": os.getloadavg(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
