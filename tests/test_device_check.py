"""``benchmarks/device_check.sh --quick`` runs on CPU and writes its JSON:
the accelerator check is run rarely (only when a GPU is lent), so a broken
script would otherwise go unnoticed until then."""

import json
import os
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_check_quick_writes_every_section(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PY=sys.executable)
    proc = subprocess.run(["bash", "benchmarks/device_check.sh", "--quick"],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "device_check.json").read_text())
    assert out["complete"] is True
    for key in ("train", "seed_axis", "pgd", "arachne",
                "apricot_rdlm_epoch", "fix_seeds", "population",
                "tail_fitness"):
        assert out[key], key
    assert {r["strategy"] for r in out["fix_seeds"]} == {"vmap",
                                                         "sequential"}
    assert {(r["case"], r["strategy"]) for r in out["population"]} == {
        (c, s) for c in ("logits", "hidden") for s in ("vmap", "lax_map")}
    assert all(r[k] > 0 for r in out["population"]
               for k in ("evals_per_s",))
    assert [r["rule_picks"] for r in out["tail_fitness"]] == [
        "low_rank", "low_rank", "full", "full"]
    assert all(r["low_rank_ms"] > 0 and r["full_ms"] > 0
               and r["max_rel_diff"] < 1e-4 for r in out["tail_fitness"])


def test_device_check_cut_short_keeps_finished_sections(tmp_path):
    """A run stopped after its first section (as device_check.sh's time
    limit would) leaves valid JSON with that section, marked incomplete."""
    path = tmp_path / "sub" / "device_check.json"
    err = tmp_path / "stderr.txt"
    seen = False
    with open(err, "w") as err_f, subprocess.Popen(
            [sys.executable, "-m", "benchmarks.device_check", "--quick",
             f"--out={path}"], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=err_f, text=True) as proc:
        watchdog = threading.Timer(600, proc.kill)
        watchdog.start()
        try:
            for line in proc.stdout:
                if line.startswith("pgd done"):
                    seen = True
                    break
        finally:
            watchdog.cancel()
            proc.kill()
    assert seen, err.read_text()[-2000:]
    out = json.loads(path.read_text())
    assert out["complete"] is False
    assert out["pgd"] and out["total_s"] > 0
    assert "train" not in out and "tail_fitness" not in out
