"""Registry, named streams, file writes and data sources."""

import json
import os
import stat

import jax
import numpy as np
import pytest

from dlfix_jax import fileio, registry, rng
from dlfix_jax.data import base as data_base
from dlfix_jax.data.source import Source, epoch_indices, _rebatch


def test_registry_add_get_temporary():
    r = registry.Registry("widget")
    r.add("a", 1)
    with pytest.raises(ValueError, match="widget 'a' registered twice"):
        r.add("a", 2)
    with pytest.raises(KeyError, match="unknown widget 'b'; registered: a"):
        r.get("b")
    with r.temporary(b=2):
        assert r.get("b") == 2 and r.names() == ["a", "b"]
    assert "b" not in r


def test_seed_keys_do_not_depend_on_the_number_of_seeds():
    k3 = rng.seed_keys(7, 3)
    k5 = rng.seed_keys(7, 5)
    for a, b in zip(k3, k5):
        assert np.array_equal(jax.random.key_data(a), jax.random.key_data(b))


def test_atomic_write_is_valid_json_with_umask_mode(tmp_path):
    p = tmp_path / "out.json"
    fileio.atomic_write_json(p, {"a": float("nan"), "b": np.float32(1.5),
                                 "c": np.arange(3)})
    assert json.loads(p.read_text()) == {"a": None, "b": 1.5, "c": [0, 1, 2]}
    mode = stat.S_IMODE(os.stat(p).st_mode)
    assert mode == fileio.FILE_MODE and mode & 0o044  # readable by others
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_parse_jsonl_separates_torn_tail_complete_tail_and_invalid():
    c = fileio.parse_jsonl(b'{"a":1}\nnot json\n[1]\n{"b":2}')
    assert [r for _, r in c.records] == [{"a": 1}, {"b": 2}]
    assert c.tail_parsed and c.torn == b""
    assert [n for n, _ in c.invalid] == [2, 3]
    c = fileio.parse_jsonl(b'{"a":1}\n{"b":')
    assert [r for _, r in c.records] == [{"a": 1}] and c.torn == b'{"b":'


def test_epoch_indices_fill_the_last_batch_and_cover_every_example():
    idx = epoch_indices(jax.random.key(0), 10, 4)
    assert idx.shape == (3, 4) and set(idx.ravel()) == set(range(10))


def test_source_batches_and_rebatching():
    x = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    s = Source(data_base.Split(x, np.arange(10, dtype=np.int32)), "train")
    assert s.in_memory and len(s) == 10
    batches = list(s.take_steps(jax.random.key(1), 4, 5))
    assert len(batches) == 5 and all(b[0].shape == (4, 1, 1, 1)
                                     for b in batches)
    assert [len(b) for b in s.ordered(4)] == [4, 4, 2]
    stream = [data_base.Split(x[:3], np.zeros(3)),
              data_base.Split(x[3:], np.zeros(7))]
    assert [len(b) for b in _rebatch(iter(stream), 4)] == [4, 4, 2]
    streamed = Source(_Stream(stream), "train")
    assert not streamed.in_memory
    with pytest.raises(Exception, match="streamed"):
        streamed.split()
    got = list(streamed.epoch(jax.random.key(0), 4))
    assert [b[0].shape[0] for b in got] == [4, 4, 4]


class _Stream:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return sum(len(b) for b in self.batches)


def test_metrics_do_not_import_the_study_layer():
    """Layering: ``dlfix_jax.metrics`` sits below ``dlfix_jax.study``."""
    import subprocess
    import sys
    code = ("import sys, dlfix_jax.metrics; "
            "print([m for m in sys.modules if m.startswith('dlfix_jax.study')"
            " or m.startswith('dlfix_jax.fixers')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]", out.stdout
