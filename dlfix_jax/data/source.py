"""Data as fixers and training loops see it: samplers over a split.

A :class:`Source` wraps one split and hands out batches; it hides whether
the split is an in-memory :class:`~dlfix_jax.data.base.Split` (numpy on the
host) or a stream of batches (ImageNet, :mod:`dlfix_jax.data.imagenet`).
Training loops draw from it batch by batch, so model-level fixers never copy
a whole training split to the device.

* :meth:`Source.epochs` / :meth:`Source.take_steps` — shuffled batches of a
  fixed size for training. An epoch is one permutation of the split (drawn
  with ``fold_in(key, epoch)``) cut into batches; the last partial batch is
  filled up with the first examples of the same permutation, so every
  batch has the same shape (one compile) and every example is seen at
  least once per epoch (:func:`epoch_indices`).
* :meth:`Source.ordered` — the split in order, in batches (evaluation).
* :meth:`Source.split` — the whole split in host memory; streamed sources
  raise :class:`NotInMemory` (a fixer that needs the whole training set
  refuses streamed data through its ``applicable``).
* :meth:`Source.device` — the whole split on the device as :class:`Data`
  (cached; small splits: validation, repair).

:class:`Data` is a device-side split (a pytree) for arrays that fixers keep
on the device: the repair, failing and passing inputs.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dlfix_jax.data import base


class NotInMemory(Exception):
    """A streamed split was asked for as a whole array."""


@struct.dataclass
class Data:
    """Device-side split: x, y and optional group."""

    x: jax.Array
    y: jax.Array
    group: jax.Array | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @classmethod
    def from_split(cls, split) -> "Data":
        g = None if split.group is None else jnp.asarray(split.group)
        return cls(jnp.asarray(split.x), jnp.asarray(split.y, jnp.int32), g)

    def take(self, idx) -> "Data":
        g = None if self.group is None else self.group[idx]
        return Data(self.x[idx], self.y[idx], g)


def _check_batch_size(batch_size) -> None:
    """batch_size must be an integer >= 1 (0 used to divide by zero, and
    ``_rebatch`` spun forever on it)."""
    try:
        ok = not isinstance(batch_size, bool) and operator.index(
            batch_size) >= 1
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def epoch_indices(key: jax.Array, n: int, batch_size: int) -> np.ndarray:
    """(steps, batch_size) example indices of one epoch (module docstring)."""
    if n <= 0:
        raise ValueError("cannot draw batches from an empty split")
    _check_batch_size(batch_size)
    perm = np.asarray(jax.random.permutation(key, n))
    steps = math.ceil(n / batch_size)
    pad = steps * batch_size - n
    if pad:
        perm = np.concatenate([perm, np.resize(perm, pad)])
    return perm.reshape(steps, batch_size)


@dataclasses.dataclass(eq=False)
class Source:
    """A sampler over one split (in memory or streamed).

    Compared and hashed by identity, so it can sit in a static field of a
    pytree (:class:`~dlfix_jax.fixers.base.Problem`).

    Attributes:
      data: a :class:`~dlfix_jax.data.base.Split` (in memory) or an
        iterable of ``Split`` batches with a ``__len__`` (streamed).
      name: the split's name ("train", ...), for messages.
    """

    data: object
    name: str = ""
    _device: Data | None = dataclasses.field(default=None, repr=False)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.data, base.Split)

    def __len__(self) -> int:
        return len(self.data)

    @property
    def has_groups(self) -> bool:
        return self.in_memory and self.data.group is not None

    def split(self) -> base.Split:
        """The whole split in host memory (in-memory sources only)."""
        if not self.in_memory:
            raise NotInMemory(
                f"the {self.name or 'given'} split is streamed; this needs "
                "the whole split in memory")
        return self.data

    def device(self) -> Data:
        """The whole split on the device (cached)."""
        if self._device is None:
            self._device = Data.from_split(self.split())
        return self._device

    def subset(self, indices) -> "Source":
        """An in-memory source of the given rows."""
        return Source(self.split().take(np.asarray(indices)), self.name)

    # -- iteration -----------------------------------------------------------
    def ordered(self, batch_size: int) -> Iterator[base.Split]:
        """The split in order, in batches of ``batch_size`` (last partial)."""
        _check_batch_size(batch_size)
        if self.in_memory:
            s = self.data
            for i in range(0, len(s), batch_size):
                yield s.take(slice(i, i + batch_size))
        else:
            yield from _rebatch(iter(self.data), batch_size)

    def epoch(self, key: jax.Array, batch_size: int) -> Iterator[tuple]:
        """One shuffled epoch of ``(x, y)`` numpy batches of exactly
        ``batch_size`` rows (see :func:`epoch_indices`). A streamed source
        yields its stream in its own order (the key is unused: the stream
        was shuffled with the dataset seed), rebatched and the last batch
        filled up from the first."""
        if self.in_memory:
            s = self.data
            y = np.asarray(s.y, np.int32)
            for idx in epoch_indices(key, len(s), batch_size):
                yield np.asarray(s.x[idx], np.float32), y[idx]
            return
        first = None
        for b in _rebatch(iter(self.data), batch_size):
            if first is None:
                first = b
            if len(b) < batch_size:
                need = batch_size - len(b)
                b = base.Split(np.concatenate([b.x, np.resize(
                    first.x, (need,) + first.x.shape[1:])]),
                    np.concatenate([b.y, np.resize(first.y, need)]))
            yield np.asarray(b.x, np.float32), np.asarray(b.y, np.int32)

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)

    def take_steps(self, key: jax.Array, batch_size: int, steps: int,
                   start_epoch: int = 0) -> Iterator[tuple]:
        """``steps`` shuffled batches over consecutive epochs; epoch ``e``
        uses ``fold_in(key, e)`` (``e`` from ``start_epoch``). Every epoch
        yields at least one batch (else ValueError), so this terminates."""
        done, e = 0, start_epoch
        while done < steps:
            before = done
            for b in self.epoch(jax.random.fold_in(key, e), batch_size):
                if done >= steps:
                    return
                yield b
                done += 1
            if done == before:
                raise ValueError(f"the {self.name or 'given'} split yielded "
                                 f"no batch in an epoch (empty stream?)")
            e += 1


def _rebatch(batches: Iterator[base.Split], size: int
             ) -> Iterator[base.Split]:
    """Re-cuts a stream of batches into batches of ``size`` rows."""
    _check_batch_size(size)
    buf_x, buf_y, n = [], [], 0
    for b in batches:
        buf_x.append(np.asarray(b.x))
        buf_y.append(np.asarray(b.y))
        n += len(b)
        while n >= size:
            x, y = np.concatenate(buf_x), np.concatenate(buf_y)
            yield base.Split(x[:size], y[:size])
            buf_x, buf_y, n = [x[size:]], [y[size:]], n - size
    if n:
        yield base.Split(np.concatenate(buf_x), np.concatenate(buf_y))


def as_source(split, name: str = "") -> Source:
    """A :class:`Source` of a Split, a streamed split or a Source."""
    if isinstance(split, Source):
        return split
    return Source(split, name)
