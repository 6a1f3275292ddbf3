"""The append-only JSONL results store: atomic appends, torn-line repair,
no duplicates, --force supersession, compaction and the writer lock."""

import json
import math
import os

import numpy as np
import pytest

from dlfix_jax.study import store as store_lib


def _rec(key_seed, status="ok", acc=90.0, approach="fake"):
    key = store_lib.make_key("digits", "lenet5", approach, key_seed)
    return {"key": key, "dataset": "digits", "model": "lenet5",
            "approach": approach, "seed": key_seed, "status": status,
            "reason": None, "metrics": {"acc": acc}}


def test_make_key_and_validation():
    assert store_lib.make_key("digits", "lenet5", "arachne", 2) == \
        "digits/lenet5/arachne/2"
    with pytest.raises(ValueError, match="approach"):
        store_lib.make_key("digits", "lenet5", "a/b", 0)
    s = store_lib.Store("/tmp/unused_dir_for_validation_only")
    with pytest.raises(ValueError, match="status"):
        s._line({"key": "k", "status": "great"})


def test_append_is_one_complete_line_each(tmp_path):
    s = store_lib.Store(str(tmp_path))
    s.append(_rec(0))
    s.append_many([_rec(1), _rec(2)])
    raw = open(s.path, "rb").read()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 3
    lines = [json.loads(x) for x in raw.splitlines()]
    assert [r["seed"] for r in lines] == [0, 1, 2]
    assert s.completed_keys() == {f"digits/lenet5/fake/{i}" for i in range(3)}


def test_json_safe_numpy_and_nonfinite(tmp_path):
    s = store_lib.Store(str(tmp_path))
    r = _rec(0)
    r["metrics"] = {"acc": np.float32(12.5), "d_acc": float("inf"),
                    "rr": float("nan"), "repaired": np.int64(3),
                    "trace": np.arange(3)}
    s.append(r)
    got = s.records()[r["key"]]["metrics"]
    assert got == {"acc": 12.5, "d_acc": None, "rr": None, "repaired": 3,
                   "trace": [0, 1, 2]}
    assert "NaN" not in open(s.path).read()


def test_torn_trailing_line_is_truncated_and_not_counted(tmp_path, caplog):
    s = store_lib.Store(str(tmp_path))
    s.append_many([_rec(0), _rec(1)])
    good = open(s.path, "rb").read()
    torn = store_lib.Store._line(_rec(2))[:25]  # a write cut short
    with open(s.path, "ab") as f:
        f.write(torn)
    # A reader that does not repair ignores the torn tail...
    reader = store_lib.Store.__new__(store_lib.Store)  # skips the repair
    reader.directory, reader.path = str(tmp_path), s.path
    assert len(reader.all_records()) == 2
    assert open(s.path, "rb").read() == good + torn
    # ...and opening repairs the file to exactly the good prefix.
    with caplog.at_level("WARNING"):
        s2 = store_lib.Store(str(tmp_path))
    assert s2.repaired_bytes == len(torn)
    assert open(s.path, "rb").read() == good
    assert "torn trailing line" in caplog.text
    assert s2.completed_keys() == {_rec(0)["key"], _rec(1)["key"]}
    s2.append(_rec(2))
    recs = s2.all_records()
    assert [r["seed"] for r in recs] == [0, 1, 2]  # no corrupt merged line


def test_torn_only_line(tmp_path):
    path = tmp_path / store_lib.FILENAME
    path.write_bytes(b'{"key": "x", "sta')
    s = store_lib.Store(str(tmp_path))
    assert path.read_bytes() == b"" and s.records() == {}


def test_invalid_complete_line_is_skipped(tmp_path, caplog):
    s = store_lib.Store(str(tmp_path))
    s.append(_rec(0))
    with open(s.path, "ab") as f:
        f.write(b"not json\n")
    s.append(_rec(1))
    with caplog.at_level("WARNING"):
        assert len(s.records()) == 2
    assert "not valid JSON" in caplog.text


def test_force_supersedes_and_compact(tmp_path):
    s = store_lib.Store(str(tmp_path))
    s.append_many([_rec(0, acc=1.0), _rec(1, acc=2.0)])
    s.append(_rec(0, acc=50.0, status="corrupted"))  # a forced recompute
    assert len(s.all_records()) == 3
    latest = s.records()
    assert len(latest) == 2
    assert latest[_rec(0)["key"]]["metrics"]["acc"] == 50.0
    assert latest[_rec(0)["key"]]["status"] == "corrupted"
    assert s.compact() == 1
    recs = s.all_records()
    assert [(r["seed"], r["metrics"]["acc"]) for r in recs] == [(1, 2.0),
                                                                (0, 50.0)]
    assert s.compact() == 0
    assert not os.path.exists(s.path + ".tmp")


def test_lock_is_exclusive(tmp_path):
    s = store_lib.Store(str(tmp_path))
    with s.lock():
        # flock locks are per open file description: a second open in the
        # same process conflicts too, as another process would.
        with pytest.raises(RuntimeError, match="another process"):
            with store_lib.Store(str(tmp_path)).lock():
                pass
    with s.lock():  # released
        pass


def test_json_safe_misc():
    assert store_lib.json_safe({"a": (1, 2.0, float("-inf"))}) == \
        {"a": [1, 2.0, None]}
    assert math.isclose(store_lib.json_safe(np.float64(0.1)), 0.1)
    assert store_lib.json_safe(object).startswith("<class")


def test_complete_record_without_newline_is_kept(tmp_path):
    """A complete last record that lost only its newline is kept (the
    newline is restored under the lock), not deleted and recomputed."""
    s = store_lib.Store(str(tmp_path))
    s.append(_rec(0))
    with open(s.path, "ab") as f:
        f.write(json.dumps(_rec(1)).encode())  # no newline
    assert len(store_lib.Store(str(tmp_path)).all_records()) == 2
    assert open(s.path, "rb").read().endswith(b"\n")
    assert store_lib.Store(str(tmp_path)).completed_keys() == {
        _rec(0)["key"], _rec(1)["key"]}


def test_record_without_status_is_skipped_not_fatal(tmp_path, caplog):
    s = store_lib.Store(str(tmp_path))
    s.append(_rec(0))
    with open(s.path, "ab") as f:
        f.write(b'{"key": "digits/lenet5/x/0"}\n')
    with caplog.at_level("WARNING"):
        recs = s.all_records()
    assert [r["key"] for r in recs] == [_rec(0)["key"]]
    assert any("line 2 ignored" in m for m in caplog.messages)
