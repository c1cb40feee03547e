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

CPU caveat: XLA's CPU backend computes bf16 matmuls in float32 and converts
both operands first, so every bf16 weight gets a transient float32 copy when
it is used; the CPU ``temps`` include those copies (and CPU-specific fusion
choices). ``--breakdown`` dumps XLA's buffer assignment and reports, at the
peak, how many bytes are float32 copies of bf16 arrays, and the temps without
them (``temps_no_upcast``): an estimate of what a backend with native bf16
matmuls (GPU, TPU) would need. It is an estimate from the CPU schedule, not a
GPU measurement.

Examples::

  python benchmarks/memory.py --presets 60m,130m --modes ordinary,layerwise
  python benchmarks/memory.py --presets 7b --optimizers galore_adamw_8bit \\
      --modes layerwise --remat --projector-dtype int8 --breakdown
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

GIB = 2**30
PAPER_RANKS = {"tiny": 64, "60m": 128, "130m": 256, "350m": 256, "1b": 512,
               "7b": 1024}
OPTIMIZERS = ("adamw", "adamw_8bit", "galore_adamw", "galore_adamw_8bit")
MODES = ("ordinary", "layerwise", "layerwise_scan")
TARGETS = ["attn", "mlp"]  # the paper's GaLore targets (not embed / head)


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


_SHAPE_RE = re.compile(r"^(\w+)\[([\d,]*)\]")


def _shape_bytes(text: str) -> int:
  m = _SHAPE_RE.match(text)
  if not m:
    return 0
  dtype, dims = m.groups()
  size = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "u8": 1,
          "s8": 1, "pred": 1, "f64": 8, "s64": 8}.get(dtype, 0)
  n = 1
  for d in dims.split(","):
    if d:
      n *= int(d)
  return n * size


def upcast_breakdown(dump_dir: str) -> dict[str, float]:
  """Bytes of f32 copies of bf16 arrays live at XLA's peak, from the dump.

  Parses the buffer-assignment dump: the "peak" section lists the logical
  buffers live at the heap peak; a buffer is counted as an upcast copy when
  the instruction defining it is a float32 ``convert``/fusion whose operand
  is a bf16 array of the same shape.
  """
  files = sorted(glob.glob(os.path.join(dump_dir, "*buffer-assignment.txt")),
                 key=os.path.getsize)
  hlo_files = sorted(glob.glob(os.path.join(dump_dir,
                                            "*after_optimizations.txt")),
                     key=os.path.getsize)
  if not files or not hlo_files:
    return {}
  text = open(files[-1]).read()
  hlo = open(hlo_files[-1]).read()
  # instruction name -> (result shape text, operand text)
  defs = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w\-]*)\((.*)", line)
    if m:
      defs[m.group(1)] = (m.group(2), m.group(3), line)
  upcast = set()
  for name, (shape, op, line) in defs.items():
    if not shape.startswith("f32["):
      continue
    dims = shape[3:shape.index("]") + 1]
    if op in ("convert", "fusion") and (
        f"bf16{dims}" in line) and ("convert" in line or
                                    "wrapped_convert" in name):
      upcast.add(name)
  m = re.search(r"Peak buffers:\n(.*?)(?:\n\n|\Z)", text, re.S)
  if not m:
    return {}
  peak_total = 0
  peak_upcast = 0
  for block in re.split(r"\n(?=\tBuffer \d+:)", m.group(1)):
    size_m = re.search(r"Size: ([\d.]+)(\w*)", block)
    name_m = re.search(r"Operator: .*?\n\s*|\n\t\t(\S+)", block)
    if not size_m:
      continue
    num, unit = float(size_m.group(1)), size_m.group(2)
    scale = {"": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}.get(
        unit, 1)
    size = num * scale
    peak_total += size
    names = re.findall(r"%?([\w.\-]+)(?:\{[^}]*\})? = ", block)
    names += re.findall(r"XLA Label: \w+\n\s*Shape: \S+\n\s*=+\n\s*([\w.\-]+)",
                        block)
    values = re.findall(r"value: <\d+ ([\w.\-]+)", block)
    del name_m
    if any(v in upcast for v in names + values):
      peak_upcast += size
  return {"peak_listed_gib": peak_total / GIB,
          "peak_upcast_gib": peak_upcast / GIB}


@dataclasses.dataclass
class Row:
  preset: str
  optimizer: str
  mode: str
  remat: bool
  rank: int
  params_gib: float
  state_gib: float
  args_gib: float
  temps_gib: float
  total_gib: float
  upcast_gib: float | None
  compile_s: float


def measure(preset: str, opt_name: str, mode: str, *, remat: bool, rank: int,
            projector_dtype: str, batch: int, seq: int,
            breakdown: bool) -> Row:
  scan = mode == "layerwise_scan"
  model = llama.abstract_model(preset, dtype=jnp.bfloat16,
                               param_dtype=jnp.bfloat16,
                               remat=remat and not scan, scan_layers=scan)
  graphdef, params = nnx.split(model, nnx.Param)
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
    def step(params, opt_state, b):
      loss, grads = jax.value_and_grad(loss_fn)(params, b)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    state = jax.eval_shape(tx.init, params)
  else:
    lw = layerwise.make_layerwise_step(
        loss_fn, tx, per_layer=["model.layers"] if scan else None)
    step = lw.step
    state = jax.eval_shape(lw.init, params)

  t0 = time.time()
  upcast = None
  if breakdown:
    with tempfile.TemporaryDirectory() as d:
      lowered = step.lower(params, state, data)
      compiled = lowered.compile(compiler_options={
          "xla_dump_to": d, "xla_dump_hlo_as_text": True,
          "xla_dump_hlo_module_re": ".*step.*"})
      info = upcast_breakdown(d)
      upcast = info.get("peak_upcast_gib")
  else:
    compiled = step.lower(params, state, data).compile()
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  args = mem.argument_size_in_bytes / GIB
  temps = mem.temp_size_in_bytes / GIB
  return Row(preset, opt_name, mode, remat, rank, tree_bytes(params) / GIB,
             tree_bytes(state) / GIB, args, temps, args + temps, upcast,
             compile_s)


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
  parser.add_argument("--breakdown", action="store_true",
                      help="dump XLA's buffer assignment and count the "
                      "float32 copies of bf16 arrays live at the peak")
  parser.add_argument("--json", default=None, help="append rows to this file")
  args = parser.parse_args(argv)

  header = ("| model | optimizer | mode | remat | rank | params | opt state | "
            "args | temps | args+temps | f32 upcasts at peak | "
            "args+temps w/o upcasts | compile s |")
  print(header)
  print("|" + "---|" * header.count("|")[:-1] if False else
        "|" + "|".join(["---"] * (header.count("|") - 1)) + "|")
  for preset in args.presets.split(","):
    for opt in args.optimizers.split(","):
      for mode in args.modes.split(","):
        rank = args.rank or PAPER_RANKS.get(preset, 128)
        row = measure(preset, opt, mode, remat=args.remat, rank=rank,
                      projector_dtype=args.projector_dtype, batch=args.batch,
                      seq=args.seq, breakdown=args.breakdown)
        up = "-" if row.upcast_gib is None else f"{row.upcast_gib:.2f}"
        no_up = ("-" if row.upcast_gib is None else
                 f"{row.total_gib - row.upcast_gib:.2f}")
        print(f"| {preset} | {opt} | {mode} | {row.remat} | "
              f"{rank if 'galore' in opt else '-'} | {row.params_gib:.2f} | "
              f"{row.state_gib:.2f} | {row.args_gib:.2f} | "
              f"{row.temps_gib:.2f} | {row.total_gib:.2f} | {up} | {no_up} | "
              f"{row.compile_s:.0f} |", flush=True)
        if args.json:
          with open(args.json, "a") as f:
            f.write(json.dumps(dataclasses.asdict(row)
                               | {"projector_dtype": args.projector_dtype,
                                  "batch": args.batch, "seq": args.seq})
                    + "\n")


if __name__ == "__main__":
  main()
