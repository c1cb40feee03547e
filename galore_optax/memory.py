"""Optimizer-state memory accounting, without allocating anything.

``optimizer_state_bytes(tx, params)`` sizes the state that ``tx.init(params)``
would create, by abstract evaluation (``jax.eval_shape``), so ``params`` may
be a tree of ``jax.ShapeDtypeStruct``s for a model that does not fit here.

``python -m galore_optax.memory`` prints the table for the paper's LLaMA shapes
(60M to 7B) recorded in ``BENCHMARKS.md``.

References:
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
  Projection", ICML 2024, arXiv 2403.03507 (Table 1 shapes).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.contrib

from galore_optax import aliases
from galore_optax import targets


class StateBytes(NamedTuple):
  """Bytes of an optimizer state.

  Attributes:
    total: bytes of every array in the state.
    per_leaf: bytes per state leaf, keyed by the leaf's dotted path (e.g.
      ``0.inner_states.galore.inner_state.projectors.w.right``).
  """

  total: int
  per_leaf: dict[str, int]


def optimizer_state_bytes(tx: optax.GradientTransformation,
                          params: optax.Params) -> StateBytes:
  """Sizes ``tx.init(params)`` without allocating it.

  Args:
    tx: any optax transformation.
    params: arrays or ``jax.ShapeDtypeStruct``s.

  Returns:
    A ``StateBytes`` with the total and the per-leaf bytes.
  """
  abstract = jax.eval_shape(tx.init, params)
  per_leaf = {
      targets.path_to_name(path): math.prod(leaf.shape) * leaf.dtype.itemsize
      for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
  }
  return StateBytes(sum(per_leaf.values()), per_leaf)


class LlamaShape(NamedTuple):
  """A LLaMA configuration's matrix shapes (the paper's Table 1 models)."""

  d_model: int
  ffn: int
  heads: int
  layers: int
  vocab: int = 32000


LLAMA_SHAPES = {
    "60m": LlamaShape(512, 1376, 8, 8),
    "130m": LlamaShape(768, 2048, 12, 12),
    "350m": LlamaShape(1024, 2736, 16, 24),
    "1b": LlamaShape(2048, 5461, 32, 24),
    "7b": LlamaShape(4096, 11008, 32, 32),
}

# The rank the paper uses for each size.
PAPER_RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}


def llama_abstract_params(shape: LlamaShape,
                          dtype: jnp.dtype = jnp.bfloat16) -> dict:
  """Abstract LLaMA parameters with Hugging Face-like names (Flax layout).

  Args:
    shape: the model's dimensions.
    dtype: parameter dtype.

  Returns:
    A nested dict of ``jax.ShapeDtypeStruct`` (kernels are ``(in, out)``).
  """
  d, f = shape.d_model, shape.ffn
  s = lambda *dims: jax.ShapeDtypeStruct(dims, dtype)
  layer = {
      "self_attn": {f"{p}_proj": {"kernel": s(d, d)} for p in "qkvo"},
      "mlp": {"gate_proj": {"kernel": s(d, f)},
              "up_proj": {"kernel": s(d, f)},
              "down_proj": {"kernel": s(f, d)}},
      "input_layernorm": {"scale": s(d)},
      "post_attention_layernorm": {"scale": s(d)},
  }
  return {
      "model": {
          "embed_tokens": {"embedding": s(shape.vocab, d)},
          "layers": {str(i): layer for i in range(shape.layers)},
          "norm": {"scale": s(d)},
      },
      "lm_head": {"kernel": s(d, shape.vocab)},
  }


def comparison_optimizers(rank: int,
                          target_modules: targets.TargetModules = (
                              "attn", "mlp")
                          ) -> dict[str, optax.GradientTransformation]:
  """The optimizers of the memory table, all with the same targets.

  Args:
    rank: GaLore rank.
    target_modules: projected leaves (``optax.contrib.galore`` gets the same
      ones through ``optax.partition``).

  Returns:
    Name -> transformation.
  """
  target_modules = list(target_modules)
  contrib = optax.partition(
      {targets.GALORE_LABEL: optax.contrib.scale_by_galore(rank=rank),
       targets.FULL_RANK_LABEL: optax.scale_by_adam()},
      targets.galore_labels(target_modules))
  common = dict(rank=rank, target_modules=target_modules)
  return {
      "optax.adamw": optax.adamw(1e-3),
      "adamw_8bit": aliases.adamw_8bit(1e-3),
      "optax.contrib.galore": contrib,
      "galore_adamw": aliases.galore_adamw(1e-3, **common),
      "galore_adamw_8bit": aliases.galore_adamw_8bit(1e-3, **common),
      "galore_adamw_8bit (bf16 proj)": aliases.galore_adamw_8bit(
          1e-3, projector_dtype="bfloat16", **common),
      "galore_adamw_8bit (int8 proj)": aliases.galore_adamw_8bit(
          1e-3, projector_dtype="int8", **common),
  }


def memory_table(models: Sequence[str], dtypes: Sequence[str]) -> list[dict]:
  """Rows of optimizer-state bytes for each model, dtype and optimizer."""
  rows = []
  for model in models:
    rank = PAPER_RANKS[model]
    for dtype in dtypes:
      params = llama_abstract_params(LLAMA_SHAPES[model], jnp.dtype(dtype))
      for name, tx in comparison_optimizers(rank).items():
        rows.append({"model": model, "dtype": dtype, "rank": rank,
                     "optimizer": name,
                     "bytes": optimizer_state_bytes(tx, params).total})
  return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
  """Prints the optimizer-state table; returns its rows."""
  parser = argparse.ArgumentParser(
      prog="python -m galore_optax.memory",
      description="Optimizer-state bytes for LLaMA shapes (nothing is "
      "allocated).")
  parser.add_argument("--models", default=",".join(LLAMA_SHAPES))
  parser.add_argument("--dtypes", default="bfloat16,float32")
  args = parser.parse_args(argv)
  rows = memory_table(args.models.split(","), args.dtypes.split(","))
  print("| model | param dtype | rank | optimizer | state GiB | % of optax.adamw |")
  print("|---|---|---|---|---:|---:|")
  base = {}
  for row in rows:
    key = (row["model"], row["dtype"])
    if row["optimizer"] == "optax.adamw":
      base[key] = row["bytes"]
    print(f"| {row['model']} | {row['dtype']} | {row['rank']} | "
          f"{row['optimizer']} | {row['bytes'] / 2**30:.3f} | "
          f"{100 * row['bytes'] / base[key]:.1f} |")
  return rows


if __name__ == "__main__":
  main()
