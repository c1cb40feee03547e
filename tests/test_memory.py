"""Optimizer-state accounting: hand counts and the paper-scale targets."""

import json
import math
import re
import shlex
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest

import galore_optax
from galore_optax import galore_adamw
from galore_optax import galore_adamw_8bit
from galore_optax import memory
from galore_optax import targets

BLOCK = 256


def _q8(n):
  """Bytes of one 8-bit quantised leaf of n values: codes + float32 absmax."""
  return n + 4 * math.ceil(n / BLOCK)


def _q4(n):
  """Bytes of one int4 projector factor of n values: two codes a byte, a
  float32 scale and a uint8 zero point per group of 256 values."""
  return n // 2 + 5 * math.ceil(n / BLOCK)


def _hand_count_7b(projector: str) -> int:
  d, f, layers, vocab, r = 4096, 11008, 32, 32000, 1024
  # Target matrices (Flax kernels are (in, out)); "std" keeps the larger side.
  attn_low, attn_proj = d * r, r * d            # (4096, 4096): right factor
  mlp_low, mlp_proj = r * f, d * r              # gate/up (4096, 11008): left
  down_low, down_proj = f * r, r * d            # down (11008, 4096): right
  lows = [attn_low] * 4 + [mlp_low] * 2 + [down_low]
  projs = [attn_proj] * 4 + [mlp_proj] * 2 + [down_proj]
  per_proj = {"float32": lambda n: 4 * n, "bfloat16": lambda n: 2 * n,
              "int8": _q8, "int4": _q4}[projector]
  per_layer = sum(2 * _q8(n) for n in lows) + sum(per_proj(n) for n in projs)
  per_layer += 2 * 2 * _q8(d)  # two norms, mu and nu, 4096 >= min_size
  rest = 2 * 2 * _q8(vocab * d) + 2 * _q8(d)  # embedding, head, final norm
  counts = 3 * 4  # int32 counts: GaLoreState and the two Adam states
  return layers * per_layer + rest + counts


PARAMS_7B = memory.llama_abstract_params(memory.LLAMA_SHAPES["7b"],
                                         jnp.bfloat16)


def _bytes(tx):
  return memory.optimizer_state_bytes(tx, PARAMS_7B).total


def test_7b_galore_adamw_8bit_matches_hand_count_and_targets():
  adamw = _bytes(optax.adamw(1e-3))
  assert adamw == 2 * 2 * 6_738_415_616 + 4  # bf16 mu and nu, int32 count
  for projector, limit in (("bfloat16", 0.215), ("int8", 0.18),
                           ("int4", 0.16)):
    ours = _bytes(galore_adamw_8bit(1e-3, rank=1024,
                                    target_modules=["attn", "mlp"],
                                    projector_dtype=projector))
    assert ours == _hand_count_7b(projector)
    assert ours / adamw <= limit, (projector, ours / adamw)


def test_per_leaf_breakdown_sums_to_total():
  params = {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32),
            "b": jax.ShapeDtypeStruct((32,), jnp.float32)}
  out = memory.optimizer_state_bytes(optax.adam(1e-3), params)
  assert out.total == sum(out.per_leaf.values()) == 2 * 4 * (64 * 32 + 32) + 4
  assert out.per_leaf["0.mu.w"] == 64 * 32 * 4


def test_command_prints_table(capsys):
  rows = memory.main(["--models", "60m", "--dtypes", "bfloat16"])
  printed = capsys.readouterr().out
  assert "| 60m | bfloat16 | 128 | galore_adamw_8bit |" in printed
  assert {r["optimizer"] for r in rows} >= {
      "optax.adamw", "adamw_8bit", "optax.contrib.galore", "galore_adamw",
      "galore_adamw_8bit"}


# -- the report: presets, config.json, flags, per-layer columns ---------------

SMALL_GQA_TIED = {
    "model_type": "llama", "vocab_size": 384, "hidden_size": 64,
    "intermediate_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_hidden_layers": 2, "head_dim": 8,
    "tie_word_embeddings": True,
}


def _named_shapes(tree):
  return {targets.path_to_name(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("model", ["tiny", "60m", "config"])
def test_abstract_params_match_the_example_model(model, tmp_path):
  from examples import llama  # pylint: disable=import-outside-toplevel
  if model == "config":
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SMALL_GQA_TIED))
    shape = memory.llama_shape_from_config(memory.read_config_json(tmp_path))
    config = llama.get_config(str(path))
  else:
    shape, config = memory.LLAMA_SHAPES[model], llama.get_config(model)
  example = llama.get_params(llama.abstract_model(config))
  assert _named_shapes(memory.llama_abstract_params(shape)) == _named_shapes(
      example)


def test_report_flags_config_and_per_layer_columns(capsys, tmp_path):
  config = tmp_path / "small" / "config.json"
  config.parent.mkdir()
  config.write_text(json.dumps(SMALL_GQA_TIED))
  rows = memory.main([
      "--models", "tiny", "--config", str(config), "--rank", "8",
      "--target-modules", "attn", "--param-dtype", "float32",
      "--projector-dtype", "bfloat16,int8",
      "--optimizers", "optax.adamw,galore_adamw_8bit", "--per-layer"])
  printed = capsys.readouterr().out
  assert {r["model"] for r in rows} == {"tiny", "small"}
  assert {r["rank"] for r in rows} == {8}
  assert [(r["optimizer"], r["projector"]) for r in rows[:3]] == [
      ("optax.adamw", "-"), ("galore_adamw_8bit", "bfloat16"),
      ("galore_adamw_8bit", "int8")]
  params = memory.llama_abstract_params(memory.LLAMA_SHAPES["tiny"],
                                        jnp.float32)
  expected = memory.optimizer_state_bytes(galore_adamw_8bit(
      1e-3, rank=8, target_modules=["attn"], projector_dtype="int8"), params)
  assert rows[2]["state_bytes"] == expected.total
  # tiny's largest leaf is an MLP kernel (256 x 688), not the embedding.
  assert rows[0]["layerwise_grad_bytes"] == 256 * 688 * 4
  assert rows[0]["grad_bytes"] == rows[0]["param_bytes"] == 4 * sum(
      math.prod(x.shape) for x in jax.tree.leaves(params))
  assert "| per-layer grads MiB | per-layer total MiB |" in printed
  assert "| tiny | float32 | 8 | galore_adamw_8bit | int8 |" in printed
  assert "| small | float32 | 8 | optax.adamw | - |" in printed
  assert memory.explanation(per_layer=True) in printed
  assert "benchmarks/memory.py" in printed


def test_default_ranks_and_columns_without_per_layer(capsys, tmp_path):
  config = tmp_path / "gqa.json"
  config.write_text(json.dumps(SMALL_GQA_TIED))
  rows = memory.main(["--models", "tiny", "--config", str(config),
                      "--param-dtype", "bfloat16", "--optimizers",
                      "optax.adamw"])
  printed = capsys.readouterr().out
  assert {r["model"]: r["rank"] for r in rows} == {"tiny": 64, "gqa": 16}
  assert "per-layer" not in printed.splitlines()[0]
  assert memory.explanation(per_layer=False) in printed


def test_contrib_state_is_reverse_std_with_a_parameter_dtype_projector():
  # What the report's explanation says of optax.contrib.galore.
  params = memory.llama_abstract_params(memory.LLAMA_SHAPES["60m"])
  contrib = memory.comparison_optimizers(128)["optax.contrib.galore"]
  like_contrib = galore_adamw(1e-3, rank=128, target_modules=["attn", "mlp"],
                              proj_type="reverse_std",
                              projector_dtype="bfloat16")
  assert _bytes_of(contrib, params) == _bytes_of(like_contrib, params)
  assert _bytes_of(contrib, params) < _bytes_of(
      memory.comparison_optimizers(128)["galore_adamw"], params)


def _bytes_of(tx, params):
  return memory.optimizer_state_bytes(tx, params).total


def test_optimizer_state_bytes_is_exported():
  assert galore_optax.optimizer_state_bytes is memory.optimizer_state_bytes
  assert "optimizer_state_bytes" in galore_optax.__all__


def test_readme_shows_the_commands_output(capsys):
  readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
  section = re.search(r"## Memory report\n(.*?)\n## ", readme, re.S).group(1)
  command = re.search(r"```bash\npython -m galore_optax.memory (.*?)\n```",
                      section).group(1)
  table = [line for line in section.splitlines() if line.startswith("|")]
  memory.main(shlex.split(command))
  printed = capsys.readouterr().out
  assert table == [line for line in printed.splitlines()
                   if line.startswith("|")]
