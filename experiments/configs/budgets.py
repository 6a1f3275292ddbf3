"""Per-fixer budget overrides of the studies (size knobs only).

:func:`digits` is what ``make study`` runs (``study_digits.py``): every
fixer's *algorithm* unchanged, only its size knobs reduced so that the whole
study (every registered fixer x 3 seeds, evaluation and report) stays within
10 minutes on 2 CPU cores. Each entry names documented keys of the fixer's
default config; a fixer without an entry runs at its defaults (the paper's
budget). Why each number was chosen is in the comment beside it.
"""


def digits() -> dict:
    """Fixer name -> overrides for the digits study."""
    return {
        # K = 5 reduced models (paper 20), 10 epochs each (paper 60) on
        # <= 1,000 images per class (digits has ~120), at most 3 passes over
        # the failing inputs, 0.25 epoch of retraining per batch, patience 10.
        "apricot": dict(num_rdlms=5, rdlm_epochs=10, max_passes=3,
                        retrain_epochs=0.25, patience=10),
        # Population 100 as in the paper, at most 30 generations (paper 100).
        "arachne": dict(max_generations=30),
        # RA runs at its defaults (one small LP on 200 repair images).
        # <- new fixers' digits budgets go above this line
    }
