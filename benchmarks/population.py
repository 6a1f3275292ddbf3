"""Search populations: scoring strategies of the strategy layer.

  python -m benchmarks.population [--cases=logits,hidden] [--population=100]
      [--generations=20] [--n_pos=4946] [--n_neg=54] [--k=5] [--rounds=3]
      [--strategies=vmap,lax_map] [--out=FILE.json]

Runs DE (:func:`dlfix_jax.search.de`, jitted, no early stop) for
``--generations`` generations on an Arachne-style fitness (``N_correct +
sum 1/(CE+1)`` on a positive and a negative set, ``_fitness.correct_score``)
over ``--k`` weights of one Dense layer of a random LeNet5, with the layer's
inputs cached (``_fitness.cache_layer``): case ``logits`` searches the last
Dense layer (Arachne's default: a candidate is one matmul), case ``hidden``
the one before it (the rest of the network runs per candidate, as CARE /
NeuRecover / Arachne's multi-layer search do). The population is scored
under each :mod:`dlfix_jax.seed_axis` strategy (task ``"population_head"``
for case ``logits``, ``"population"`` for ``hidden``:
:func:`~dlfix_jax.seed_axis.population_strategy`);
after one compiling call per strategy, ``--rounds`` rounds interleave the
strategies (A, B, A, B, ...) and the best round is reported as fitness
evaluations per second, with the ratio to ``vmap``. Results of the
strategies are compared (bit-identical or not). Prints the load average.
"""

import json
import os

from absl import app, flags

flags.DEFINE_list("cases", ["logits", "hidden"], "Which layer is searched.")
flags.DEFINE_integer("population", 100, "Population size P.")
flags.DEFINE_integer("generations", 20, "DE generations.")
flags.DEFINE_integer("n_pos", 4946, "Positive (passing) inputs.")
flags.DEFINE_integer("n_neg", 54, "Negative (failing) inputs.")
flags.DEFINE_integer("k", 5, "Searched weights.")
flags.DEFINE_integer("rounds", 3, "Interleaved timed rounds (best counts).")
flags.DEFINE_list("strategies", ["vmap", "lax_map"], "seed_axis strategies.")
flags.DEFINE_string("out", None, "Write the measurements as JSON here.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax

    from benchmarks._population import measure
    from dlfix_jax import seed_axis
    rows = measure(FLAGS.cases, FLAGS.population, FLAGS.generations,
                   FLAGS.n_pos, FLAGS.n_neg, FLAGS.k, FLAGS.rounds,
                   FLAGS.strategies)
    autos = {case: seed_axis.population_strategy(case == "logits")
             for case in FLAGS.cases}
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"backend": jax.default_backend(), "auto": autos,
                       "load": os.getloadavg(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
