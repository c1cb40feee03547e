"""The README's quick start runs as written and trains."""

import pathlib
import re

import jax
import jax.numpy as jnp

README = pathlib.Path(__file__).parent.parent / "README.md"


def test_quick_start_runs_and_learns():
  text = README.read_text()
  block = re.search(r"## Quick start.*?```python\n(.*?)```", text, re.S).group(1)
  namespace = {}
  exec(compile(block, "README quick start", "exec"), namespace)  # pylint: disable=exec-used
  x = jax.random.normal(jax.random.key(0), (32, 64))
  y = jnp.tanh(x[:, ::-1])
  step = namespace["train_step"]
  losses = [float(step(namespace["model"], namespace["optimizer"], x, y))
            for _ in range(150)]
  assert losses[-1] < 0.5 * losses[0]
