"""Packaging: the examples installed as ``galore_optax_examples``.

``pyproject.toml`` lists its packages explicitly (setuptools' finder cannot
install ``examples/`` under another name), so a check here that the list
names every package of the source tree; and, when the project is installed
(``pip install -e ".[examples]"``, as CI does), the example model imported
and built from a directory outside the repository.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")


def setuptools_config():
  with (REPO / "pyproject.toml").open("rb") as f:
    return tomllib.load(f)["tool"]["setuptools"]


def test_every_package_of_the_source_tree_is_listed():
  config = setuptools_config()
  on_disk = {".".join(p.parent.relative_to(REPO).parts)
             for p in (REPO / "galore_optax").rglob("__init__.py")}
  assert on_disk <= set(config["packages"]), on_disk - set(config["packages"])
  assert "galore_optax_examples" in config["packages"]
  assert config["package-dir"] == {"galore_optax_examples": "examples"}


def run_outside_repo(code, tmp_path):
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                        capture_output=True, text=True, cwd=tmp_path,
                        check=False)


def test_installed_examples_import_and_build_outside_the_repository(tmp_path):
  found = run_outside_repo("""
      import importlib.util
      print(importlib.util.find_spec("galore_optax_examples") is not None)
      """, tmp_path)
  assert found.returncode == 0, found.stderr
  if found.stdout.strip() != "True":
    pytest.skip("galore_optax_examples is not installed (pip install -e "
                "'.[examples]' installs it)")
  result = run_outside_repo("""
      import transformers
      from galore_optax_examples import data, llama
      config = transformers.LlamaConfig(
          vocab_size=64, hidden_size=16, intermediate_size=32,
          num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1,
          head_dim=8, max_position_embeddings=16)
      model = llama.build_model(config, rngs=0)
      print(llama.param_count(llama.get_params(model)), data.__name__)
      """, tmp_path)
  assert result.returncode == 0, result.stderr
  count, data_name = result.stdout.split()
  assert int(count) > 0
  assert data_name == "galore_optax_examples.data"
