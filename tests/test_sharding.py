"""The seed axis sharded over 8 fake CPU devices equals one device, bit for
bit (a subprocess: the device count is fixed when JAX starts)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = """
import jax, numpy as np
from dlfix_jax import seed_axis, models, predict
assert jax.local_device_count() == 8, jax.local_device_count()
m = models.get("lenet5")
st = seed_axis.stack_variables([m.init(jax.random.key(i)) for i in range(5)])
x = np.asarray(jax.random.normal(jax.random.key(9), (32, 28, 28, 1)))
fn = predict.model_logits(m)
a = seed_axis.map_seeds(fn, st, x, strategy="sharded")
b = seed_axis.map_seeds(fn, st, x, strategy="lax_map")
assert a.shape == (5, 32, 10), a.shape
assert np.array_equal(np.asarray(a), np.asarray(b))
print("ok")
"""


def test_sharded_seed_axis_is_bit_identical_to_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
