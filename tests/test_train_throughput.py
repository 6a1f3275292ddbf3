"""``benchmarks.train_throughput``'s rate arithmetic and flag checks (the
measurements themselves are benchmarks, not tests)."""

import os
import subprocess
import sys

import pytest

from benchmarks import train_throughput as tt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_steady_rate_spans_first_to_last_stamp_and_whole_the_call():
    # 4 steps of 10 examples stamped at 2, 3, 5, 6 s; call from 0 to 9 s.
    r = tt._rates(0.0, [2.0, 3.0, 5.0, 6.0], 9.0, 10, 4)
    assert r["steady"] == pytest.approx(3 * 10 / 4.0)
    assert r["whole"] == pytest.approx(4 * 10 / 9.0)


@pytest.mark.parametrize("stamps,steps", [([1.0, 2.0], 3), ([1.0], 1)])
def test_rates_refuse_missing_stamps_or_one_step(stamps, steps):
    with pytest.raises(ValueError, match="step stamps"):
        tt._rates(0.0, stamps, 3.0, 10, steps)


@pytest.mark.parametrize("args,message", [
    (["--single=vgg16,kera"], "unknown framework 'kera'"),
    (["--single=vgg16"], "expected 'model,framework'"),
    (["--models=resnet"], "unknown model 'resnet'"),
    (["--models=lenet5", "--lenet5_steps=1"], "must be at least 2"),
])
def test_bad_flags_fail_with_one_line_before_measuring(args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_throughput", *args,
         "--out="], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and "round 1" not in proc.stdout
