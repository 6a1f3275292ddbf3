"""Metrics: ACC, RR, NFR (classification), ASR (pgd), AAOD (fairness), time."""

from dlfix_jax.metrics.classification import (accuracy, flips, relative_change,
                                              relative_gain, to_python)
