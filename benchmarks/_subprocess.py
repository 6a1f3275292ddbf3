"""One measurement in a fresh Python process, so that one framework's
thread pools and imports (TensorFlow's oneDNN/OpenMP threads, XLA's) cannot
slow down another's; shared by ``train_throughput`` and ``conv_kernels``."""

import json
import os
import subprocess
import sys


def run_single(module: str, args: list, key: str, timeout_s: float = 3600):
    """Runs ``python -m module *args`` and returns ``obj[key]`` of the JSON
    object ``{"key": ...}`` it prints on one stdout line; raises
    ``RuntimeError`` with the child's stderr tail when there is none, or
    when the child runs past ``timeout_s``."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    cmd = [sys.executable, "-m", module, *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env,
                             timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{module} {' '.join(args)} ran past "
                           f"{timeout_s:.0f} s") from None
    for line in out.stdout.splitlines():
        if line.startswith(f'{{"{key}"'):
            return json.loads(line)[key]
    raise RuntimeError(f"{module} {' '.join(args)} failed "
                       f"(exit {out.returncode}):\n{out.stderr[-3000:]}")
