"""Named PRNG streams: every random draw of the library starts here.

One root key per config (``root(config.seed)``); each consumer folds in its
own fixed stream id (``stream(root, ID)``), so adding a consumer never shifts
another one's numbers; loops fold in their step or generation number.

Two roots exist and their ids are separate name spaces:

* a **training** config's root (base-model training, ``training/train.py``):
  :data:`INIT`, :data:`SHUFFLE`, :data:`DROPOUT`;
* a **study** config's root (fixing and evaluation, ``study/``):
  :data:`FIX` (fixer seed ``s`` gets ``fold_in(stream(root, FIX), s)``),
  :data:`EVAL` (ASR samples and starts), :data:`ENSEMBLE` (post-processing).

Inside a fixer the key it receives is split or folded with the ids below,
named by purpose rather than as magic numbers.
"""

from __future__ import annotations

import jax

# Training streams (root = key(training config seed)).
INIT, SHUFFLE, DROPOUT = 0, 1, 2
# Study streams (root = key(study config seed)).
FIX, EVAL, ENSEMBLE = 1, 2, 3
# Sub-streams of a key used inside training loops (training/loop.py).
LOOP_ORDER, LOOP_DROPOUT = 0, 1


def root(seed: int) -> jax.Array:
    """The root key of a config seed (a typed key)."""
    return jax.random.key(int(seed))


def stream(key: jax.Array, stream_id: int) -> jax.Array:
    """``fold_in(key, stream_id)``: the key of one named stream."""
    return jax.random.fold_in(key, int(stream_id))


def seed_key(study_root: jax.Array, seed: int) -> jax.Array:
    """Fixer seed ``seed``'s key: ``fold_in(fold_in(root, FIX), seed)``.

    Folded per seed rather than ``split(..., S)``, so a seed's key does not
    depend on how many seeds there are: raising ``num_seeds`` keeps the
    finished seeds valid.
    """
    return jax.random.fold_in(stream(study_root, FIX), int(seed))


def seed_keys(seed: int, num_seeds: int) -> list[jax.Array]:
    """Keys of fixer seeds ``0..num_seeds-1`` of a study config seed."""
    r = root(seed)
    return [seed_key(r, s) for s in range(int(num_seeds))]
