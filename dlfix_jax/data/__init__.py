"""Datasets: ``load(name, data_dir=None, seed=0) -> Dataset``.

Every loader returns the study's four splits (train / valid / repair / test)
already normalised the way the study does; see each loader's module docstring
for its sources, split sizes and normalisation. ``data_dir`` defaults to
``$DLFIX_DATA_DIR``, then ``../shared/data`` beside the project when present.
"""

from __future__ import annotations

import importlib

from dlfix_jax.data.base import (DATA_DIR_ENV, Dataset, DataError, Split,
                                 default_data_dir, split_indices)

# name -> (module, function). Modules are imported lazily so that a user of
# one loader never pays for another's dependencies (TensorFlow for TFDS).
_LOADERS = {
    "digits": ("dlfix_jax.data.digits", "load"),
    "mnist": ("dlfix_jax.data.idx", "load_mnist"),
    "fashion_mnist": ("dlfix_jax.data.idx", "load_fashion_mnist"),
    "cifar10": ("dlfix_jax.data.cifar", "load_cifar10"),
    "cifar10s": ("dlfix_jax.data.cifar", "load_cifar10s"),
    "utkface": ("dlfix_jax.data.utkface", "load"),
    "imagenet2012": ("dlfix_jax.data.imagenet", "load"),
}


def names() -> list[str]:
    return sorted(_LOADERS)


def load(name: str, data_dir: str | None = None, seed: int = 0, **kwargs):
    """Loads dataset ``name`` with deterministic splits for ``seed``.

    Returns a :class:`Dataset` (in-memory numpy splits), except for
    ``imagenet2012``, which returns a streaming dataset whose splits are
    iterables of numpy batches (see :mod:`dlfix_jax.data.imagenet`).

    Raises:
      KeyError: unknown name (the message lists the known ones).
      DataError: the source is missing or malformed (the message names the
        path, the expected layout and how to get the data).
    """
    if name not in _LOADERS:
        raise KeyError(f"unknown dataset {name!r}; known: {names()}")
    mod, fn = _LOADERS[name]
    loader = getattr(importlib.import_module(mod), fn)
    if data_dir is None and name != "digits":
        data_dir = default_data_dir()
    return loader(data_dir=data_dir, seed=seed, **kwargs)


__all__ = ["load", "names", "Dataset", "Split", "DataError", "DATA_DIR_ENV",
           "default_data_dir", "split_indices"]
