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


def test_int8_weights_example_runs_and_learns():
  text = README.read_text()
  block = re.search(r"## 8-bit weights.*?```python\n(.*?)```", text,
                    re.S).group(1)
  namespace = {}
  exec(compile(block, "README int8 weights", "exec"), namespace)  # pylint: disable=exec-used
  wq = namespace["wq"]
  stored, opt_state = namespace["stored"], namespace["opt_state"]
  assert wq.is_quantized(stored["self_attn"]["kernel"].get_value())
  x = jax.random.normal(jax.random.key(0), (32, 64))
  y = jnp.tanh(x[:, ::-1])
  losses = []
  for t in range(150):
    stored, opt_state, loss = namespace["train_step"](stored, opt_state, x, y,
                                                      t)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0]
  assert namespace["train_step"]._cache_size() == 1


def test_per_layer_example_runs_and_learns():
  text = README.read_text()
  block = re.search(r"## Per-layer mode.*?```python\n(.*?)```", text,
                    re.S).group(1)
  namespace = {}
  exec(compile(block, "README per-layer mode", "exec"), namespace)  # pylint: disable=exec-used
  step = namespace["step"]
  params, opt_state = namespace["params"], namespace["opt_state"]
  x = jax.random.normal(jax.random.key(0), (32, 64))
  y = jnp.tanh(x[:, ::-1])
  losses = []
  for _ in range(150):
    params, opt_state, loss = step(params, opt_state, (x, y))
    losses.append(float(loss))
  assert losses[-1] < 0.1 * losses[0]
  assert step._cache_size() == 1
