"""Sharded parameters on 8 simulated devices give single-device results.

Runs ``tests/_sharded_check.py`` in a subprocess, because the device count
must be set before JAX initialises: FSDP-style row and column sharding, tall,
wide and stacked leaves, ``Auto`` and ``Explicit`` mesh axis types, exact and
randomized projectors, the project and reset moment policies, 8-bit states,
int8 projectors, and int8 weights updated with stochastic rounding.
"""

import os
import pathlib
import subprocess
import sys


def test_sharded_equals_single_device():
  script = pathlib.Path(__file__).parent / "_sharded_check.py"
  env = {**os.environ,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  out = subprocess.run([sys.executable, str(script)], env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout + out.stderr
  assert out.stdout.count("ok ") == 16, out.stdout
