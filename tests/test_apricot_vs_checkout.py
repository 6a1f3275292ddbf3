"""``benchmarks.apricot_vs_checkout``: its one-checkout measurement runs on
this checkout at a tiny size, and bad flags fail with one line."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.apricot_vs_checkout", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_single_measures_this_checkout():
    proc = _run(f"--single={ROOT}", "--k=2", "--per_class=13",
                "--epochs=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [ln for ln in proc.stdout.splitlines()
            if ln.startswith('{"result"')]
    res = json.loads(line[0])["result"]
    assert res["dlfix_jax"] == os.path.join(ROOT, "dlfix_jax",
                                            "__init__.py")
    # 130 images, batch 128: two steps an epoch (the last wraps around).
    assert res["batch"] == 128 and res["steps_per_model"] == 2
    assert res["examples_per_s"] > 0


@pytest.mark.parametrize("args,message", [
    ((), "--baseline is required"),
    (("--baseline=/nonexistent",), "no dlfix_jax/fixers/apricot.py"),
    (("--baseline=" + ROOT, "--epochs=0"), "must be positive"),
])
def test_bad_flags_fail_with_one_line(args, message):
    proc = _run(*args, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
