"""File writes and JSON: the one owner of atomic writes and JSONL reading.

* :func:`atomic_write_bytes` / ``_text`` / ``_json`` write a temporary file
  beside the target, ``fsync`` it, ``os.replace`` it into place and
  ``fsync`` the directory, so a reader sees the old or the new file, never
  a half-written one, and the new file survives a power loss once the call
  returns. The file gets the user's umask mode (``0666 & ~umask``, e.g.
  0644), not ``mkstemp``'s 0600, so reports and models are readable by
  whoever may read the directory.
* Paths that are not local (``gs://...``, ``s3://...``: a workdir on cloud
  storage, as on TPU VMs) go through ``etils.epath``; object stores write a
  whole object at once, which is atomic there.
* :func:`json_safe` turns numpy/jax values into JSON (non-finite floats
  become ``null``: JSON has no NaN); :func:`dumps` never emits ``NaN``.
* :func:`read_jsonl` parses a JSONL file line by line, separating complete
  records from a torn trailing line and from invalid lines.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def is_local(path) -> bool:
    """False for URL-like paths (``scheme://...``) that need etils.epath."""
    return "://" not in os.fspath(path)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically and durably (module doc)."""
    path = os.fspath(path)
    if not is_local(path):
        from etils import epath  # cloud paths only
        p = epath.Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory,
                               prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """A JSON-serialisable copy of ``obj``.

    numpy/jax scalars and arrays become Python numbers/lists, tuples become
    lists, non-finite floats become None, dataclasses and ConfigDicts dicts,
    other objects their ``str``.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "to_dict") and callable(obj.to_dict):  # ConfigDict
        return json_safe(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return json_safe(dataclasses.asdict(obj))
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy / jax arrays
        try:
            return json_safe(obj.tolist())
        except Exception:  # noqa: BLE001 - e.g. a typed PRNG key array
            return str(obj)
    if hasattr(obj, "item"):
        return json_safe(obj.item())
    return str(obj)


def dumps(obj: Any, *, indent: int | None = 2) -> str:
    """``json.dumps`` of :func:`json_safe` (sorted keys, never NaN)."""
    seps = None if indent else (",", ":")
    return json.dumps(json_safe(obj), indent=indent, sort_keys=True,
                      allow_nan=False, separators=seps)


def atomic_write_json(path, obj: Any) -> None:
    """Writes ``obj`` as indented, valid JSON (no NaN) atomically."""
    atomic_write_text(path, dumps(obj) + "\n")


def read_json(path) -> Any:
    path = os.fspath(path)
    if not is_local(path):
        from etils import epath  # cloud paths only
        return json.loads(epath.Path(path).read_text())
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclasses.dataclass
class JsonlContents:
    """What :func:`read_jsonl` found.

    Attributes:
      records: parsed complete lines that are JSON objects, in file order,
        as ``(line_number, record)``.
      invalid: ``(line_number, reason)`` of complete lines that are not JSON
        objects.
      torn: bytes after the last newline that are *not* a complete JSON
        object (an interrupted write), or b"".
      tail_parsed: True when the bytes after the last newline were a
        complete JSON object (a record whose newline was lost) and were
        parsed into ``records``.
    """

    records: list[tuple[int, dict]]
    invalid: list[tuple[int, str]]
    torn: bytes = b""
    tail_parsed: bool = False


def parse_jsonl(data: bytes) -> JsonlContents:
    """Parses JSONL bytes (see :class:`JsonlContents`)."""
    lines = data.split(b"\n")
    body, tail = lines[:-1], lines[-1]
    out = JsonlContents([], [])
    for n, line in enumerate(body, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            out.invalid.append((n, f"not valid JSON ({e.msg})"))
            continue
        if not isinstance(rec, dict):
            out.invalid.append((n, "not a JSON object"))
            continue
        out.records.append((n, rec))
    if tail.strip():
        try:
            rec = json.loads(tail)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            out.records.append((len(body) + 1, rec))
            out.tail_parsed = True
        else:
            out.torn = tail
    return out


def read_jsonl(path) -> JsonlContents:
    """Reads a JSONL file; an absent file reads as empty."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return JsonlContents([], [])
    with open(path, "rb") as f:
        return parse_jsonl(f.read())
