"""Optimizer-state accounting: hand counts and the paper-scale targets."""

import math

import jax
import jax.numpy as jnp
import optax

from galore_optax import galore_adamw_8bit
from galore_optax import memory

BLOCK = 256


def _q8(n):
  """Bytes of one 8-bit quantised leaf of n values: codes + float32 absmax."""
  return n + 4 * math.ceil(n / BLOCK)


def _hand_count_7b(projector: str) -> int:
  d, f, layers, vocab, r = 4096, 11008, 32, 32000, 1024
  # Target matrices (Flax kernels are (in, out)); "std" keeps the larger side.
  attn_low, attn_proj = d * r, r * d            # (4096, 4096): right factor
  mlp_low, mlp_proj = r * f, d * r              # gate/up (4096, 11008): left
  down_low, down_proj = f * r, r * d            # down (11008, 4096): right
  lows = [attn_low] * 4 + [mlp_low] * 2 + [down_low]
  projs = [attn_proj] * 4 + [mlp_proj] * 2 + [down_proj]
  per_proj = {"float32": lambda n: 4 * n, "bfloat16": lambda n: 2 * n,
              "int8": _q8}[projector]
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
  for projector, limit in (("bfloat16", 0.215), ("int8", 0.18)):
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
