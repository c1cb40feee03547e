"""Compiled memory of a full LLaMA train step, per optimizer and update mode.

Lowers and compiles one train step on abstract inputs (``jax.ShapeDtypeStruct``,
nothing is allocated) and reads XLA's ``memory_analysis()``:

* ``args``: parameters + optimizer state + batch (the step donates params and
  state, so the outputs alias them and cost nothing extra);
* ``temps``: XLA's peak of everything else (activations, gradients, optimizer
  temporaries) under its schedule;
* ``total = args + temps`` is the step's peak device memory as XLA plans it.

Modes:

* ``ordinary``: ``value_and_grad`` then ``tx.update`` (the full gradient
  exists at once);
* ``layerwise``: ``galore_optax.layerwise.make_layerwise_step`` on the
  unrolled model (each leaf updated inside the backward pass);
* ``layerwise_scan``: the scanned model run with ``layerwise.scan_layers``
  and ``per_layer=["model.layers"]`` (one layer's gradient at a time, layer
  recomputation in the backward loop, in-place updates of the stacked
  weights and states).

``--remat`` checkpoints every decoder layer (``ordinary``/``layerwise``;
``layerwise_scan`` always recomputes layers).

CPU caveat: XLA's CPU backend computes bf16 matmuls in float32 and, by
default, stores float32 copies of both operands first (``--dots upcast``): a
float32 copy of every weight it multiplies, which it may also keep from the
forward to the backward pass. Those copies are a CPU artefact (GPU and TPU
matmuls read bf16 directly). ``--dots fused`` compiles the same step with
XLA:CPU's YNNPACK dot fusions, which fuse the converts into the matmul, so no
copy is stored and the product is written in bf16 as on a GPU: that is the
figure to read as the step's real cost. Other CPU choices (e.g. float32
scatter for the embedding gradient) remain in both. ``--top N`` lists the
largest buffers live at XLA's peak.

Examples::

  python benchmarks/memory.py --presets 60m,130m --modes ordinary,layerwise
  python benchmarks/memory.py --presets 7b --optimizers galore_adamw_8bit \\
      --modes layerwise --remat --projector-dtype int8 --dots fused
  python benchmarks/memory.py --presets 7b --optimizers apollo_mini_8bit \\
      --modes layerwise --remat --weights int8 --dots fused
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import galore_optax  # noqa: E402
from examples import llama  # noqa: E402
from galore_optax import layerwise  # noqa: E402
from galore_optax import memory  # noqa: E402
from galore_optax import weight_quantization  # noqa: E402

GIB = 2**30
# The paper's rank for each size (tiny: the example's default).
PAPER_RANKS = memory.DEFAULT_RANKS
OPTIMIZERS = ("adamw", "adamw_8bit", "galore_adamw", "galore_adamw_8bit",
              "fira_adamw", "apollo_adamw", "apollo_mini", "apollo_mini_8bit")
MODES = ("ordinary", "layerwise", "layerwise_scan")
TARGETS = ["attn", "mlp"]  # the paper's GaLore targets (not embed / head)
INT8_TARGETS = ["attn", "mlp", "embed", "lm_head"]  # --weights int8


def make_optimizer(name: str, rank: int, projector_dtype: str):
  lr = 1e-2
  if name == "adamw":
    return optax.adamw(lr)
  if name == "adamw_8bit":
    return galore_optax.adamw_8bit(lr)
  if name == "galore_adamw":
    return galore_optax.galore_adamw(lr, rank=rank, target_modules=TARGETS,
                                     projector_dtype=projector_dtype)
  if name == "galore_adamw_8bit":
    return galore_optax.galore_adamw_8bit(lr, rank=rank,
                                          target_modules=TARGETS,
                                          projector_dtype=projector_dtype)
  if name in ("fira_adamw", "apollo_adamw"):
    return getattr(galore_optax, name)(lr, rank=rank, target_modules=TARGETS,
                                       projector_dtype=projector_dtype)
  if name in ("apollo_mini", "apollo_mini_8bit"):
    # Rank 1 by definition; 8-bit moments matter for embed and head.
    return galore_optax.apollo_mini(lr, target_modules=TARGETS,
                                    projector_dtype=projector_dtype,
                                    state_8bit=name.endswith("_8bit"))
  raise ValueError(f"unknown optimizer {name!r}")


def scan_layers_loss(model: llama.LlamaForCausalLM, batch) -> jax.Array:
  """``llama.loss_fn`` for a scanned model, with the stack run by scan_layers.

  Mirrors ``LlamaModel.__call__`` (no padding mask): only the layer loop
  differs, ``layerwise.scan_layers`` instead of ``nnx.scan``.
  """
  m = model.model
  ids = batch["input_ids"]
  b, t = ids.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  cos, sin = llama.rope_cos_sin(positions, m.head_dim, m.rope_theta)
  mask = m._mask(t, None)  # pylint: disable=protected-access
  h = m.embed_tokens(ids)
  layer_def, layer_params = nnx.split(m.layers)
  h = layerwise.scan_layers(
      lambda x, p: nnx.merge(layer_def, p)(x, cos, sin, mask), h,
      layer_params)
  logits = model.lm_head(m.norm(h))
  loss, _ = llama.cross_entropy(logits, batch["labels"])
  return loss


def tree_bytes(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


# XLA:CPU converts both operands of a bf16 matmul to float32 and materialises
# those copies (a float32 copy of every weight it multiplies). This flag makes
# it fuse the converts into the matmul kernel (YNNPACK dot fusions), so no
# float32 copy is stored and the result is written in bf16, as a GPU or TPU
# matmul does. It changes where products are rounded, not what is computed.
FUSED_BF16_DOTS = {"xla_cpu_experimental_ynn_fusion_type":
                   "LIBRARY_FUSION_TYPE_DOT",
                   # Without this, XLA's CSE merges the converts of a weight
                   # used by several matmuls (forward and backward) into one
                   # float32 copy that cannot be fused and lives from the
                   # forward to the backward pass.
                   "xla_disable_hlo_passes": "cse"}


def peak_buffers(dump_dir: str, top: int) -> list[tuple[str, int]]:
  """The largest buffers live at XLA's peak, from its live-range dump."""
  files = glob.glob(os.path.join(dump_dir, "*after_optimizations-live-range.txt"))
  if not files:
    return []
  live_range = max(files, key=os.path.getsize)
  text = open(live_range).read()
  m = re.search(r"Live ranges at \d+ \(peak\):\n(.*?)\n  \S", text, re.S)
  if not m:
    return []
  # The step's arguments are counted apart (args); list temporaries only:
  # drop every value that lives in an argument's buffer (a donated weight
  # updated in place, a loop carrying it), not only the parameters.
  assignment = open(live_range.replace("-live-range.txt",
                                       "-buffer-assignment.txt")).read()
  in_args = set()
  for allocation in re.split(r"\nallocation \d+: ", assignment)[1:]:
    if ", parameter " in allocation.split("\n", 1)[0]:
      in_args.update(re.findall(r"value: <\d+ ([\w.\-]+)", allocation))
  rows = re.findall(r"^\s+([\w.\-]+)\{[\d,]*\}: (\d+) bytes", m.group(1),
                    re.M)
  rows = sorted(((n, int(b)) for n, b in rows if n not in in_args),
                key=lambda r: -r[1])
  return rows[:top]


@dataclasses.dataclass
class Row:
  preset: str
  optimizer: str
  mode: str
  remat: bool
  row_chunks: int
  rank: int
  dots: str
  params_gib: float
  state_gib: float
  args_gib: float
  temps_gib: float
  total_gib: float
  compile_s: float
  peak: Any = None


def build_step(preset: str, opt_name: str, mode: str, *, remat: bool,
               rank: int, projector_dtype: str, batch: int, seq: int,
               row_chunks: int = 1, weights: str = "bf16",
               fused: bool = False):
  """The jitted step and its abstract arguments."""
  scan = mode == "layerwise_scan"
  model = llama.abstract_model(preset, dtype=jnp.bfloat16,
                               param_dtype=jnp.bfloat16,
                               remat=remat and not scan, scan_layers=scan)
  graphdef, params = nnx.split(model, nnx.Param)
  int8 = weights == "int8"
  if int8:
    # Every matrix (attention, MLP, embedding, head) in int8, groups of 256.
    params = jax.eval_shape(
        lambda p: weight_quantization.quantize_params(
            nnx.to_pure_dict(p), INT8_TARGETS), params)
  data = {
      "input_ids": jax.ShapeDtypeStruct((batch, seq), jnp.int32),
      "labels": jax.ShapeDtypeStruct((batch, seq), jnp.int32),
  }
  tx = make_optimizer(opt_name, rank, projector_dtype)
  if scan:
    loss_fn = lambda p, b: scan_layers_loss(nnx.merge(graphdef, p), b)
  else:
    loss_fn = lambda p, b: llama.loss_fn(nnx.merge(graphdef, p), b)

  if mode == "ordinary":

    def step(stored, opt_state, b, key):
      params = weight_quantization.dequantize_params(stored, jnp.bfloat16)
      loss, grads = jax.value_and_grad(loss_fn)(params, b)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (weight_quantization.apply_updates(stored, updates, key=key),
              opt_state, loss)

    step = jax.jit(step, donate_argnums=(0, 1))
    state = jax.eval_shape(
        lambda p: tx.init(weight_quantization.dequantize_params(
            p, jnp.bfloat16)), params)
  elif mode in ("layerwise", "layerwise_scan"):
    # The embedding and the head are not GaLore targets: their (8-bit) Adam
    # update is element-wise and may run in row blocks.
    chunks = ({"embed_tokens": row_chunks, "lm_head": row_chunks}
              if row_chunks > 1 else None)
    lw = layerwise.make_layerwise_step(
        loss_fn, tx, per_layer=["model.layers"] if scan else None,
        row_chunks=chunks, weight_dtype=jnp.bfloat16, fused=fused)
    step = lw.step
    state = jax.eval_shape(lw.init, params)
  else:
    raise ValueError(f"unknown mode {mode!r}")
  key = jax.eval_shape(lambda: jax.random.key(0)) if int8 else None
  return step, (params, state, data, key)


def measure(preset: str, opt_name: str, mode: str, *, remat: bool, rank: int,
            projector_dtype: str, batch: int, seq: int, dots: str,
            top: int = 0, row_chunks: int = 1, weights: str = "bf16",
            fused: bool = False) -> Row:
  step, abstract_args = build_step(
      preset, opt_name, mode, remat=remat, rank=rank,
      projector_dtype=projector_dtype, batch=batch, seq=seq,
      row_chunks=row_chunks, weights=weights, fused=fused)
  options = dict(FUSED_BF16_DOTS) if dots == "fused" else {}
  t0 = time.time()
  lowered = step.lower(*abstract_args)
  peak = None
  if top:
    with tempfile.TemporaryDirectory() as d:
      compiled = lowered.compile(compiler_options=options | {
          "xla_dump_to": d, "xla_dump_hlo_as_text": True})
      peak = peak_buffers(d, top)
  else:
    compiled = lowered.compile(compiler_options=options or None)
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  args = mem.argument_size_in_bytes / GIB
  temps = mem.temp_size_in_bytes / GIB
  params, state, _, _ = abstract_args
  return Row(preset, opt_name, mode, remat,
             row_chunks if mode != "ordinary" else 1, rank, dots,
             tree_bytes(params) / GIB, tree_bytes(state) / GIB, args, temps,
             args + temps, compile_s, peak)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default="60m,130m,350m,1b,7b")
  parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
  parser.add_argument("--modes", default="ordinary,layerwise")
  parser.add_argument("--remat", action="store_true",
                      help="checkpoint every decoder layer")
  parser.add_argument("--rank", type=int, default=None,
                      help="GaLore rank (default: the paper's per size)")
  parser.add_argument("--projector-dtype", default="float32",
                      choices=("float32", "bfloat16", "int8"))
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--dots", default="upcast,fused",
                      help="comma list: 'upcast' (XLA:CPU default, float32 "
                      "copies of bf16 matmul operands) and/or 'fused' (bf16 "
                      "matmuls without stored float32 copies)")
  parser.add_argument("--top", type=int, default=0,
                      help="also list the N largest buffers live at XLA's "
                      "peak (dumps the compiled module to a temp dir)")
  parser.add_argument("--row-chunks", type=int, default=1,
                      help="layer-wise modes: update the embedding and the "
                      "head in this many row blocks (row_chunks)")
  parser.add_argument("--fused", action="store_true",
                      help="layer-wise modes: make_layerwise_step(fused=True)"
                      " (projected kernels' low-rank gradients from the "
                      "products' inputs between refreshes)")
  parser.add_argument("--weights", default="bf16", choices=("bf16", "int8"),
                      help="int8: every matrix stored as int8 codes with "
                      "float32 scales per 256 values (weight_quantization), "
                      "updated with stochastic rounding")
  parser.add_argument("--json", default=None, help="append rows to this file")
  args = parser.parse_args(argv)

  header = ("| model | optimizer | mode | remat | rank | bf16 dots | params | "
            "opt state | args | temps | args+temps | compile s |")
  print(f"GiB; {args.weights} weights, batch {args.batch}x{args.seq}, "
        f"projector dtype "
        f"{args.projector_dtype}; jax {jax.__version__}, "
        f"{jax.devices()[0].platform}.")
  print(header)
  print("|" + "|".join(["---"] * (header.count("|") - 1)) + "|")
  for preset in args.presets.split(","):
    rank = args.rank or PAPER_RANKS.get(preset, 128)
    for opt in args.optimizers.split(","):
      for mode in args.modes.split(","):
        for dots in args.dots.split(","):
          row = measure(preset, opt, mode, remat=args.remat, rank=rank,
                        projector_dtype=args.projector_dtype,
                        batch=args.batch, seq=args.seq, dots=dots,
                        top=args.top, row_chunks=args.row_chunks,
                        weights=args.weights, fused=args.fused)
          mode_text = mode + (f" (row_chunks {row.row_chunks})"
                              if row.row_chunks > 1 else "")
          print(f"| {preset} | {opt} | {mode_text} | {row.remat} | "
                f"{rank if 'galore' in opt else '-'} | {dots} | "
                f"{row.params_gib:.2f} | {row.state_gib:.2f} | "
                f"{row.args_gib:.2f} | {row.temps_gib:.2f} | "
                f"**{row.total_gib:.2f}** | {row.compile_s:.0f} |",
                flush=True)
          for name, size in row.peak or ():
            print(f"|  |  | peak buffer | {name} | {size / 2**20:.1f} MiB |",
                  flush=True)
          if args.json:
            with open(args.json, "a") as f:
              f.write(json.dumps(dataclasses.asdict(row) | {
                  "projector_dtype": args.projector_dtype,
                  "weights": args.weights,
                  "batch": args.batch, "seq": args.seq}) + "\n")


if __name__ == "__main__":
  main()
