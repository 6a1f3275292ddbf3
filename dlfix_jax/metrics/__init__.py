"""Metrics: ACC, RR, NFR (classification), ASR (pgd), AAOD (fairness), time.

``evaluate.evaluate_models`` computes all of them for an original model and
a stack of S fixed models.
"""

from dlfix_jax.metrics.classification import (accuracy, flips, relative_change,
                                              relative_gain, to_python)
from dlfix_jax.metrics.evaluate import evaluate_models
from dlfix_jax.metrics.fairness import aaod, odds_rates
from dlfix_jax.metrics.pgd import (EPSILONS, asr, attack_stack, epsilon_for,
                                   linf_pgd, select_samples)
from dlfix_jax.metrics.timing import Timer, timed
