"""Multi-process studies: starting JAX's distributed runtime, splitting the
work, and waiting for the other processes.

A study can run as N processes (hosts of a TPU pod, one process per GPU, or
several local CPU processes) that share one workdir on a shared file system
(NFS, a Filestore / Lustre mount, ...). :mod:`dlfix_jax.study.runner` does,
when ``jax.process_count() > 1``:

1. **Setup (process 0).** Takes the store's writer lock (held for the whole
   run), merges shards left by an earlier, killed run into
   ``results.jsonl`` (:meth:`dlfix_jax.study.store.Store.merge_shards`) and
   writes ``config.json`` (once); the other processes wait for it.
2. **Plan (every process, the same).** Every process reads the merged
   ``results.jsonl`` and lists the *units* that need computing: a unit is
   one (dataset/model pair, approach), with all its seeds (the runner fixes
   the seeds of an approach in one, possibly vmapped, call and evaluates
   them on one shared PGD sample, and the approach's post-processing
   ensembles combine the original with each of its own fixed models, so a
   unit needs nothing from any other unit). The units in grid order (pairs
   sorted by name, approaches in config order) that miss a record are dealt
   round-robin: the i-th goes to process ``i % N`` (:func:`assign`).
   Process 0 publishes a hash of the plan; a process whose plan differs (a
   different config, code or fixer registry) stops with an error.
3. **Base models.** The pairs whose base model the study trains are dealt
   round-robin the same way; each process trains (or loads) its own, then
   all wait; afterwards every process only *loads* base models.
4. **Fixing.** Each process appends its units' records to its own shard
   ``results.p<k>.jsonl`` (its own writer lock), one write per unit.
5. **Merge (process 0).** After all processes finished, process 0 merges
   every shard into ``results.jsonl`` (atomically, newest record per key)
   and deletes the shards; every process then returns the merged records.

A killed process (or job) leaves complete units in the shards; the rerun
merges them first and plans from the merged store, so nothing is lost and
nothing is computed twice; the process count may change between runs.
The report (``dlfix report``) reads ``results.jsonl`` and any shards.

Waiting uses the key-value store of JAX's coordination service (no
collective, so nothing device-specific: it works the same on CPU, GPU and
TPU): each process posts ``<run>/<phase>/<k>`` and polls the phase's
directory until all N posted, or any process posted an error. A process that
raises posts its error, so the others stop with it instead of waiting. A
process that dies is detected by the coordination service's heartbeat
(``jax.distributed.initialize``'s ``heartbeat_timeout_seconds``, 100 s),
which terminates the others.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import time
from typing import Any, Sequence, TypeVar

import jax

T = TypeVar("T")
MODES = ("auto", "on", "off")
POLL_S = 0.2
_RUNS = itertools.count()


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Starts JAX's distributed runtime when asked; returns whether it runs.

    ``mode``: ``"off"`` never starts it; ``"on"`` always calls
    ``jax.distributed.initialize`` with the given arguments (JAX detects
    the missing ones on Cloud TPU pods, SLURM, Open MPI and Kubernetes);
    ``"auto"`` (default) calls it only when an argument is given or
    ``JAX_COORDINATOR_ADDRESS`` is set (a plain run stays one process).
    Must run before any JAX computation. A second call is a no-op.

    Raises:
      ValueError: a bad mode, or arguments with ``mode="off"``.
      RuntimeError: JAX's backend already started (a JAX computation ran
        before the call).
    """
    if mode not in MODES:
        raise ValueError(f"distributed mode must be one of {MODES}, got "
                         f"{mode!r}")
    given = {k: v for k, v in (("coordinator_address", coordinator_address),
                               ("num_processes", num_processes),
                               ("process_id", process_id)) if v is not None}
    if mode == "off":
        if given:
            raise ValueError(f"--distributed=off but {sorted(given)} given")
        return False
    if jax.distributed.is_initialized():
        return True
    if mode == "auto" and not given and not os.environ.get(
            "JAX_COORDINATOR_ADDRESS"):
        return False
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not (
            0 <= process_id < num_processes):
        raise ValueError(f"process_id must be in [0, {num_processes}), got "
                         f"{process_id}")
    jax.distributed.initialize(**given)
    return True


def initialize_from_argv(argv: Sequence[str]) -> bool:
    """:func:`initialize` with the ``--distributed``,
    ``--coordinator_address``, ``--num_processes`` and ``--process_id``
    values found in ``argv`` (``--name=value`` or ``--name value``).

    ``dlfix study`` calls this when its module is imported, before absl
    parses the flags: parsing ``--config`` runs the config file, which
    imports the fixers, and JAX must be initialised before any JAX call.
    The absl flags of the same names are then only checked and listed by
    ``--help``.
    """
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--distributed", default="auto")
    p.add_argument("--coordinator_address", default=None)
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)
    try:
        parsed, _ = p.parse_known_args(list(argv)[1:])
    except SystemExit:  # a malformed value: absl reports it
        return False
    if any(a in ("-h", "--help", "--helpfull", "--helpshort")
           for a in argv[1:]):
        return False
    return initialize(parsed.distributed, parsed.coordinator_address,
                      parsed.num_processes, parsed.process_id)


def assign(units: Sequence[T], num_processes: int) -> list[list[T]]:
    """Round-robin: unit ``i`` (in the given order) goes to process
    ``i % num_processes``; returns each process's units in order."""
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    out: list[list[T]] = [[] for _ in range(num_processes)]
    for i, u in enumerate(units):
        out[i % num_processes].append(u)
    return out


def plan_hash(obj: Any) -> str:
    """A short hash of a JSON-able plan (to compare plans across processes)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _client():
    """The coordination service's key-value client of JAX's distributed
    runtime. JAX has no public handle to it (``jax.distributed`` exposes
    only initialize / is_initialized / shutdown, and
    ``multihost_utils.sync_global_devices`` is a collective: it would hang,
    not fail, when another process raised), so this reads the private
    ``jax._src.distributed.global_state.client``, checked here once, with a
    clear error if a JAX upgrade moved it (tested with the pinned jax in
    requirements.txt)."""
    try:
        from jax._src import distributed as _dist
        client = _dist.global_state.client
    except (ImportError, AttributeError) as e:
        raise RuntimeError(
            f"jax {jax.__version__} does not expose the distributed "
            "runtime's key-value client where dlfix_jax reads it "
            "(jax._src.distributed.global_state.client); multi-process "
            "studies need the jax of requirements.txt") from e
    for method in ("key_value_set", "key_value_dir_get",
                   "key_value_try_get"):
        if client is not None and not hasattr(client, method):
            raise RuntimeError(
                f"jax {jax.__version__}'s distributed client lacks "
                f"{method}; multi-process studies need the jax of "
                "requirements.txt")
    return client


class Coordinator:
    """Barriers and messages between the processes of one study run, over
    the coordination service's key-value store. ``tag`` names the run
    (every process calls :func:`coordinator` once per ``run_study``, so the
    n-th call of every process gets the same tag)."""

    def __init__(self, index: int, count: int, tag: str, client):
        self.index, self.count, self.tag, self.client = index, count, tag, \
            client

    def __repr__(self) -> str:
        return f"process {self.index}/{self.count}"

    def _key(self, *parts) -> str:
        return "/".join([self.tag, *map(str, parts)])

    def _errors(self) -> list[str]:
        return [v for _, v in self.client.key_value_dir_get(
            self._key("error") + "/")]

    def _raise_if_failed(self) -> None:
        errs = self._errors()
        if errs:
            raise RuntimeError("another process of the study failed: "
                               + "; ".join(sorted(errs)))

    def fail(self, message: str) -> None:
        """Tells the other processes that this one failed (they raise)."""
        try:
            self.client.key_value_set(
                self._key("error", self.index),
                f"process {self.index}: {' '.join(str(message).split())}"
                [:2000])
        except Exception:  # noqa: BLE001 - the runtime may be gone already
            pass

    def barrier(self, phase: str) -> None:
        """Waits until every process reached ``phase`` (or one failed)."""
        self.client.key_value_set(self._key(phase, self.index), "ok")
        prefix = self._key(phase) + "/"
        while True:
            self._raise_if_failed()
            if len(self.client.key_value_dir_get(prefix)) >= self.count:
                return
            time.sleep(POLL_S)

    def publish(self, name: str, value: str) -> None:
        """Posts ``value`` under ``name`` (read with :meth:`receive`)."""
        self.client.key_value_set(self._key("msg", name), value)

    def receive(self, name: str) -> str:
        """Waits for the value posted under ``name`` (or a failure)."""
        key = self._key("msg", name)
        while True:
            self._raise_if_failed()
            try:
                value = self.client.key_value_try_get(key)
            except Exception:  # noqa: BLE001 - NOT_FOUND: not posted yet
                value = None
            if value is not None:
                return value
            time.sleep(POLL_S)


def coordinator() -> Coordinator | None:
    """The current run's :class:`Coordinator`, or None on one process."""
    n = jax.process_count()
    if n == 1:
        return None
    client = _client()
    if client is None:
        raise RuntimeError(
            f"jax.process_count() is {n} but JAX's distributed runtime "
            "has no client; start it with jax.distributed.initialize "
            "(dlfix study --distributed=on)")
    return Coordinator(jax.process_index(), n, f"dlfix_study/{next(_RUNS)}",
                       client)
