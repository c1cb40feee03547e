"""Sharded parameters on 8 simulated devices give single-device results.

Runs ``tests/_sharded_check.py`` and ``tests/_sharded_stacked_check.py`` in
subprocesses, because the device count must be set before JAX initialises:
FSDP-style row and column sharding, tall, wide and stacked leaves, ``Auto``
and ``Explicit`` mesh axis types, exact and randomized projectors, the
project and reset moment policies, 8-bit states, int8 projectors, the lazy
refresh schedule with int4 projectors, and int8 weights updated with
stochastic rounding; and stacked ``(L, m, n)`` leaves sharded over every axis
and pair of axes, through the optimizers and the per-layer step.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parent.parent


def _run_check(script: str) -> str:
  # The checkout's root first on the path: a script's own directory replaces
  # the working directory there, which would import an installed copy.
  env = {**os.environ,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "PYTHONPATH": os.pathsep.join(
             [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
  out = subprocess.run([sys.executable, str(ROOT / "tests" / script)],
                       env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout + out.stderr
  return out.stdout


def test_sharded_equals_single_device():
  stdout = _run_check("_sharded_check.py")
  assert stdout.count("ok ") == 16, stdout


def test_stacked_leaves_every_sharding_equal_single_device():
  stdout = _run_check("_sharded_stacked_check.py")
  # 3 optimizers and 3 per-layer steps (the last: unrolled layers, fused,
  # kept residuals), each on Auto and Explicit axes.
  assert stdout.count("ok ") == 12, stdout
