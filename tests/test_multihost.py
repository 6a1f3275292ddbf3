"""Multi-process studies (issue 13): two local CPU processes started with
``dlfix study --coordinator_address=localhost:PORT --num_processes=2
--process_id=K`` on one workdir give the same records as one process; a job
with one process SIGKILLed and rerun loses and duplicates nothing; shards
left by a killed job are merged by a later run with another process count
and read by the report.

The subprocesses' config file (:func:`study_config`) registers the fake
fixers of ``tests/test_runner.py`` in its own process; this module
registers them only temporarily (``FIXERS.temporary``).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from dlfix_jax.fixers import base as fixers_base
from dlfix_jax.report import tables
from dlfix_jax.study import distributed
from dlfix_jax.study import runner
from dlfix_jax.study import store as store_lib
from tests import test_runner

ROOT = test_runner.ROOT


def _strip(rec):
    """A record without wall-clock fields: test_runner's (timestamps, time
    metrics, execution) and the fixers' own timings in ``info``
    (``time_*``, e.g. RA's LP build time)."""
    r = test_runner._strip(rec)
    if isinstance(r.get("info"), dict):
        r["info"] = {k: v for k, v in r["info"].items()
                     if not k.startswith("time_")}
    return r

# Real approaches (cheap settings) and a fake: the uninterrupted comparison.
REAL = ["arachne", "ra", "fake_vmap"]
# Fakes that sleep: the kill-and-rerun run (the kill lands mid-run).
KILL = ["fake_refuse", "fake_sleep_a", "fake_sleep_b", "fake_sleep_c",
        "fake_seq", "fake_vmap"]


def study_config(names):
    """The small digits study of this module (also the subprocesses'
    config): LeNet5 trained 1 epoch, 2 seeds, Arachne with 2 generations of
    10 candidates, RA on 20 passing inputs."""
    test_runner.register_fakes()
    c = test_runner.tiny_config(names, num_seeds=2)
    c.fixers.arachne.max_generations = 2
    c.fixers.arachne.population = 10
    c.fixers.ra.num_passing = 20
    return c


_CONFIG_FILE = """
import sys
sys.path.insert(0, {root!r})
from tests import test_multihost

def get_config():
    return test_multihost.study_config({names!r})
"""


@pytest.fixture(scope="module")
def fakes():
    with fixers_base.FIXERS.temporary(**test_runner.fake_specs()):
        yield


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, fakes):
    """A workdir whose base model is trained once for the whole module."""
    wd = tmp_path_factory.mktemp("mh_base")
    runner.run_study(test_runner.tiny_config(["fake_refuse"], num_seeds=1),
                     str(wd))
    return wd


def _workdir(path, base_dir):
    shutil.copytree(base_dir / "base", path / "base")
    return path


def _diff(a, b, path=""):
    """The paths at which two JSON values differ (for assertion messages)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}/{k}")
        return out
    return [] if a == b else [f"{path}: {a!r} != {b!r}"[:300]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(tmp_path, wd, names, n, tag):
    """Starts the ``n`` processes of one job; returns (procs, log paths)."""
    cfg = tmp_path / f"config_{tag}.py"
    cfg.write_text(_CONFIG_FILE.format(root=ROOT, names=names))
    port = _free_port()
    procs, logs = [], []
    for k in range(n):
        log = tmp_path / f"{tag}_p{k}.log"
        cmd = [sys.executable, "-m", "experiments.run_study",
               f"--config={cfg}", f"--workdir={wd}"]
        if n > 1:  # one process: the plain command
            cmd += [f"--coordinator_address=localhost:{port}",
                    f"--num_processes={n}", f"--process_id={k}"]
        with open(log, "wb") as f:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=f,
                                          stderr=subprocess.STDOUT))
        logs.append(log)
    return procs, logs


def _finish(procs, logs, timeout=240):
    deadline = time.time() + timeout
    try:
        for p, log in zip(procs, logs):
            rc = p.wait(timeout=max(deadline - time.time(), 1))
            assert rc == 0, log.read_text()[-4000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _file_records(wd):
    """Every line-record of results.jsonl and the shards (duplicates
    included)."""
    out = list(store_lib.Store(str(wd), repair=False).all_records())
    for idx, _ in store_lib.shard_paths(str(wd)):
        out += store_lib.Store(str(wd), idx, repair=False).all_records()
    return out


# ---------------------------------------------------------------------------
# No subprocess.

def test_assign_is_round_robin_and_deterministic():
    units = list("abcdefg")
    assert distributed.assign(units, 3) == [["a", "d", "g"], ["b", "e"],
                                            ["c", "f"]]
    assert distributed.assign(units, 1) == [units]
    assert distributed.assign([], 2) == [[], []]
    with pytest.raises(ValueError, match="num_processes"):
        distributed.assign(units, 0)
    assert distributed.plan_hash([1, "a"]) == distributed.plan_hash([1, "a"])
    assert distributed.plan_hash([1, "a"]) != distributed.plan_hash([2, "a"])
    with pytest.raises(ValueError, match="distributed mode"):
        distributed.initialize("maybe")
    with pytest.raises(ValueError, match="off"):
        distributed.initialize("off", num_processes=2)
    # One process: nothing to start, no coordinator.
    assert distributed.initialize("auto") is False
    assert distributed.coordinator() is None


def _rec(key, finished, acc):
    ds, model, approach, seed = key.split("/")
    return {"key": key, "dataset": ds, "model": model, "approach": approach,
            "seed": int(seed), "status": "ok", "reason": None,
            "metrics": {"acc": acc}, "finished": finished}


def test_merge_shards_and_report_reader(tmp_path):
    wd = str(tmp_path)
    main = store_lib.Store(wd)
    main.append_many([_rec("d/m/a/0", "t1", 1.0), _rec("d/m/a/1", "t1", 2.0)])
    store_lib.Store(wd, shard=0).append(_rec("d/m/a/1", "t2", 3.0))
    s1 = store_lib.Store(wd, shard=1)
    s1.append(_rec("d/m/b/0", "t2", 4.0))
    with open(s1.path, "ab") as f:  # a torn write at a kill
        f.write(b'{"key": "d/m/b/1", "sta')
    # The report reads the main file and the unmerged shards (a shard
    # supersedes the main file's record of its key; a torn line is skipped).
    got = {r["key"]: r["metrics"]["acc"] for r in tables.load_records(wd)}
    assert got == {"d/m/a/0": 1.0, "d/m/a/1": 3.0, "d/m/b/0": 4.0}
    # A shard being written by a live process is not merged.
    with store_lib.Store(wd, shard=1, repair=False).lock():
        with pytest.raises(RuntimeError, match="another process"):
            main.merge_shards()
    res = main.merge_shards()
    assert res["shards"] == [0, 1] and res["duplicates"] == {}
    assert store_lib.shard_paths(wd) == []
    lines = open(main.path, "rb").read().splitlines()
    assert len(lines) == 3  # one line per key, the torn line dropped
    assert {r["key"]: r["metrics"]["acc"] for r in main.all_records()} == got
    # A key in two shards: the report refuses, the merge keeps the newest.
    store_lib.Store(wd, shard=0).append(_rec("d/m/c/0", "t5", 5.0))
    store_lib.Store(wd, shard=3).append(_rec("d/m/c/0", "t4", 6.0))
    with pytest.raises(tables.ReportError, match="two shards"):
        tables.load_records(wd)
    res = main.merge_shards()
    assert res["duplicates"] == {"d/m/c/0": ["results.p0.jsonl",
                                             "results.p3.jsonl"]}
    recs = store_lib.Store(wd).records()
    assert recs["d/m/c/0"]["metrics"]["acc"] == 5.0
    assert len(recs) == 4
    with pytest.raises(ValueError, match="main store"):
        store_lib.Store(wd, shard=0).merge_shards()


def test_one_process_run_merges_a_killed_jobs_shards(tmp_path, base_dir):
    """The process count may change between runs: shards of a killed
    two-process job count for a later one-process run (nothing recomputed,
    nothing duplicated) and are merged away."""
    names = ["fake_vmap", "fake_seq"]
    ref = runner.run_study(study_config(names),
                           str(_workdir(tmp_path / "ref", base_dir)))
    wd = _workdir(tmp_path / "wd", base_dir)
    vmap_recs = [r for r in ref if r["approach"] == "fake_vmap"]
    store_lib.Store(str(wd), shard=1).append_many(vmap_recs)
    got = runner.run_study(study_config(names), str(wd))
    assert [_strip(r) for r in got] == [_strip(r) for r in ref]
    # the shard's records were taken as they were, not recomputed
    assert [r["started"] for r in got[:2]] == [r["started"]
                                               for r in vmap_recs]
    assert store_lib.shard_paths(str(wd)) == []
    keys = [r["key"] for r in _file_records(wd)]
    assert len(keys) == len(set(keys)) == len(ref)


# ---------------------------------------------------------------------------
# Two processes.

@pytest.mark.slow  # ~45 s quiet, ~105 s on a loaded 2-core machine
def test_two_processes_equal_one_process(tmp_path, base_dir):
    """Real approaches (Arachne vmapped, RA sequential) and a fake: the
    two-process records equal a one-process run's."""
    # The one-process reference is a plain `dlfix study` subprocess started
    # with the job, so both import the same code.
    ref_wd = _workdir(tmp_path / "one", base_dir)
    wd = _workdir(tmp_path / "two", base_dir)
    ref_procs, ref_logs = _start(tmp_path, ref_wd, REAL, 1, "one")
    procs, logs = _start(tmp_path, wd, REAL, 2, "two")
    _finish(ref_procs + procs, ref_logs + logs)
    reference = store_lib.Store(str(ref_wd), repair=False).all_records()
    assert len(reference) == 6
    assert all(r["status"] == "ok" for r in reference), reference
    # Each process did its round-robin share: arachne and fake_vmap on 0.
    log0, log1 = logs[0].read_text(), logs[1].read_text()
    assert "[process 0/2] 2 of 3 units" in log0, log0[-3000:]
    assert "[process 1/2] 1 of 3 units" in log1, log1[-3000:]
    assert "digits/lenet5/ra" in log1.split("units")[1].splitlines()[0]
    assert store_lib.shard_paths(str(wd)) == []  # merged by process 0
    final = _file_records(wd)
    keys = [r["key"] for r in final]
    assert len(keys) == len(set(keys)) == 6
    got = {r["key"]: _strip(r) for r in final}
    want = {r["key"]: _strip(r) for r in reference}
    assert got == want, _diff(got, want)
    assert json.loads((wd / "config.json").read_text())["approaches"] == \
        ",".join(REAL)
    # A rerun of the finished job computes nothing and changes nothing.
    raw = (wd / store_lib.FILENAME).read_bytes()
    procs, logs = _start(tmp_path, wd, REAL, 2, "again")
    _finish(procs, logs)
    assert (wd / store_lib.FILENAME).read_bytes() == raw


def test_killed_process_then_rerun_loses_and_duplicates_nothing(
        tmp_path, base_dir):
    """The acceptance test: a two-process job with process 1 SIGKILLed
    mid-run (and the job torn down), rerun, equals a one-process run, with
    no duplicate or lost cell."""
    reference = runner.run_study(
        study_config(KILL), str(_workdir(tmp_path / "ref", base_dir)))
    wd = _workdir(tmp_path / "killed", base_dir)
    procs, logs = _start(tmp_path, wd, KILL, 2, "kill")
    shard1 = wd / store_lib.shard_filename(1)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and procs[1].poll() is None:
            if shard1.exists() and shard1.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.05)
        assert procs[1].poll() is None, (
            "process 1 finished before it was killed:\n"
            + logs[1].read_text()[-3000:])
        os.kill(procs[1].pid, signal.SIGKILL)
        # The job is torn down (a scheduler would; JAX's heartbeat would
        # end process 0 after 100 s).
        os.kill(procs[0].pid, signal.SIGKILL)
        for p in procs:
            p.wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    partial = _file_records(wd)
    assert 1 <= len(partial) < len(reference)
    assert store_lib.shard_paths(str(wd))  # unmerged: the job was killed
    # The report of the killed job reads the shards already.
    assert len(tables.load_records(str(wd))) == len(partial)
    with open(shard1, "ab") as f:  # the worst case: a torn write
        f.write(b'{"key": "digits/lenet5/fake_vmap/0", "sta')

    procs, logs = _start(tmp_path, wd, KILL, 2, "rerun")
    _finish(procs, logs)
    final = _file_records(wd)
    keys = [r["key"] for r in final]
    assert len(keys) == len(set(keys)) == len(reference)  # no duplicates
    assert sorted(keys) == sorted(r["key"] for r in reference)  # no loss
    assert store_lib.shard_paths(str(wd)) == []
    got = {r["key"]: _strip(r) for r in final}
    want = {r["key"]: _strip(r) for r in reference}
    assert got == want, _diff(got, want)
    # Cells finished before the kill were kept, not recomputed.
    started = {r["key"]: r["started"] for r in final}
    assert all(started[r["key"]] == r["started"] for r in partial)


def test_client_lookup_fails_clearly_when_jax_moves_it(monkeypatch):
    """The private key-value client is the one JAX internal the study
    relies on; a JAX that moved it gets a one-line error, not an
    AttributeError deep in a barrier."""
    from jax._src import distributed as _dist
    from dlfix_jax.study import distributed as dist
    assert dist._client() is _dist.global_state.client  # None: one process
    monkeypatch.setattr(_dist.global_state, "client", object())
    with pytest.raises(RuntimeError, match="lacks key_value_set"):
        dist._client()
