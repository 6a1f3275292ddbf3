"""Append-only JSONL results store: ``DIR/results.jsonl``.

One record per study cell, keyed ``"dataset/model/approach/seed"``. The file
is the only state of a study, so it must survive a crash or a ``kill -9`` at
any instant:

* **Atomic appends.** Each call to :meth:`Store.append` (or
  :meth:`Store.append_many`) serialises its record(s) to complete lines and
  writes them with a single ``os.write`` on an ``O_APPEND`` file descriptor,
  then ``fsync``\\ s. A killed process leaves either the whole write or, at
  worst (power loss, a full disk), a *torn trailing line* without its newline.
* **Torn-line repair.** Opening a store truncates a trailing partial line (the
  bytes after the last ``\\n``) before anything is appended, and logs how many
  bytes were dropped; a torn record is therefore never completed by the next
  append into a corrupt line, and never counted as done. Complete lines that
  are not valid JSON (which our writes cannot produce) are skipped on load
  with a warning rather than silently trusted.
* **Supersession.** ``--force`` recomputes a cell and appends a newer record
  for the same key. :meth:`Store.records` returns, per key, the **last**
  record in the file (the newest supersedes older ones);
  :meth:`Store.compact` rewrites the file with one line per key (temp file,
  ``fsync``, ``os.replace``, directory ``fsync``), which the runner calls at
  the end of a forced run so the file has no superseded lines left.
* **No duplicates.** The runner skips keys in :meth:`completed_keys`, so a
  rerun never appends a second record for a finished cell.
* **One writer.** :meth:`Store.lock` takes an exclusive ``flock`` on
  ``DIR/results.lock`` (released by the kernel when the process dies) so two
  runners cannot interleave on one store.
* **Shards (multi-process studies,** :mod:`dlfix_jax.study.distributed`\
  **).** Process k of a run appends to its own shard
  ``DIR/results.p<k>.jsonl`` (``Store(DIR, shard=k)``, its own lock
  ``results.p<k>.lock``; the same atomic appends and torn-line repair).
  :meth:`Store.merge_shards` (process 0, under the main lock) rewrites
  ``results.jsonl`` with the newest record per key of the file and all
  shards, then deletes the shards. :func:`merged_records` is the reader's
  view: ``results.jsonl``'s records, superseded by the shards' (a shard
  holds only records of the latest run; a run starts by merging the shards
  of an earlier one). One run computes each key in one process only, so a
  key in two shards is a fault (e.g. two jobs on one workdir): it is
  reported in the result's ``duplicates`` and resolved to the record that
  finished last.

Record schema (the report reads exactly this; see ``dlfix_jax.study.runner``)::

  {"key", "dataset", "model", "approach", "abbrev", "seed": int,
   "status": "ok" | "unadaptable" | "failure" | "corrupted",
   "reason": str | null,
   "metrics": {"acc", "acc_orig", "d_acc", "rr", "nfr", "repaired", "broken",
               "asr", "asr_orig", "d_asr", "aaod", "aaod_orig", "d_aaod",
               "time_s", "time_compile_s", "time_execute_s"},
   "ensembles": {"NO"|"SV"|"HV"|"UP"|"UD"|"US": {"acc", "rr", "nfr", "asr",
                 "aaod"}},                                     # optional
   "fixer_config": {...}, "info": {...}, "execution": {"mode", "backend",
   "seeds_in_call", "batch_time_s"?, "batch_compile_s"?},
   "version": str, "git_rev": str, "started": iso, "finished": iso}

JSON has no NaN/Infinity, so :func:`json_safe` turns non-finite floats into
``null`` (a relative change against a zero baseline, a NaN metric of a
corrupted model); every metric that is ``null`` is therefore "not applicable
or not finite".
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
from typing import Any, Iterable, Iterator

from dlfix_jax import fileio

FILENAME = "results.jsonl"
LOCKNAME = "results.lock"
STATUSES = ("ok", "unadaptable", "failure", "corrupted")
SHARD_RE = re.compile(r"^results\.p(\d+)\.jsonl$")

log = logging.getLogger(__name__)
json_safe = fileio.json_safe


def make_key(dataset: str, model: str, approach: str, seed: int,
             variant: str | None = None) -> str:
    """The cell key ``"dataset/model/approach/seed"``, or with a
    ``variant`` (a hash of what made the cell: the fixer config, the base
    model's training config, the study seed and the ASR settings)
    ``"dataset/model/approach@variant/seed"``: a changed config makes new
    cells instead of finding the old ones."""
    for part, what in ((dataset, "dataset"), (model, "model"),
                       (approach, "approach")):
        if not part or "/" in str(part) or "@" in str(part):
            raise ValueError(f"{what} {part!r} must be non-empty without "
                             "'/' or '@'")
    if variant:
        if "/" in str(variant):
            raise ValueError(f"variant {variant!r} must not contain '/'")
        return f"{dataset}/{model}/{approach}@{variant}/{int(seed)}"
    return f"{dataset}/{model}/{approach}/{int(seed)}"


def shard_filename(index: int) -> str:
    """The file of process ``index``'s shard: ``results.p<index>.jsonl``."""
    if int(index) < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"results.p{int(index)}.jsonl"


def shard_paths(directory: str) -> list[tuple[int, str]]:
    """``(index, path)`` of every shard file in ``directory``, by index."""
    if not os.path.isdir(directory):
        return []
    out = []
    for name in os.listdir(directory):
        m = SHARD_RE.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(out)


def _write_all(fd: int, data: bytes) -> None:
    """One ``os.write``; a regular-file write is complete in one call, the
    loop only guards against a short write (e.g. a nearly full disk)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def invalid_reason(rec: Any) -> str | None:
    """Why ``rec`` is not a usable record (None: it is one): a JSON object
    with a string ``key`` and a known ``status``."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    if not isinstance(rec.get("key"), str) or not rec["key"]:
        return "no key"
    if rec.get("status") not in STATUSES:
        return f"status {rec.get('status')!r} is not one of {STATUSES}"
    return None


def _complete_record(raw: bytes) -> dict | None:
    """``raw`` parsed when it is one complete, valid record, else None."""
    if not raw.strip():
        return None
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    return rec if invalid_reason(rec) is None else None


def _last_piece(f, size: int) -> bytes:
    """The bytes after the last newline of the open file ``f``."""
    pos = size
    while pos > 0:
        step = min(65536, pos)
        pos -= step
        f.seek(pos)
        block = f.read(step)
        i = block.rfind(b"\n")
        if i >= 0:
            f.seek(pos + i + 1)
            return f.read(size - (pos + i + 1))
    f.seek(0)
    return f.read(size)


class Store:
    """The append-only JSONL store in ``directory``.

    Opening, and taking the writer lock, repair a torn trailing line (see
    the module docstring); the repair only ever runs under the lock.
    ``shard=k``: process k's shard ``results.p<k>.jsonl`` instead of
    ``results.jsonl``. ``repair=False``: opening neither creates the
    directory nor touches the lock (a reader).
    """

    def __init__(self, directory: str, shard: int | None = None,
                 repair: bool = True):
        self.directory = directory
        self.shard = None if shard is None else int(shard)
        name = FILENAME if shard is None else shard_filename(shard)
        self.path = os.path.join(directory, name)
        self.lockname = (LOCKNAME if shard is None
                         else name[:-len(".jsonl")] + ".lock")
        self.repaired_bytes = 0
        if not repair:  # a reader, or a caller that takes lock() itself
            return
        os.makedirs(directory, exist_ok=True)
        # Repair only under the writer lock: a torn line may be a live
        # writer's line in progress. If another process holds the lock, it
        # repaired the file when it took the lock.
        try:
            with self.lock():
                pass
        except RuntimeError:
            pass

    # -- integrity ---------------------------------------------------------
    def _repair(self) -> int:
        """Truncates a trailing partial line; returns the bytes dropped."""
        if not os.path.exists(self.path):
            return 0
        with open(self.path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size == 0:
                return 0
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return 0
            tail = _last_piece(f, size)
            if _complete_record(tail) is not None:
                # A complete record that lost only its newline (a crash
                # between the bytes, or an editor): keep it.
                f.seek(size)
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
                log.warning("results store %s: completed a trailing record "
                            "that lacked its newline", self.path)
                return 0
            keep = size - len(tail)  # just after the last newline
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        dropped = size - keep
        log.warning("results store %s: dropped a torn trailing line of %d "
                    "bytes (an interrupted write); its cell will be recomputed",
                    self.path, dropped)
        return dropped

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive writer lock; raises RuntimeError if another process
        holds it."""
        fd = os.open(os.path.join(self.directory, self.lockname),
                     os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                raise RuntimeError(
                    f"another process is writing {self.path} (lock "
                    f"{self.lockname} is held); wait for it or use another "
                    f"workdir") from e
            self.repaired_bytes += self._repair()
            yield
        finally:
            os.close(fd)  # closing releases the flock

    # -- writing -----------------------------------------------------------
    @staticmethod
    def _line(record: dict) -> bytes:
        if not isinstance(record, dict) or "key" not in record:
            raise ValueError("a record must be a dict with a 'key'")
        status = record.get("status")
        if status not in STATUSES:
            raise ValueError(f"record {record['key']!r}: status {status!r} "
                             f"not in {STATUSES}")
        text = json.dumps(json_safe(record), sort_keys=True, allow_nan=False,
                          separators=(",", ":"))
        if "\n" in text:  # json.dumps escapes newlines in strings
            raise AssertionError("serialised record contains a newline")
        return (text + "\n").encode("utf-8")

    def append_many(self, records: Iterable[dict]) -> None:
        """Appends records with one ``os.write`` and one ``fsync``."""
        data = b"".join(self._line(r) for r in records)
        if not data:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def append(self, record: dict) -> None:
        """Appends one record atomically (one write, then fsync)."""
        self.append_many([record])

    # -- reading -----------------------------------------------------------
    def all_records(self) -> list[dict]:
        """Every complete, valid record in file order (superseded included).

        A trailing line without a newline (a write in progress in another
        process) is ignored, not parsed.
        """
        if not os.path.exists(self.path):
            return []
        with open(self.path, "rb") as f:
            data = f.read()
        out = []
        lines = data.split(b"\n")
        # The last piece (after the final newline) counts only when it is a
        # complete record that lost its newline, never a partial line.
        last = lines[-1] if _complete_record(lines[-1]) is not None else b""
        for n, line in enumerate(lines[:-1] + [last], 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                log.warning("results store %s: line %d is not valid JSON; "
                            "ignored", self.path, n)
                continue
            why = invalid_reason(rec)
            if why:
                log.warning("results store %s: line %d ignored: %s",
                            self.path, n, why)
                continue
            out.append(rec)
        return out

    def records(self) -> dict[str, dict]:
        """The newest record per key (insertion order of first appearance)."""
        latest: dict[str, dict] = {}
        for rec in self.all_records():
            latest[rec["key"]] = rec
        return latest

    def completed_keys(self) -> set[str]:
        """Keys that have a record (any status: every status is final)."""
        return set(self.records())

    def compact(self) -> int:
        """Rewrites the file with only the newest record per key, atomically.

        Returns the number of superseded lines removed (0: nothing written).
        """
        all_recs = self.all_records()
        latest: dict[str, dict] = {}
        for rec in all_recs:
            latest[rec["key"]] = rec
        removed = len(all_recs) - len(latest)
        if removed == 0:
            return 0
        # Keep the order of the newest records as they appear in the file.
        newest_ids = {id(r) for r in latest.values()}
        self._rewrite([r for r in all_recs if id(r) in newest_ids])
        return removed

    def _rewrite(self, records: list[dict]) -> None:
        """Replaces the file with ``records`` atomically (temp file, fsync,
        ``os.replace``, directory fsync)."""
        tmp = self.path + ".tmp"
        data = b"".join(self._line(r) for r in records)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def merge_shards(self) -> dict:
        """Merges every shard of the directory into this (main) store and
        deletes the shards. Call it under :meth:`lock` of the main store.

        Each shard's lock is taken first (a shard still being written, by a
        live process of another run, is refused), which also repairs its
        torn trailing line. ``results.jsonl`` is rewritten atomically with
        :func:`merged_records` before any shard is deleted, so a kill at
        any point leaves every record in the file or in a shard (a
        record in both is the same record; the next merge keeps one).

        Returns:
          ``{"shards": [indices], "records": n records read from shards,
          "duplicates": {key: [sources]}}``.

        Raises:
          RuntimeError: a shard's lock is held by another process.
        """
        if self.shard is not None:
            raise ValueError("merge_shards is a method of the main store "
                             "(Store(directory)), not of a shard")
        shards = shard_paths(self.directory)
        if not shards:
            return {"shards": [], "records": 0, "duplicates": {}}
        with contextlib.ExitStack() as stack:
            for idx, _ in shards:
                stack.enter_context(
                    Store(self.directory, idx, repair=False).lock())
            merged = merged_records(self.directory)
            self._rewrite(list(merged["records"].values()))
            for _, path in shards:
                os.unlink(path)
        if merged["duplicates"]:
            log.warning("results store %s: keys recorded by several shards "
                        "(kept the record that finished last): %s",
                        self.path, merged["duplicates"])
        log.info("results store %s: merged %d records of shards %s",
                 self.path, merged["shard_records"], [i for i, _ in shards])
        return {"shards": [i for i, _ in shards],
                "records": merged["shard_records"],
                "duplicates": merged["duplicates"]}


def merged_records(directory: str) -> dict:
    """The reader's view of a study directory: ``results.jsonl`` and its
    shards merged (see the module docstring).

    Returns:
      ``{"records": {key: record} (newest per key: the main file's, then
      superseded by the shards'; order of first appearance), "duplicates":
      {key: ["results.p<i>.jsonl", ...]} (keys in more than one shard;
      the record with the latest ``finished`` is kept, ties to the higher
      shard index), "shard_records": int}``.
    """
    records = Store(directory, repair=False).records()
    from_shard: dict[str, tuple[int, dict]] = {}
    seen: dict[str, list[str]] = {}
    n = 0
    for idx, path in shard_paths(directory):
        reader = Store(directory, idx, repair=False)
        for key, rec in reader.records().items():
            n += 1
            seen.setdefault(key, []).append(os.path.basename(path))
            old = from_shard.get(key)
            if old is None or str(rec.get("finished") or "") >= str(
                    old[1].get("finished") or ""):
                from_shard[key] = (idx, rec)
    for key, (_, rec) in from_shard.items():
        records.pop(key, None)
    for key, (_, rec) in from_shard.items():
        records[key] = rec
    return {"records": records,
            "duplicates": {k: v for k, v in seen.items() if len(v) > 1},
            "shard_records": n}
