"""experiments/fix.py on the embedded digits with tiny budgets."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dlfix_jax import fixers
from dlfix_jax.training import checkpoint
from experiments import fix as fix_cli
from experiments.configs import digits_lenet5

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
    c = digits_lenet5.get_config()
    c.train.epochs = 3
    return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fix_cli"))


def test_ra_two_seeds_writes_models_and_metrics(workdir):
    status, m = fix_cli.run(_config(), "ra", 2, workdir,
                            overrides=["num_passing=50", "margin=0.05",
                                       "slack_penalty=0"])
    assert status == 0
    path = os.path.join(workdir, "ra", "metrics.json")
    with open(path) as f:
        saved = json.load(f)
    assert saved["status"] == "ok" and len(saved["seeds"]) == 2
    assert saved["backend"] == jax.default_backend()
    assert saved["fixer_config"]["num_passing"] == 50
    assert saved["fixer_config"]["margin"] == 0.05
    assert saved["orig"]["repair_failing"] > 0
    for rec in saved["seeds"]:
        assert rec["status"] == "ok"
        assert rec["repair_rr"] == 100.0  # hard RA repairs every failing input
        assert 0.0 <= rec["nfr"] <= 100.0 and rec["time_s"] > 0
    v = checkpoint.load_variables(os.path.join(workdir, "ra", "seed0",
                                               "variables.msgpack"))
    assert np.isfinite(np.asarray(v["params"]["dense3"]["kernel"])).all()


def test_rerun_with_fewer_seeds_leaves_no_stale_models(workdir):
    """Issue 11 item 11: a rerun with fewer seeds removes the old seed
    directories, so what is on disk matches the new metrics.json."""
    status, _ = fix_cli.run(_config(), "ra", 2, workdir,
                            overrides=["num_passing=50", "margin=0.05"])
    assert status == 0
    assert os.path.isdir(os.path.join(workdir, "ra", "seed1"))
    status, m = fix_cli.run(_config(), "ra", 1, workdir,
                            overrides=["num_passing=50"])
    assert status == 0 and len(m["seeds"]) == 1
    assert sorted(p for p in os.listdir(os.path.join(workdir, "ra"))
                  if p.startswith("seed")) == ["seed0"]


def test_apricot_tiny_budget(workdir):
    status, m = fix_cli.run(_config(), "apricot", 1, workdir, overrides=[
        "num_rdlms=3", "rdlm_per_class=20", "rdlm_epochs=2", "rdlm_batch_size=50",
        "retrain_epochs=0.05", "max_passes=1"])
    assert status == 0
    rec = m["seeds"][0]
    assert rec["status"] == "ok" and rec["info"]["num_rdlms"] == 3
    assert os.path.exists(os.path.join(workdir, "apricot", "seed0",
                                       "variables.msgpack"))


def test_unadaptable_exits_with_reason(workdir, monkeypatch, capsys):
    spec = fixers.get("ra")
    fake = dataclasses.replace(spec, applicable=lambda info: "not piecewise")
    monkeypatch.setattr(fixers, "get", lambda name: fake)
    status, m = fix_cli.run(_config(), "ra", 1, workdir)
    assert status == fix_cli.EXIT_UNADAPTABLE and m == {}
    assert "not piecewise" in capsys.readouterr().err
    with open(os.path.join(workdir, "ra", "metrics.json")) as f:
        assert json.load(f)["status"] == "unadaptable"


def test_bad_override_key_raises():
    cfg = fixers.get("ra").config()
    with pytest.raises(KeyError, match="no key"):
        fix_cli.apply_overrides(cfg, ["nope=1"])
    fix_cli.apply_overrides(cfg, ["num_passing=7", "norm=linf"])
    assert (cfg.num_passing, cfg.norm) == (7, "linf")


def test_command_line(workdir):
    r = subprocess.run(
        [sys.executable, "-m", "experiments.fix",
         "--config=experiments/configs/digits_lenet5.py",
         "--config.train.epochs=3", "--approach=ra", "--seeds=1",
         f"--workdir={workdir}", "--fixer=num_passing=20"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ra on digits/lenet5 x1: status ok" in r.stdout


def test_time_budget_turns_an_overlong_fix_into_a_timeout(workdir):
    """Issue 11 item 1: ``fix`` has a per-seed time budget, so no fixer can
    run unbounded from the command line."""
    status, m = fix_cli.run(_config(), "apricot", 1, workdir, overrides=[
        "num_rdlms=3", "rdlm_per_class=20", "rdlm_epochs=50",
        "max_passes=10"], time_budget_s=0.5)
    assert status != 0
    rec = m["seeds"][0]
    assert rec["status"] == "failure" and "timeout" in rec["reason"]
    with pytest.raises(ValueError, match="time budget"):
        fix_cli.run(_config(), "ra", 1, workdir, time_budget_s=-1)
