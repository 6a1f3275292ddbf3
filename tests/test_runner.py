"""The study runner on a tiny study: LeNet5 trained 1 epoch on digits, fake
fixers covering every status, resume / --force, and a SIGKILL-and-rerun run.

The fake fixers are registered for the module only (``FIXERS.temporary``;
the SIGKILL subprocess's config file registers them in its own process) so
that other tests iterating over the registry never see them.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from dlfix_jax import fixers
from dlfix_jax.fixers import base as fixers_base
from dlfix_jax.models import base as models_base
from dlfix_jax.study import runner
from dlfix_jax.study import store as store_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------
# Fake fixers.

def _cfg(**kw):
    return lambda: ml_collections.ConfigDict(dict(scale=0.05, **kw))


def _perturb(key, problem, config):
    """Adds key-dependent noise to the last Dense layer (pure, vmappable)."""
    params = problem.variables["params"]
    name = models_base.param_layers(params)[-1]
    layer = models_base.get_layer_params(params, name)
    k1, k2 = jax.random.split(key)
    new = {"kernel": layer["kernel"] + config.scale * jax.random.normal(
               k1, layer["kernel"].shape),
           "bias": layer["bias"] + config.scale * jax.random.normal(
               k2, layer["bias"].shape)}
    variables = dict(problem.variables)
    variables["params"] = models_base.set_layer_params(params, name, new)
    return fixers_base.FixResult(variables, info={"layer_norm": jnp.sum(
        new["kernel"] ** 2), "trace": jnp.arange(100.0)})


def _raise(key, problem, config):
    raise ValueError("boom: fake failure")


def _nan(key, problem, config):
    res = _perturb(key, problem, config)
    v = jax.tree_util.tree_map(lambda a: a * jnp.nan, res.variables)
    return fixers_base.FixResult(v)


def _collapse(key, problem, config):
    """Every input predicted as class 0 (near chance on balanced digits)."""
    params = problem.variables["params"]
    name = models_base.param_layers(params)[-1]
    layer = models_base.get_layer_params(params, name)
    new = {"kernel": jnp.zeros_like(layer["kernel"]),
           "bias": jnp.zeros_like(layer["bias"]).at[0].set(1.0)}
    variables = dict(problem.variables)
    variables["params"] = models_base.set_layer_params(params, name, new)
    return fixers_base.FixResult(variables)


def _slow(key, problem, config):
    for _ in range(400):  # a Python loop: the alarm interrupts it
        time.sleep(0.01)
    return _perturb(key, problem, config)


def _sleep_then_perturb(key, problem, config):
    time.sleep(config.sleep_s)
    return _perturb(key, problem, config)


def _refuse(info):
    return "needs sensitive-attribute groups (fake check)"


FAKES = {
    # name: (fix, vmappable, applicable, config)
    "fake_vmap": (_perturb, True, None, _cfg()),
    "fake_seq": (_perturb, False, None, _cfg()),
    "fake_raise": (_raise, False, None, _cfg()),
    "fake_nan": (_nan, False, None, _cfg()),
    "fake_collapse": (_collapse, True, None, _cfg()),
    "fake_refuse": (_perturb, False, _refuse, _cfg()),
    "fake_slow": (_slow, False, None, _cfg()),
    "fake_sleep_a": (_sleep_then_perturb, False, None, _cfg(sleep_s=0.4)),
    "fake_sleep_b": (_sleep_then_perturb, False, None, _cfg(sleep_s=0.4)),
    "fake_sleep_c": (_sleep_then_perturb, False, None, _cfg(sleep_s=0.4)),
}


def fake_specs():
    """name -> FixerSpec of every fake fixer."""
    out = {}
    for name, (fn, vm, app, cfg) in FAKES.items():
        kw = {"applicable": app} if app else {}
        out[name] = fixers_base.spec(name, fn, level="model",
                                     paper="fake (test)", default_config=cfg,
                                     vmappable=vm, abbrev=name.upper(), **kw)
    return out


def register_fakes():
    """Registers the fake fixers for good (the SIGKILL subprocess's config
    file does this); returns their names."""
    for name, s in fake_specs().items():
        if name not in fixers_base.FIXERS:
            fixers_base.FIXERS.add(name, s)
    return list(FAKES)


def tiny_config(approaches, num_seeds=2, budget=0.0, asr=False):
    from experiments.configs import digits_lenet5, study_common
    c = study_common.base_study("tiny")
    c.num_seeds = num_seeds
    c.approaches = ",".join(approaches)
    pair = ml_collections.ConfigDict()
    pair.train = digits_lenet5.get_config()
    pair.train.train.epochs = 1
    pair.asr = study_common.asr_config(n_samples=16)
    pair.asr.enabled = asr  # PGD's compilation dominates; one test runs it
    c.pairs.digits_lenet5 = pair
    c.time_budget_s = budget
    # vmappable fixers' seeds in one vmap(fix), as on accelerators (CPU's
    # auto is sequential): keeps the runner's vmapped path under test
    c.fix_strategy = "vmap"
    return c


@pytest.fixture(scope="module")
def fakes():
    # Scoped registration: tests must not leak fixers into the registry.
    with fixers_base.FIXERS.temporary(**fake_specs()):
        yield list(FAKES)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, fakes):
    """A workdir whose base model is trained once for the whole module."""
    wd = tmp_path_factory.mktemp("base_study")
    runner.run_study(tiny_config(["fake_refuse"], num_seeds=1), str(wd))
    return wd


def _workdir(tmp_path, base_dir):
    wd = tmp_path / "study"
    shutil.copytree(base_dir / "base", wd / "base")
    return wd


def _strip(rec):
    """A record without wall-clock fields (timestamps, times)."""
    r = json.loads(json.dumps(rec))
    for k in ("started", "finished", "execution"):
        r.pop(k, None)
    for k in ("time_s", "time_compile_s", "time_execute_s"):
        r["metrics"].pop(k, None)
    return r


# ---------------------------------------------------------------------------
# Tests.

def test_statuses_and_metrics(tmp_path, base_dir):
    wd = _workdir(tmp_path, base_dir)
    names = ["fake_vmap", "fake_seq", "fake_raise", "fake_nan",
             "fake_collapse", "fake_refuse"]
    recs = runner.run_study(tiny_config(names, asr=True), str(wd))
    by = {(r["approach"], r["seed"]): r for r in recs}
    assert len(recs) == len(names) * 2 == len(by)
    for s in (0, 1):
        for n in ("fake_vmap", "fake_seq"):
            r = by[(n, s)]
            assert r["status"] == "ok" and r["reason"] is None
            m = r["metrics"]
            assert set(runner.METRIC_KEYS) <= set(m)
            assert 15 < m["acc"] <= 100 and m["acc_orig"] > 15
            assert m["rr"] is not None and m["nfr"] is not None
            assert 0 <= m["asr"] <= 100 and 0 <= m["asr_orig"] <= 100
            assert m["aaod"] is None  # digits has no groups
            assert m["time_s"] > 0 and m["time_compile_s"] >= 0
            assert r["version"] and r["git_rev"] and r["started"]
            assert r["fixer_config"] == {"scale": 0.05}
            assert r["abbrev"] == n.upper()
        assert by[("fake_vmap", s)]["execution"]["mode"] == "vmap"
        assert by[("fake_seq", s)]["execution"]["mode"] == "sequential"
        for n in ("fake_vmap", "fake_seq"):
            assert by[(n, s)]["execution"]["backend"] == jax.default_backend()
        # Same key -> same fixed model, whether vmapped or not.
        mv, ms = by[("fake_vmap", s)]["metrics"], by[("fake_seq", s)]["metrics"]
        for k in ("acc", "rr", "nfr", "repaired", "broken"):
            assert mv[k] == ms[k], k
        assert by[("fake_raise", s)]["status"] == "failure"
        assert "ValueError: boom" in by[("fake_raise", s)]["reason"]
        nan = by[("fake_nan", s)]
        assert nan["status"] == "corrupted"
        assert "non-finite" in nan["reason"]
        # non-finite: no numbers at all (the study's CORRUPTED)
        assert nan["metrics"]["acc"] is None
        col = by[("fake_collapse", s)]
        assert col["status"] == "corrupted" and "chance" in col["reason"]
        assert col["metrics"]["acc"] <= 15
        ref = by[("fake_refuse", s)]
        assert ref["status"] == "unadaptable"
        assert ref["reason"].startswith("needs sensitive-attribute")
        assert ref["metrics"]["acc"] is None
    # Seeds differ.
    assert by[("fake_vmap", 0)]["info"] != by[("fake_vmap", 1)]["info"]
    # Large info arrays are summarised, small values kept.
    assert by[("fake_seq", 0)]["info"]["trace"]["shape"] == [100]


def test_rerun_skips_and_force_supersedes(tmp_path, base_dir):
    wd = _workdir(tmp_path, base_dir)
    cfg = tiny_config(["fake_seq", "fake_refuse"])
    first = runner.run_study(cfg, str(wd))
    path = wd / store_lib.FILENAME
    raw = path.read_bytes()
    again = runner.run_study(cfg, str(wd))
    assert path.read_bytes() == raw  # nothing appended
    assert again == first
    forced = runner.run_study(cfg, str(wd), force=True)
    lines = path.read_bytes().splitlines()
    assert len(lines) == 4  # compacted: one line per key
    assert [_strip(r) for r in forced] == [_strip(r) for r in first]
    assert [r["key"] for r in forced] == [r["key"] for r in first]
    # A new seed count only computes the missing seeds.
    cfg3 = tiny_config(["fake_seq", "fake_refuse"], num_seeds=3)
    third = runner.run_study(cfg3, str(wd))
    assert len(path.read_bytes().splitlines()) == 6
    assert [_strip(r) for r in third if r["seed"] < 2] == \
        [_strip(r) for r in first]


def test_timeout_is_failure_and_skips_remaining_seeds(tmp_path, base_dir):
    wd = _workdir(tmp_path, base_dir)
    t0 = time.time()
    recs = runner.run_study(tiny_config(["fake_slow"], num_seeds=2,
                                        budget=1.0), str(wd))
    assert time.time() - t0 < 30  # interrupted, not 2 x 4 s of sleeping
    assert [r["status"] for r in recs] == ["failure", "failure"]
    assert recs[0]["reason"].startswith("timeout")
    assert recs[0]["metrics"]["time_s"] < 3.0
    assert "seed 0 exceeded the time budget" in recs[1]["reason"]


def test_unknown_override_key_raises(tmp_path, fakes):
    cfg = tiny_config(["fake_seq"])
    cfg.fixers.fake_seq = ml_collections.ConfigDict({"scael": 1.0})
    spec = fixers.get("fake_seq")
    with pytest.raises(KeyError, match="scael"):
        runner.fixer_config(spec, cfg.fixers.fake_seq)
    ok = runner.fixer_config(spec, ml_collections.ConfigDict({"scale": 1.0}))
    assert ok.scale == 1.0


def test_time_limit_interrupts_python():
    t0 = time.time()
    with pytest.raises(runner.FixTimeout):
        with runner.time_limit(0.2):
            while True:
                time.sleep(0.01)
    assert time.time() - t0 < 2
    with runner.time_limit(None):
        pass


_CONFIG_FILE = """
import sys
sys.path.insert(0, {root!r})
from tests import test_runner

def get_config():
    test_runner.register_fakes()
    return test_runner.tiny_config(
        ["fake_sleep_a", "fake_sleep_b", "fake_sleep_c", "fake_refuse"],
        num_seeds=2)
"""


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, base_dir):
    names = ["fake_sleep_a", "fake_sleep_b", "fake_sleep_c", "fake_refuse"]
    ref_wd = _workdir(tmp_path / "ref", base_dir)
    reference = runner.run_study(tiny_config(names), str(ref_wd))

    wd = _workdir(tmp_path / "killed", base_dir)
    cfg_path = tmp_path / "kill_config.py"
    cfg_path.write_text(_CONFIG_FILE.format(root=ROOT))
    cmd = [sys.executable, "-m", "experiments.run_study",
           f"--config={cfg_path}", f"--workdir={wd}"]
    results = wd / store_lib.FILENAME
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if results.exists() and results.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the study finished before it was killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = store_lib.Store(str(wd)).all_records()
    assert 1 <= len(partial) < len(reference)
    # Simulate the worst case as well: a torn write at the moment of the kill.
    with open(results, "ab") as f:
        f.write(b'{"key": "digits/lenet5/fake_sleep_c/0", "sta')

    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    final = store_lib.Store(str(wd)).all_records()
    keys = [r["key"] for r in final]
    assert len(keys) == len(set(keys)) == len(reference)  # no duplicates
    assert sorted(keys) == sorted(r["key"] for r in reference)
    got = {r["key"]: _strip(r) for r in final}
    want = {r["key"]: _strip(r) for r in reference}
    assert got == want


def test_ensembles_restricted_to_listed_approaches():
    import ml_collections
    from dlfix_jax.study import runner as runner_lib
    cfg = ml_collections.ConfigDict({"ensembles": "NO,SV",
                                     "ensemble_approaches": "apricot"})
    combos = runner_lib._ensemble_names(cfg)
    assert combos == ["NO", "SV"]
    assert runner_lib._ensembles_for(cfg, "apricot", combos) == ["NO", "SV"]
    assert runner_lib._ensembles_for(cfg, "arachne", combos) == []
    cfg.ensemble_approaches = "all"
    assert runner_lib._ensembles_for(cfg, "arachne", combos) == ["NO", "SV"]


def test_changed_fixer_config_makes_new_cells(tmp_path, base_dir):
    """A rerun with another fixer config computes new cells (their key holds
    a hash of the config), keeps the old ones, and the report shows the two
    configs as separate rows instead of pooling them."""
    from dlfix_jax import report as report_lib
    from dlfix_jax.report import tables
    wd = _workdir(tmp_path, base_dir)
    first = runner.run_study(tiny_config(["fake_vmap"]), str(wd))
    again = runner.run_study(tiny_config(["fake_vmap"]), str(wd))
    assert [r["key"] for r in again] == [r["key"] for r in first]
    assert [_strip(r) for r in again] == [_strip(r) for r in first]
    c = tiny_config(["fake_vmap"])
    c.fixers.fake_vmap.scale = 0.5
    second = runner.run_study(c, str(wd))
    assert len(second) == 2
    assert {r["variant"] for r in second}.isdisjoint(
        {r["variant"] for r in first})
    assert all(r["fixer_config"]["scale"] == 0.5 for r in second)
    assert [r["metrics"]["acc"] for r in second] != [
        r["metrics"]["acc"] for r in first]
    records = tables.load_records(str(wd))
    assert len(records) == 4
    grid = tables.Grid.from_records(records)
    assert len(grid.rows) == 2 and all(
        row.startswith("FAKE_VMAP @") for row in grid.rows)
    out = report_lib.write_report(str(wd))
    md = open(os.path.join(out["out_dir"], "report.md")).read()
    assert md.count("FAKE_VMAP @") >= 2
    # Every registered fixer's settings exist in every study config.
    for name in fixers.names():
        assert name in c.fixers, name
    # The study seed is part of what made a cell, too.
    c2 = tiny_config(["fake_vmap"])
    c2.seed = 7
    third = runner.run_study(c2, str(wd))
    assert {r["variant"] for r in third}.isdisjoint(
        {r["variant"] for r in first})


def test_refused_run_on_a_locked_workdir_changes_nothing(tmp_path, base_dir):
    """Issue 11 item 8: a run refused by the store lock leaves config.json
    (and everything else) as it was."""
    wd = _workdir(tmp_path, base_dir)
    runner.run_study(tiny_config(["fake_vmap"], num_seeds=1), str(wd))
    before = (wd / "config.json").read_bytes()
    c = tiny_config(["fake_vmap"], num_seeds=1)
    c.seed = 99
    with store_lib.Store(str(wd)).lock():
        with pytest.raises(RuntimeError, match="another process"):
            runner.run_study(c, str(wd))
    assert (wd / "config.json").read_bytes() == before
    # Fixer settings are typed: a wrong type is refused when it is set.
    with pytest.raises(TypeError, match="scale"):
        c.fixers.fake_vmap.scale = "big"


def test_raising_num_seeds_equals_a_fresh_run(tmp_path, base_dir):
    """Issue 11 item 5: after raising num_seeds, every seed's metrics (ASR
    included, whose PGD sample is shared by the seeds of a cell) equal
    those of a fresh run with that many seeds; no duplicate lines remain."""
    grown = _workdir(tmp_path / "grown", base_dir)
    fresh = _workdir(tmp_path / "fresh", base_dir)
    runner.run_study(tiny_config(["fake_vmap"], num_seeds=1, asr=True),
                     str(grown))
    got = runner.run_study(tiny_config(["fake_vmap"], num_seeds=2, asr=True),
                           str(grown))
    want = runner.run_study(tiny_config(["fake_vmap"], num_seeds=2,
                                        asr=True), str(fresh))
    assert [_strip(r) for r in got] == [_strip(r) for r in want]
    keys = [r["key"] for r in store_lib.Store(str(grown)).all_records()]
    assert len(keys) == len(set(keys)) == 2


def test_brought_base_model_is_fixed_as_it_is(tmp_path, base_dir):
    """``pair.base`` (``dlfix study --base``): a training workdir or Keras
    .h5 is fixed without training anything; its content is part of the
    cells' identity."""
    trained = runner.run_study(tiny_config(["fake_vmap"], num_seeds=1),
                               str(_workdir(tmp_path / "a", base_dir)))
    wd = tmp_path / "brought"
    c = runner.with_base(tiny_config(["fake_vmap"], num_seeds=1),
                            str(base_dir / "base" / "digits_lenet5"))
    brought = runner.run_study(c, str(wd))
    assert not (wd / "base").exists()  # nothing trained
    assert brought[0]["metrics"]["acc"] == trained[0]["metrics"]["acc"]
    assert brought[0]["variant"] != trained[0]["variant"]
    two = tiny_config(["fake_vmap"])
    two.pairs.other = two.pairs.digits_lenet5
    with pytest.raises(ValueError, match="one pair"):
        runner.with_base(two, "x.h5")


def test_artifact_study_config_points_at_the_study_model():
    from experiments.configs import study_mnist_artifact
    c = study_mnist_artifact.get_config()
    assert c.pairs.mnist_lenet5.base.endswith(
        os.path.join("fixingstudy", "mnist_lenet5_original.h5"))
    for name in fixers.names():
        assert name in c.fixers


def test_ensembles_refuse_a_streamed_test_split_before_fixing(
        tmp_path, base_dir, monkeypatch):
    """Ensembles read the test split whole. With a streamed one (ImageNet's
    kind) the study stops with an error naming the cause and the way out
    before the approach that wants ensembles is fixed, and writes none of
    its records; an approach without ensembles is evaluated streamed."""
    import dataclasses
    calls = []

    def counted(key, problem, config):
        calls.append(1)
        return _perturb(key, problem, config)

    real = runner._load_pair

    def streamed_pair(*a, **kw):
        model, variables, dataset, problem = real(*a, **kw)
        test = dataset.test

        class Stream:  # no ``x``: a streamed split
            def __len__(self):
                return len(test)

            def __iter__(self):
                for i in range(0, len(test), 64):
                    yield test.take(slice(i, i + 64))

        return (model, variables, dataclasses.replace(dataset, test=Stream()),
                problem)

    monkeypatch.setattr(runner, "_load_pair", streamed_pair)
    spec = fixers_base.spec("fake_counted", counted, level="model",
                            paper="fake (test)", default_config=_cfg(),
                            vmappable=False, abbrev="FC")
    with fixers_base.FIXERS.temporary(fake_counted=spec):
        wd = _workdir(tmp_path, base_dir)
        c = tiny_config(["fake_seq", "fake_counted"], num_seeds=1)
        c.ensembles = "NO,SV"
        c.ensemble_approaches = "fake_counted"
        with pytest.raises(ValueError, match=r"ensembles need the test split "
                           r"in memory; digits's is streamed \(turn them off "
                           r"with --config.ensembles=\)"):
            runner.run_study(c, str(wd))
        assert not calls
        recs = store_lib.Store(str(wd)).all_records()
        assert [r["approach"] for r in recs] == ["fake_seq"]
        assert recs[0]["status"] == "ok" and recs[0]["metrics"]["acc"] > 0
