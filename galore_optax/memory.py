"""The memory report: a LLaMA training step's bytes by optimizer, from shapes.

``python -m galore_optax.memory`` prints the table for LLaMA presets (the
paper's 60M to 7B, recorded in ``BENCHMARKS.md``, and the example's
``tiny``) or any Hugging Face ``config.json``, for a chosen rank, targets,
parameter and projector dtypes; ``--help`` lists the options. The sizes come
from ``galore_optax.accounting`` (``optimizer_state_bytes``, ``step_bytes``,
re-exported here). The presets here are the single source of the example's
(``examples/llama.py``).

References:
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
  Projection", ICML 2024, arXiv 2403.03507 (Table 1 shapes).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.contrib

from galore_optax import aliases
from galore_optax import cli
from galore_optax import projector_storage
from galore_optax import targets
from galore_optax._checks import check_positive_int
from galore_optax.accounting import StateBytes  # noqa: F401  (re-exported)
from galore_optax.accounting import StepBytes  # noqa: F401  (re-exported)
from galore_optax.accounting import optimizer_state_bytes
from galore_optax.accounting import step_bytes


class LlamaShape(NamedTuple):
  """A LLaMA configuration's matrix shapes.

  Attributes:
    d_model: the hidden size.
    ffn: the MLP's intermediate size.
    heads: attention heads.
    layers: decoder layers.
    vocab: the vocabulary size.
    kv_heads: key/value heads (grouped-query attention); None: ``heads``.
    head_dim: each head's size; None: ``d_model // heads``.
    tie_embeddings: whether the head reuses the embedding (no ``lm_head``).
  """

  d_model: int
  ffn: int
  heads: int
  layers: int
  vocab: int = 32000
  kv_heads: int | None = None
  head_dim: int | None = None
  tie_embeddings: bool = False


# ByT5's vocabulary: 3 special tokens + 256 bytes + 125 sentinel ids.
BYT5_VOCAB_SIZE = 384

LLAMA_SHAPES = {
    # The example's CPU-sized default, on the ByT5 byte vocabulary.
    "tiny": LlamaShape(256, 688, 4, 4, vocab=BYT5_VOCAB_SIZE),
    # The paper's Table 1 models.
    "60m": LlamaShape(512, 1376, 8, 8),
    "130m": LlamaShape(768, 2048, 12, 12),
    "350m": LlamaShape(1024, 2736, 16, 24),
    "1b": LlamaShape(2048, 5461, 32, 24),
    "7b": LlamaShape(4096, 11008, 32, 32),
}
PAPER_MODELS = ("60m", "130m", "350m", "1b", "7b")

# The rank the paper uses for each size (tiny: the example's default).
DEFAULT_RANKS = {"tiny": 64, "60m": 128, "130m": 256, "350m": 256, "1b": 512,
                 "7b": 1024}


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a Hugging Face ``config.json``.

  Args:
    path: the file, or a directory holding ``config.json``.

  Returns:
    The JSON object.

  Raises:
    ValueError: if the file cannot be read or is not a JSON object.
  """
  path = Path(path)
  if path.is_dir():
    path = path / "config.json"
  try:
    text = path.read_text()
  except (OSError, UnicodeDecodeError) as e:
    reason = getattr(e, "strerror", None) or str(e)
    raise ValueError(f"cannot read {str(path)!r}: {reason}") from None
  try:
    config = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from None
  if not isinstance(config, dict):
    raise ValueError(f"{str(path)!r} holds no JSON object.")
  return config


def llama_shape_from_config(config: Mapping[str, Any]) -> LlamaShape:
  """The shapes of a ``transformers.LlamaConfig``-style dict.

  Args:
    config: a ``config.json`` object with ``hidden_size``,
      ``intermediate_size``, ``num_attention_heads``, ``num_hidden_layers``
      and ``vocab_size``; ``num_key_value_heads``, ``head_dim`` and
      ``tie_word_embeddings`` are read when present.

  Returns:
    A ``LlamaShape``.

  Raises:
    ValueError: if a required field is missing or not a positive integer.
  """
  fields = ("hidden_size", "intermediate_size", "num_attention_heads",
            "num_hidden_layers", "vocab_size")
  missing = [f for f in fields if f not in config]
  if missing:
    raise ValueError(f"the config has no {', '.join(missing)}.")
  d_model, ffn, heads, layers, vocab = (
      check_positive_int(f, config[f]) for f in fields)
  optional = {}
  for field, name in (("num_key_value_heads", "kv_heads"),
                      ("head_dim", "head_dim")):
    if config.get(field) is not None:
      optional[name] = check_positive_int(field, config[field])
  return LlamaShape(d_model, ffn, heads, layers, vocab,
                    tie_embeddings=bool(config.get("tie_word_embeddings",
                                                   False)), **optional)


def llama_abstract_params(shape: LlamaShape,
                          dtype: jnp.dtype = jnp.bfloat16) -> dict:
  """Abstract LLaMA parameters with Hugging Face-like names (Flax layout).

  The tree of ``examples/llama.py``'s model (biases, which LLaMA does not
  use, are left out).

  Args:
    shape: the model's dimensions.
    dtype: parameter dtype.

  Returns:
    A nested dict of ``jax.ShapeDtypeStruct`` (kernels are ``(in, out)``).
  """
  d, f = shape.d_model, shape.ffn
  head_dim = shape.head_dim or d // shape.heads
  q_size = shape.heads * head_dim
  kv_size = (shape.kv_heads or shape.heads) * head_dim
  s = lambda *dims: jax.ShapeDtypeStruct(dims, dtype)
  layer = {
      "self_attn": {"q_proj": {"kernel": s(d, q_size)},
                    "k_proj": {"kernel": s(d, kv_size)},
                    "v_proj": {"kernel": s(d, kv_size)},
                    "o_proj": {"kernel": s(q_size, d)}},
      "mlp": {"gate_proj": {"kernel": s(d, f)},
              "up_proj": {"kernel": s(d, f)},
              "down_proj": {"kernel": s(f, d)}},
      "input_layernorm": {"scale": s(d)},
      "post_attention_layernorm": {"scale": s(d)},
  }
  params = {
      "model": {
          "embed_tokens": {"embedding": s(shape.vocab, d)},
          "layers": {str(i): layer for i in range(shape.layers)},
          "norm": {"scale": s(d)},
      },
  }
  if not shape.tie_embeddings:
    params["lm_head"] = {"kernel": s(d, shape.vocab)}
  return params


# The rows of the table; GaLore ones of ours get a row per projector dtype.
OPTIMIZERS = ("optax.adamw", "adamw_8bit", "optax.contrib.galore",
              "galore_adamw", "galore_adamw_8bit", "fira_adamw",
              "apollo_adamw", "apollo_mini", "apollo_mini_8bit")
PROJECTED_OPTIMIZERS = ("galore_adamw", "galore_adamw_8bit", "fira_adamw",
                        "apollo_adamw", "apollo_mini", "apollo_mini_8bit")
PARAM_DTYPES = ("float32", "bfloat16", "float16")


def comparison_optimizers(rank: int,
                          target_modules: targets.TargetModules = (
                              "attn", "mlp"),
                          projector_dtype: str = "float32"
                          ) -> dict[str, optax.GradientTransformation]:
  """The optimizers of the memory table, all with the same targets.

  Args:
    rank: GaLore rank.
    target_modules: projected leaves (``optax.contrib.galore`` gets the same
      ones through ``optax.partition``).
    projector_dtype: the projector storage of ``PROJECTED_OPTIMIZERS``
      (``optax.contrib.galore`` keeps its projector in the parameter dtype).

  Returns:
    Name (one of ``OPTIMIZERS``) -> transformation.
  """
  if target_modules is not None and not isinstance(target_modules, str):
    target_modules = list(target_modules)
  contrib = optax.partition(
      {targets.GALORE_LABEL: optax.contrib.scale_by_galore(rank=rank),
       targets.FULL_RANK_LABEL: optax.scale_by_adam()},
      targets.galore_labels(target_modules))
  common = dict(rank=rank, target_modules=target_modules,
                projector_dtype=projector_dtype)
  return {
      "optax.adamw": optax.adamw(1e-3),
      "adamw_8bit": aliases.adamw_8bit(1e-3),
      "optax.contrib.galore": contrib,
      "galore_adamw": aliases.galore_adamw(1e-3, **common),
      "galore_adamw_8bit": aliases.galore_adamw_8bit(1e-3, **common),
      "fira_adamw": aliases.fira_adamw(1e-3, **common),
      "apollo_adamw": aliases.apollo_adamw(1e-3, **common),
      # Rank 1 by definition (the table's rank does not apply).
      "apollo_mini": aliases.apollo_mini(
          1e-3, target_modules=target_modules,
          projector_dtype=projector_dtype),
      "apollo_mini_8bit": aliases.apollo_mini(
          1e-3, target_modules=target_modules,
          projector_dtype=projector_dtype, state_8bit=True),
  }


def memory_table(models: Mapping[str, LlamaShape], dtypes: Sequence[str], *,
                 ranks: Mapping[str, int] | None = None,
                 target_modules: targets.TargetModules = ("attn", "mlp"),
                 projector_dtypes: Sequence[str] = ("float32",),
                 optimizers: Sequence[str] = OPTIMIZERS) -> list[dict]:
  """Rows of bytes for each model, parameter dtype, optimizer and projector.

  Args:
    models: name -> shapes.
    dtypes: parameter dtypes (names, e.g. ``"bfloat16"``).
    ranks: name -> GaLore rank (default: ``DEFAULT_RANKS``).
    target_modules: the projected leaves.
    projector_dtypes: one row per entry for ``PROJECTED_OPTIMIZERS``.
    optimizers: some of ``OPTIMIZERS``.

  Returns:
    Dicts with ``model``, ``dtype``, ``rank``, ``optimizer``, ``projector``
    (its storage dtype, ``"-"`` without one), ``state_bytes`` and
    ``adamw_state_bytes`` (``optimizer_state_bytes``), ``param_bytes``,
    ``grad_bytes`` and ``layerwise_grad_bytes`` (``step_bytes``).
  """
  ranks = DEFAULT_RANKS if ranks is None else ranks
  rows = []
  for model, shape in models.items():
    rank = ranks[model]
    for dtype in dtypes:
      params = llama_abstract_params(shape, jnp.dtype(dtype))
      step = step_bytes(params)
      adamw = optimizer_state_bytes(optax.adamw(1e-3), params).total
      for name in optimizers:
        projectors = (projector_dtypes if name in PROJECTED_OPTIMIZERS
                      else [dtype if name == "optax.contrib.galore" else "-"])
        for projector in projectors:
          tx = comparison_optimizers(
              rank, target_modules,
              projector if name in PROJECTED_OPTIMIZERS else "float32")[name]
          rows.append({
              "model": model, "dtype": dtype, "rank": rank,
              "optimizer": name, "projector": projector,
              "state_bytes": optimizer_state_bytes(tx, params).total,
              "adamw_state_bytes": adamw, "param_bytes": step.params,
              "grad_bytes": step.gradients,
              "layerwise_grad_bytes": step.layerwise_gradients})
  return rows


def explanation(per_layer: bool) -> str:
  """What the table's columns mean, printed under it.

  Args:
    per_layer: whether the per-layer columns are shown.

  Returns:
    The text.
  """
  lines = [
      "An estimate from shapes: nothing is allocated, compiled or measured.",
      "- state: the bytes of tx.init(params), exact (jax.eval_shape); "
      "'% adamw' compares it with optax.adamw's.",
      "- params: the parameters. grads: the gradient tree an ordinary step "
      "holds whole before the optimizer runs (as large as the parameters).",
  ]
  if per_layer:
    lines.append(
        "- per-layer grads: a per-layer step (galore_optax.layerwise) "
        "updates each leaf inside the backward pass as soon as its gradient "
        "exists, so about one leaf's gradient is alive at a time: the "
        "largest leaf's (the embedding or head; a row-chunked head holds "
        "less). The optimizer state is about the same.")
  lines += [
      "- total: params + grads + state. Activations, XLA's temporaries and "
      "copies are not counted: benchmarks/memory.py measures real peaks "
      "(BENCHMARKS.md).",
      "- optax.contrib.galore needs less state than galore_adamw: it keeps "
      "its projector in the parameter dtype (ours: --projector-dtype) and "
      "always projects a matrix on its smaller side, so its two low-rank "
      "moments are (smaller side x rank), where galore_adamw's default "
      "proj_type='std' (galore_torch's) keeps the larger side of the MLP's "
      "non-square matrices (larger moments, a smaller projector). "
      "galore_adamw(proj_type='reverse_std', projector_dtype=<the parameter "
      "dtype>) needs exactly contrib's state.",
      "- fira_adamw: galore_adamw's state plus one float32 per projected "
      "matrix (the norm-growth limiter). apollo_adamw: the same with a "
      "random projector of the same size; apollo_mini: rank 1 (two moment "
      "vectors, a projector vector and a float per matrix); "
      "apollo_mini_8bit: the same with 8-bit Adam states (the embedding's "
      "and head's full-rank moments are most of apollo_mini's state).",
  ]
  return "\n".join(lines)


def format_table(rows: Sequence[dict], per_layer: bool) -> str:
  """The rows as a Markdown table, in GiB (MiB for small models).

  Args:
    rows: ``memory_table``'s rows.
    per_layer: add the per-layer step's gradient and total columns.

  Returns:
    The table's text.
  """
  largest = max((r["param_bytes"] + r["grad_bytes"] + r["state_bytes"]
                 for r in rows), default=0)
  unit, scale = ("GiB", 2**30) if largest >= 2**30 else ("MiB", 2**20)
  header = ["model", "param dtype", "rank", "optimizer", "projector",
            f"params {unit}", f"grads {unit}", f"state {unit}", "% adamw",
            f"total {unit}"]
  if per_layer:
    header += [f"per-layer grads {unit}", f"per-layer total {unit}"]
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" * 5 + "---:|" * (len(header) - 5)]
  size = lambda n: f"{n / scale:.3f}"
  for r in rows:
    common = r["param_bytes"] + r["state_bytes"]
    cells = [r["model"], r["dtype"], str(r["rank"]), r["optimizer"],
             r["projector"], size(r["param_bytes"]), size(r["grad_bytes"]),
             size(r["state_bytes"]),
             f"{100 * r['state_bytes'] / r['adamw_state_bytes']:.1f}",
             size(common + r["grad_bytes"])]
    if per_layer:
      cells += [size(r["layerwise_grad_bytes"]),
                size(common + r["layerwise_grad_bytes"])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _config_model(text: str) -> tuple[str, LlamaShape]:
  """``type=`` of ``--config``: (a name for the table, the shapes)."""
  try:
    shape = llama_shape_from_config(read_config_json(text))
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  path = Path(text)
  name = path.name if path.is_dir() or path.name != "config.json" else (
      path.parent.name)
  return (name.removesuffix(".json") or text), shape


def build_parser() -> cli.ArgumentParser:
  """The command line of ``python -m galore_optax.memory``.

  Returns:
    The parser.
  """
  p = cli.ArgumentParser(
      prog="python -m galore_optax.memory", error_name="galore_optax.memory",
      description="Memory of a LLaMA training step by optimizer: parameters, "
      "gradients and optimizer state, estimated from shapes (nothing is "
      "allocated).")
  p.add_argument("--models", type=cli.comma_list(tuple(LLAMA_SHAPES)),
                 default=None, metavar="LIST",
                 help=f"comma-separated presets from {', '.join(LLAMA_SHAPES)}"
                 f" (default: the paper's {','.join(PAPER_MODELS)}; none "
                 "when --config is given)")
  p.add_argument("--config", action="append", type=_config_model,
                 default=None, metavar="PATH",
                 help="a transformers LlamaConfig-style config.json, or its "
                 "directory (repeatable)")
  p.add_argument("--rank", type=cli.positive_int, default=None,
                 help="GaLore rank (default: the paper's for each preset, "
                 f"{', '.join(f'{k} {v}' for k, v in DEFAULT_RANKS.items())};"
                 " hidden_size // 4 for a --config model)")
  p.add_argument("--target-modules", type=cli.target_modules_spec,
                 default="attn,mlp",
                 help="the projected linear layers, by module name: comma-"
                 "separated names/substrings/regexes; 're:REGEX' for one "
                 "full-match regex; 'all-linear'; 'all' (every matrix)")
  p.add_argument("--param-dtype", "--dtypes", dest="param_dtypes",
                 type=cli.comma_list(PARAM_DTYPES), default="bfloat16,float32",
                 metavar="LIST",
                 help="comma-separated parameter (and gradient) dtypes, from "
                 f"{', '.join(PARAM_DTYPES)}")
  p.add_argument("--projector-dtype", dest="projector_dtypes",
                 type=cli.comma_list(projector_storage.PROJECTOR_DTYPES),
                 default=",".join(projector_storage.PROJECTOR_DTYPES),
                 metavar="LIST",
                 help="comma-separated projector storage dtypes: one row each "
                 f"for {', '.join(PROJECTED_OPTIMIZERS)}")
  p.add_argument("--optimizers", type=cli.comma_list(OPTIMIZERS),
                 default=None, metavar="LIST",
                 help=f"comma-separated rows to show, from "
                 f"{', '.join(OPTIMIZERS)} (default: all)")
  p.add_argument("--per-layer", action="store_true",
                 help="add the gradient and total columns of a per-layer step "
                 "(galore_optax.layerwise)")
  return p


def main(argv: Sequence[str] | None = None) -> list[dict]:
  """Prints the memory table and its explanation.

  Args:
    argv: command-line arguments (default ``sys.argv[1:]``).

  Returns:
    The table's rows (``memory_table``).
  """
  parser = build_parser()
  args = parser.parse_args(argv)
  configs = args.config or []
  models = {name: LLAMA_SHAPES[name] for name in (
      args.models or ([] if configs else PAPER_MODELS))}
  ranks = {name: args.rank or DEFAULT_RANKS[name] for name in models}
  for name, shape in configs:
    if name in models:
      name = f"{name} ({len(models)})"
    models[name] = shape
    ranks[name] = args.rank or max(1, shape.d_model // 4)
  target_modules = cli.parse_target_modules(args.target_modules)
  with cli.user_errors(parser):  # a spec that matches no matrix
    for shape in models.values():
      targets.target_mask(llama_abstract_params(shape), target_modules)
  rows = memory_table(models, args.param_dtypes, ranks=ranks,
                      target_modules=target_modules,
                      projector_dtypes=args.projector_dtypes,
                      optimizers=args.optimizers or OPTIMIZERS)
  print(format_table(rows, args.per_layer))
  print()
  print(explanation(args.per_layer))
  return rows


if __name__ == "__main__":
  main()
