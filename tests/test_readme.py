"""The README's quick start runs as written and trains."""

import pathlib
import re

import jax
import jax.numpy as jnp

README = pathlib.Path(__file__).parent.parent / "README.md"


def _run_section_code(heading: str) -> dict:
  """Runs the first python block after ``heading``; returns its namespace."""
  block = re.search(re.escape(heading) + r".*?```python\n(.*?)```",
                    README.read_text(), re.S).group(1)
  namespace = {}
  exec(compile(block, f"README {heading}", "exec"), namespace)  # pylint: disable=exec-used
  return namespace


def _regression_data() -> tuple[jax.Array, jax.Array]:
  x = jax.random.normal(jax.random.key(0), (32, 64))
  return x, jnp.tanh(x[:, ::-1])


def test_quick_start_runs_and_learns():
  namespace = _run_section_code("## Quick start")
  x, y = _regression_data()
  step = namespace["train_step"]
  losses = [float(step(namespace["model"], namespace["optimizer"], x, y))
            for _ in range(150)]
  assert losses[-1] < 0.5 * losses[0]


def test_int8_weights_example_runs_and_learns():
  namespace = _run_section_code("## 8-bit weights")
  wq = namespace["wq"]
  stored, opt_state = namespace["stored"], namespace["opt_state"]
  assert wq.is_quantized(stored["self_attn"]["kernel"].get_value())
  x, y = _regression_data()
  losses = []
  for t in range(150):
    stored, opt_state, loss = namespace["train_step"](stored, opt_state, x, y,
                                                      t)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0]
  assert namespace["train_step"]._cache_size() == 1


def test_per_layer_example_runs_and_learns():
  namespace = _run_section_code("## Per-layer mode")
  step = namespace["step"]
  params, opt_state = namespace["params"], namespace["opt_state"]
  x, y = _regression_data()
  losses = []
  for _ in range(150):
    params, opt_state, loss = step(params, opt_state, (x, y))
    losses.append(float(loss))
  assert losses[-1] < 0.1 * losses[0]
  assert step._cache_size() == 1
