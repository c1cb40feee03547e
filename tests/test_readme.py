"""The README's examples run as written and train; its guarantees cite tests."""

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


def test_every_guarantee_names_tests_that_exist():
  """Each promise of "Failure modes and guarantees" cites a test by
  ``file::name`` (or an abbreviation the section defines), and each cited
  test exists."""
  section = README.read_text().split("## Failure modes and guarantees")[1]
  section = section.split("\n## ")[0]
  short = _abbreviations(section)
  promises = section.split("What it does not promise")[0]
  bullets = re.split(r"\n- ", promises)[1:]
  assert len(bullets) >= 10
  tests_dir = README.parent / "tests"
  for bullet in bullets:
    cited = re.findall(r"`((?:tests/)?[\w/]+(?:\.py)?)::(\w+)", bullet)
    assert cited, f"no test named for: {bullet[:80]}"
    for where, name in cited:
      path = README.parent / short.get(where, where)
      assert path.exists() and path.parent == tests_dir, where
      assert f"def {name}(" in path.read_text(), f"{where}::{name}"


def _abbreviations(section: str) -> dict[str, str]:
  """``{"R": "tests/test_reliability.py", ...}`` from the section's intro."""
  intro = section.split("\n- ")[0]
  return dict(re.findall(r"`(\w+)`\s+(?:is\s+)?`(tests/\w+\.py)`", intro))
