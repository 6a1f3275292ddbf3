"""Dataset containers shared by every loader.

A :class:`Dataset` holds four :class:`Split` s — ``train`` (base-model and
model-level fixer training), ``valid`` (model selection), ``repair`` (what a
fixer may look at; its misclassified part is the failing inputs) and ``test``
(metrics only) — as normalised float32 NHWC arrays with int32 labels, and an
int32 ``group`` array (0/1) where the dataset has a sensitive attribute.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

DATA_DIR_ENV = "DLFIX_DATA_DIR"


@dataclasses.dataclass(frozen=True)
class Split:
    """One split: inputs ``x`` (N, H, W, C) float32, labels ``y`` (N,) int32,
    and ``group`` (N,) int32 in {0, 1} or None."""

    x: np.ndarray
    y: np.ndarray
    group: np.ndarray | None = None

    def __post_init__(self):
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} rows but y has {len(self.y)}")
        if self.group is not None and len(self.group) != len(self.y):
            raise ValueError("group and y lengths differ")

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx) -> "Split":
        g = None if self.group is None else self.group[idx]
        return Split(self.x[idx], self.y[idx], g)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset with the study's four splits.

    Attributes:
      name: loader name ("mnist", "digits", ...).
      train, valid, repair, test: the splits.
      num_classes: number of classes.
      class_names: one name per class.
      group_names: names of groups 0 and 1 (e.g. ("white", "non-white")), or
        None when the dataset has no sensitive attribute.
      normalization: how raw pixels became ``x``, e.g. "x/255" or
        "(x/255 - mean) / std, mean=[...], std=[...]".
      mean, std: per-channel constants of that normalisation (for
        de-normalising and for attack bounds), as float32 arrays.
      seed: the split seed.
      source: where the data was read from (a path or "tfds:<name>").
    """

    name: str
    train: Split
    valid: Split
    repair: Split
    test: Split
    num_classes: int
    class_names: tuple[str, ...] = ()
    group_names: tuple[str, str] | None = None
    normalization: str = ""
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    seed: int = 0
    source: str = ""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])

    @property
    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "valid": self.valid,
                "repair": self.repair, "test": self.test}

    def summary(self) -> str:
        sizes = " / ".join(f"{k} {len(v):,}" for k, v in self.splits.items())
        return (f"{self.name}: {sizes}; {self.num_classes} classes; input "
                f"{self.input_shape}; source {self.source}")


class DataError(Exception):
    """A data source is missing or malformed. The message names the path,
    the expected layout and how to get the data."""


def default_data_dir() -> str | None:
    """``$DLFIX_DATA_DIR``, else ``../shared/data`` beside the project when it
    exists, else None."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    cand = os.path.normpath(os.path.join(here, "..", "..", "..", "shared", "data"))
    return cand if os.path.isdir(cand) else None


def split_indices(n: int, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Deterministic disjoint index sets of the given sizes from a permutation
    of ``range(n)`` drawn with ``np.random.default_rng(seed)``."""
    if sum(sizes) > n:
        raise ValueError(f"split sizes {list(sizes)} need {sum(sizes)} "
                         f"examples but only {n} are available")
    perm = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for s in sizes:
        out.append(np.sort(perm[start:start + s]))
        start += s
    return out
