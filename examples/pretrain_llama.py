"""Pre-train a LLaMA-style model with GaLore (or a baseline optimizer).

The GaLore paper's pre-training recipe (Zhao et al., 2024, arXiv 2403.03507,
section 5.1) on an offline corpus: linear warm-up over the first 10% of the
updates, then cosine decay to 10% of the peak learning rate, gradient clipping
at global norm 1.0, AdamW moments kept in a rank-``r`` subspace for the
attention and MLP matrices (embeddings, norms and the head stay full rank).

Run from the repository root::

    python -m examples.pretrain_llama                      # tiny, galore_adamw
    python -m examples.pretrain_llama --optimizer adamw --lr 3e-3
    python -m examples.pretrain_llama --optimizer galore_adamw_8bit_layerwise
    python -m examples.pretrain_llama --model 60m --rank 128 --update-proj-gap 200
    python -m examples.pretrain_llama --mesh data=2,fsdp=4 --batch-size 16
    # multi-host, e.g. 2 hosts x 4 devices: the same command on every host
    python -m examples.pretrain_llama --mesh data=2,fsdp=4 --batch-size 16 \
        --coordinator host0:1234 --num-processes 2 --process-id $HOST_INDEX
    python -m examples.pretrain_llama --steps 400 --checkpoint-every 100
    python -m examples.pretrain_llama --steps 400 --resume  # continue a run

What it does:

* one ``jax.jit``-compiled train step (forward, backward, clipping, optimizer,
  update) with the parameters and optimizer state donated; the step is traced
  exactly once per run (a warning is printed otherwise);
* the optimizers by Hugging Face ``Trainer`` name (``galore_optax.
  create_optimizer``), ``_layerwise`` ones updating each parameter inside the
  backward pass (``galore_optax.layerwise``), and ``optax.contrib.galore``
  on the same targets for comparison;
* optional gradient accumulation (``optax.MultiSteps``): ``--steps`` counts
  optimizer updates, each of ``--grad-accum`` micro-batches;
* data-parallel and FSDP sharding over a ``jax.make_mesh`` mesh (``--mesh``),
  on one host or on several (``--coordinator``/``--distributed``:
  ``jax.distributed``; checkpoints go to one shared directory, process
  ``i > 0`` writes its metrics under ``out-dir/process-i``);
* periodic held-out evaluation on fixed batches (mean loss and perplexity);
* ``metrics.csv``, TensorBoard scalars, ``loss.png`` (loss and learning
  rate, projector refreshes marked: ``examples.compare.plot_runs``) and
  ``summary.json`` in ``--out-dir``; ``python -m examples.compare DIR ...``
  overlays several runs;
* Orbax checkpoints of parameters, optimizer state, step, data position and
  RNG key; ``--resume`` continues bit for bit where the run stopped, since the
  training batches are a pure function of ``(seed, step)``.

``main(argv)`` runs the same thing in-process and returns the summary dict.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import re
import resource
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import galore_optax
from galore_optax import cli
from galore_optax import layerwise as galore_layerwise
from galore_optax import lazy_refresh
from galore_optax import memory
from galore_optax import weight_quantization
from galore_optax.cli import parse_target_modules

from . import compare
from . import data as data_lib
from . import llama

# ---------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------

# Hugging Face Trainer names (built by ``galore_optax.create_optimizer``; a
# ``_layerwise`` name runs the same transformation inside the backward pass
# with ``galore_optax.layerwise``), plus optax's own GaLore for comparison.
OPTIMIZERS = (
    "adamw",
    "adamw_8bit",
    "galore_adamw",
    "galore_adamw_8bit",
    "galore_adafactor",
    "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise",
    "galore_adafactor_layerwise",
    "fira_adamw",
    "fira_adamw_layerwise",
    "apollo_adamw",
    "apollo_adamw_layerwise",
    "optax_contrib_galore",
)

# Peak learning rates when --lr is not given. GaLore uses the paper's 0.01
# (Table 5, with alpha 0.25); the full-rank baselines a lower rate, as in the
# paper's baselines (they diverge more easily at 0.01).
_GALORE_LR = 1e-2
_FULL_RANK_LR = 3e-3


def default_lr(name: str) -> float:
  return (_GALORE_LR if any(k in name for k in ("galore", "fira", "apollo"))
          else _FULL_RANK_LR)


def is_layerwise(name: str) -> bool:
  """Whether ``name`` asks for per-layer updates in the backward pass."""
  return name != "optax_contrib_galore" and galore_optax.parse_optimizer_name(
      name)[1]


# AdamW hyper-parameters of the paper and of torch.optim.AdamW.
ADAM_B1 = 0.9
ADAM_B2 = 0.999
ADAM_EPS = 1e-8

# --layer-residuals: make_layerwise_step's ``recompute`` for each choice.
LAYER_RESIDUALS = {
    "recompute": True,
    "products": galore_layerwise.KEEP_DENSE_OUTPUTS,
    "all": False,
}


def make_optimizer(name: str, schedule: optax.Schedule, args: Any,
                   params: Any) -> optax.GradientTransformation:
  """The optimizer table: builds optimizer ``name`` (without clipping).

  This is the one place that knows the optimizer names; add new ones here.

  Args:
    name: one of ``OPTIMIZERS``.
    schedule: the learning-rate schedule.
    args: parsed arguments (rank, update_proj_gap, scale, proj_type,
      target_modules, projector_method, moments, weight_decay, seed).
    params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``), for
      optimizers whose target selection is a precomputed mask.

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    ValueError: for an unknown name, or targets that match no matrix.
  """
  targets = parse_target_modules(args.target_modules)
  adam_kw = dict(b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS,
                 weight_decay=args.weight_decay)
  if name == "optax_contrib_galore":
    # The in-ecosystem peer with the same rank, gap, scale and targets:
    # optax.contrib.galore on the selected matrices, plain AdamW elsewhere.
    # It has no proj_type (always the smaller side, i.e. reverse_std) and
    # only exact SVD projectors.
    if args.projector_method != "svd":
      warnings.warn("optax.contrib.galore only has exact SVD projectors; "
                    f"ignoring --projector-method {args.projector_method}.")
    mask = galore_optax.target_mask(params, targets)
    if any(m and len(p.shape) > 2 for m, p in
           zip(jax.tree.leaves(mask), jax.tree.leaves(params))):
      warnings.warn("optax.contrib.galore projects only 2-D leaves; stacked "
                    "(--scan-layers) targets get full-rank Adam moments.")
    labels = jax.tree.map(lambda m: "galore" if m else "full_rank", mask)
    return optax.partition(
        {
            "galore": optax.contrib.galore(
                schedule, rank=args.rank, update_proj_gap=args.update_proj_gap,
                scale=args.scale,
                base_optimizer=optax.scale_by_adam(b1=ADAM_B1, b2=ADAM_B2,
                                                   eps=ADAM_EPS),
                weight_decay=args.weight_decay),
            "full_rank": optax.adamw(schedule, **adam_kw),
        },
        labels,
    )
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {name!r}; choose from {OPTIMIZERS}.")
  # Hugging Face names; a _layerwise name gives its base transformation (the
  # per-layer step is built around it in main()).
  base, _ = galore_optax.parse_optimizer_name(name)
  accepted = galore_optax.optimizer_arguments(base)
  wanted = dict(rank=args.rank, update_proj_gap=args.update_proj_gap,
                scale=args.scale, proj_type=args.proj_type,
                projector_method=args.projector_method, moments=args.moments,
                refresh_schedule=args.refresh_schedule, seed=args.seed,
                scale_type=args.scale_type)
  if "b1" in accepted:  # the AdamW family (Adafactor has its own eps)
    wanted.update(b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS)
  kwargs = {k: v for k, v in wanted.items() if k in accepted}
  galore = base in galore_optax.names.PROJECTED_NAMES
  if galore and targets is None:
    # 'all': every leaf with two or more dimensions, embeddings included.
    targets = ".*"
    kwargs["any_matrix"] = True
  if galore:
    # A selection that matches no matrix raises now, not inside tx.init.
    galore_optax.target_mask(params, targets,
                             any_matrix=kwargs.get("any_matrix", False))
  return galore_optax.create_optimizer(
      base, schedule, target_modules=targets if galore else None,
      weight_decay=args.weight_decay, **kwargs)


def make_schedule(args: argparse.Namespace) -> optax.Schedule:
  """Linear warm-up from 0, then cosine decay to ``min_lr_ratio * lr``."""
  warmup = int(round(args.warmup_ratio * args.steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=args.lr,
      warmup_steps=warmup,
      decay_steps=max(args.steps, warmup + 1),
      end_value=args.lr * args.min_lr_ratio,
  )


def build_tx(args: argparse.Namespace, schedule: optax.Schedule,
             params: Any) -> optax.GradientTransformation:
  """Clipping + the optimizer (+ ``optax.MultiSteps`` to accumulate).

  For a ``_layerwise`` optimizer only the optimizer itself: clipping (per
  leaf) and accumulation are done by ``galore_optax.layerwise``'s step.
  """
  if is_layerwise(args.optimizer):
    return make_optimizer(args.optimizer, schedule, args, params)
  parts = []
  if args.max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(args.max_grad_norm))
  parts.append(make_optimizer(args.optimizer, schedule, args, params))
  tx = optax.chain(*parts)
  if args.grad_accum > 1:
    # Only then: MultiSteps keeps a full-size gradient accumulator.
    tx = optax.MultiSteps(tx, every_k_schedule=args.grad_accum)
  return tx


# ---------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------

MESH_AXES = ("data", "fsdp")
# Leaves with fewer elements are replicated (norm scales, counters, ...).
MIN_SHARD_SIZE = 1024


def parse_mesh(spec: str | None) -> dict[str, int]:
  """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}`` (missing axes: 1).

  ``None`` is one device; an empty spec or an axis named twice is an error.
  """
  shape = {axis: 1 for axis in MESH_AXES}
  if spec is None:
    return shape
  parts = [part.strip() for part in spec.split(",") if part.strip()]
  if not parts:
    raise ValueError(f"Empty --mesh {spec!r}: expected AXIS=N entries, e.g. "
                     "'data=2,fsdp=4' (leave --mesh out for one device).")
  named = set()
  for part in parts:
    m = re.fullmatch(r"(\w+)\s*=\s*(\d+)", part)
    if not m or m.group(1) not in MESH_AXES or int(m.group(2)) < 1:
      raise ValueError(f"Bad --mesh entry {part!r}: expected AXIS=N with AXIS "
                       f"in {MESH_AXES} and N >= 1, e.g. 'data=2,fsdp=4'.")
    if m.group(1) in named:
      raise ValueError(f"--mesh {spec!r} gives axis {m.group(1)!r} twice.")
    named.add(m.group(1))
    shape[m.group(1)] = int(m.group(2))
  return shape


def make_mesh(spec: str | None) -> jax.sharding.Mesh:
  """A ``(data, fsdp)`` mesh with Auto axis types over the first devices.

  Auto (not Explicit) axes let the compiler gather a sharded matrix where an
  operation needs it whole (the projector SVD).
  """
  shape = parse_mesh(spec)
  n = math.prod(shape.values())
  devices = jax.devices()
  if n > len(devices):
    raise ValueError(f"--mesh {spec!r} needs {n} devices; {len(devices)} "
                     "available.")
  return jax.make_mesh(
      tuple(shape[a] for a in MESH_AXES), MESH_AXES,
      axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
      devices=devices[:n])


def fsdp_spec(shape: Sequence[int], fsdp: int) -> P:
  """Shards a leaf on ``fsdp`` along its largest divisible dimension.

  Used for the parameters and for every optimizer-state leaf alike, so that
  moments shaped like their parameter are sharded exactly like it; low-rank
  moments and projectors follow the same rule on their own shapes. Leaves
  under ``MIN_SHARD_SIZE`` elements or with no divisible dimension are
  replicated.
  """
  if fsdp == 1 or math.prod(shape) < MIN_SHARD_SIZE:
    return P()
  best = None
  for i, d in enumerate(shape):
    if d % fsdp == 0 and (best is None or d > shape[best]):
      best = i
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = "fsdp"
  return P(*spec)


def tree_shardings(mesh: jax.sharding.Mesh, tree: Any) -> Any:
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp)), tree)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

# XLA CPU options that trade step speed for compile speed (--fast-compile).
FAST_COMPILE_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}

# What a run writes into its --out-dir; --overwrite removes exactly these.
RUN_OUTPUTS = ("checkpoints", "metrics.csv", "summary.json", "args.json",
               "loss.png", "tensorboard")
METRIC_FIELDS = ("step", "train_loss", "eval_loss", "eval_ppl", "lr",
                 "tokens_per_s", "elapsed")
# Arguments a resumed run must share with the run that wrote the checkpoint.
RESUME_KEYS = ("model", "optimizer", "rank", "update_proj_gap", "scale",
               "proj_type", "target_modules", "projector_method", "moments",
               "refresh_schedule", "lr",
               "min_lr_ratio", "warmup_ratio", "weight_decay", "max_grad_norm",
               "grad_accum", "batch_size", "seq_len", "steps", "seed", "data",
               "tokenizer", "max_train_bytes", "param_dtype", "scan_layers",
               "weights", "weight_rounding", "weight_group_size",
               "weight_modules")


def tree_bytes(tree: Any) -> int:
  """Sum of ``nbytes`` over the leaves (arrays or ShapeDtypeStructs)."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def memory_usage() -> tuple[int, str]:
  """Peak memory in bytes and where it was measured."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001  (backends without the API)
    stats = None
  if stats and ("peak_bytes_in_use" in stats or "bytes_in_use" in stats):
    return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use"))), \
        "device"
  # ru_maxrss is in KiB on Linux, bytes on macOS.
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == "darwin" else rss * 1024), "process RSS"


def _fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  return f"{n:.1f} TiB"


def _model_tag(model: str) -> str:
  return Path(model).stem if os.path.sep in model or model.endswith(
      ".json") else model


def _read_metrics(path: Path, max_step: int) -> list[dict[str, str]]:
  if not path.exists():
    return []
  with path.open(newline="") as f:
    return [row for row in csv.DictReader(f)
            if row.get("step") and int(row["step"]) <= max_step]


class _TensorBoard:
  """tensorboardX writer, or nothing when disabled or not installed."""

  def __init__(self, logdir: Path | None):
    self.writer = None
    if logdir is None:
      return
    try:
      from tensorboardX import SummaryWriter  # noqa: PLC0415
    except ImportError:
      print("tensorboardX is not installed: no TensorBoard logs.")
      return
    self.writer = SummaryWriter(str(logdir))

  def scalar(self, tag: str, value: float | None, step: int) -> None:
    if self.writer is not None and value is not None:
      self.writer.add_scalar(tag, value, step)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def build_parser() -> cli.ArgumentParser:
  """The command line: model, optimizer, data, parallelism, output flags.

  A bad value is one line on stderr and exit status 2 (``cli.ArgumentParser``).
  """
  p = cli.ArgumentParser(
      prog="python -m examples.pretrain_llama", error_name="pretrain_llama",
      description="Pre-train a LLaMA-style model with GaLore (JAX/Optax).")
  _add_model_flags(p)
  _add_optimizer_flags(p)
  _add_data_flags(p)
  _add_parallelism_flags(p)
  _add_output_flags(p)
  return p


def model_spec(text: str) -> str:
  """``type=`` of ``--model``: a preset or a LLaMA-style ``config.json``."""
  if text in llama.PRESETS:
    return text
  if not os.path.exists(text):
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither a preset ({', '.join(llama.PRESETS)}) nor an "
        "existing config.json file or directory")
  try:
    # The fields of the model's shapes must be there (transformers would
    # silently fill in LLaMA-7B's).
    memory.llama_shape_from_config(memory.read_config_json(text))
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  return text


def mesh_spec(text: str) -> str:
  """``type=`` of ``--mesh``: checked by ``parse_mesh``, kept as written."""
  try:
    parse_mesh(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  return text


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("model")
  g.add_argument("--model", default="tiny", type=model_spec,
                 help=f"preset ({', '.join(llama.PRESETS)}) or a local "
                 "config.json path / directory")
  g.add_argument("--param-dtype", default="float32",
                 choices=("float32", "bfloat16"),
                 help="parameter (and computation) dtype")
  g.add_argument("--remat", action="store_true",
                 help="recompute each decoder layer in the backward pass")
  g.add_argument("--weights", default="float", choices=("float", "int8"),
                 help="store the selected matrices as int8 codes with "
                 "group-wise scales (Q-GaLore); dequantised per step")
  g.add_argument("--weight-rounding", default="stochastic",
                 choices=("stochastic", "nearest"),
                 help="how updated int8 weights are rounded back")
  g.add_argument("--weight-group-size", type=cli.positive_int, default=256,
                 help="values of a matrix row per int8 scale")
  g.add_argument("--weight-modules", type=cli.target_modules_spec,
                 default=None,
                 help="which matrices --weights int8 stores in int8 (same "
                 "syntax as --target-modules, embeddings allowed; default: "
                 "the same selection)")
  g.add_argument("--scan-layers", action="store_true",
                 help="stack the decoder layers and scan over them")


def _add_optimizer_flags(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("optimizer")
  g.add_argument("--optimizer", default="galore_adamw", choices=OPTIMIZERS,
                 help="a Hugging Face Trainer name (galore_optax."
                 "create_optimizer; '_layerwise': each parameter is updated "
                 "inside the backward pass) or optax_contrib_galore "
                 "(optax's GaLore on the same targets)")
  g.add_argument("--rank", type=cli.positive_int, default=64,
                 help="GaLore rank r")
  g.add_argument("--update-proj-gap", type=cli.positive_int, default=50,
                 help="GaLore T: updates between projector refreshes")
  g.add_argument("--scale", type=cli.positive_float, default=0.25,
                 help="GaLore alpha: scale of the projected-back update")
  g.add_argument("--proj-type", default="std",
                 choices=galore_optax.PROJ_TYPES,
                 help="which side of each matrix GaLore projects: std "
                 "(galore_torch's) keeps the larger one, reverse_std the "
                 "smaller; left, right or full (both)")
  g.add_argument("--target-modules", type=cli.target_modules_spec,
                 default="attn,mlp",
                 help="linear layers to project, by module name: comma-"
                 "separated names/substrings/regexes; 're:REGEX' for one "
                 "full-match regex; 'all-linear'; 'all' (every matrix, "
                 "embeddings included)")
  g.add_argument("--projector-method", default="svd",
                 choices=galore_optax.transform.PROJECTOR_METHODS,
                 help="how a refresh computes the projector: exact SVD, a "
                 "randomized range finder or (APOLLO) a random Gaussian")
  g.add_argument("--scale-type", default="channel",
                 choices=galore_optax.apollo.SCALE_TYPES,
                 help="APOLLO's scaling factor: per channel, or per matrix "
                 "(APOLLO-Mini: with --rank 1 --scale 128)")
  g.add_argument("--moments", default="keep",
                 choices=galore_optax.MOMENT_POLICIES,
                 help="GaLore moments at a projector refresh")
  g.add_argument("--refresh-schedule", default="fixed",
                 choices=lazy_refresh.REFRESH_SCHEDULES,
                 help="fixed: every --update-proj-gap updates; lazy: "
                 "Q-GaLore's per-matrix intervals (doubled when successive "
                 "projectors agree); the summary then reports them")
  g.add_argument("--lr", type=cli.positive_float, default=None,
                 help=f"peak learning rate (default: {_GALORE_LR:g} for the "
                 f"GaLore optimizers, {_FULL_RANK_LR:g} for the others)")
  g.add_argument("--min-lr-ratio", type=cli.unit_interval, default=0.1,
                 help="final learning rate / peak")
  g.add_argument("--warmup-ratio", type=cli.unit_interval, default=0.1,
                 help="fraction of the steps spent warming up")
  g.add_argument("--weight-decay", type=cli.non_negative_float, default=0.0,
                 help="decoupled weight decay, as torch.optim.AdamW's")
  g.add_argument("--max-grad-norm", type=cli.non_negative_float, default=1.0,
                 help="clip gradients to this global norm (0: off)")
  g.add_argument("--grad-accum", type=cli.positive_int, default=1,
                 help="micro-batches per optimizer update (optax.MultiSteps)")
  g.add_argument("--fused", action="store_true",
                 help="_layerwise optimizers: between refreshes, make each "
                 "projected kernel's low-rank gradient from the product's "
                 "inputs, never its full gradient (make_layerwise_step("
                 "fused=True))")
  g.add_argument("--layer-residuals", default="recompute",
                 choices=tuple(LAYER_RESIDUALS),
                 help="_layerwise optimizers: what each decoder layer keeps "
                 "for its backward pass: its input only (recompute the "
                 "layer), its dense products' outputs (recompute the rest), "
                 "or all its residuals (no recomputation, an ordinary "
                 "step's activation memory)")


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("data and schedule")
  g.add_argument("--data", nargs="*", default=None,
                 help="stdlib (default), files/dirs/globs, or hf:NAME[:CONFIG]")
  g.add_argument("--tokenizer", default=None,
                 help="byt5 (default) or a local tokenizer directory")
  g.add_argument("--max-train-bytes", type=cli.positive_int, default=None,
                 help="cap on the training text read (default: no cap)")
  g.add_argument("--cache-dir", default=None,
                 help="tokenised-corpus cache (default: ~/.cache/galore_optax)")
  g.add_argument("--batch-size", type=cli.positive_int, default=8,
                 help="sequences per micro-batch")
  g.add_argument("--seq-len", type=cli.positive_int, default=256,
                 help="tokens per training sequence")
  g.add_argument("--steps", type=cli.positive_int, default=64,
                 help="optimizer updates")
  g.add_argument("--eval-every", type=cli.non_negative_int, default=16,
                 help="evaluate every N updates (0: only at start and end)")
  g.add_argument("--eval-batches", type=cli.positive_int, default=4,
                 help="fixed held-out batches per evaluation")
  g.add_argument("--seed", type=cli.seed, default=0,
                 help="seed of the initialisation, the batch order and the "
                 "stochastic rounding")


def _add_parallelism_flags(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("parallelism")
  g.add_argument("--mesh", type=mesh_spec, default=None,
                 help="e.g. 'data=2,fsdp=4' or 'fsdp=8' (default: 1 device)")
  g.add_argument("--distributed", action="store_true",
                 help="multi-host: jax.distributed.initialize() with the "
                 "cluster's auto-detected settings (SLURM, Cloud TPU, ...)")
  g.add_argument("--coordinator", default=None,
                 help="multi-host: address host:port of process 0")
  g.add_argument("--num-processes", type=cli.positive_int, default=None,
                 help="multi-host: number of processes (with --coordinator)")
  g.add_argument("--process-id", type=cli.non_negative_int, default=None,
                 help="multi-host: this process's index (with --coordinator)")


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("output")
  g.add_argument("--out-dir", default=None,
                 help="where the run writes (default: runs/<optimizer>-"
                 "<model>, so a second run of the same command needs "
                 "--resume or --overwrite)")
  reuse = g.add_mutually_exclusive_group()
  reuse.add_argument("--resume", action="store_true",
                     help="continue from the latest checkpoint in --out-dir")
  reuse.add_argument("--overwrite", action="store_true",
                     help="replace an earlier run's outputs in --out-dir ("
                     f"{', '.join(RUN_OUTPUTS)}; other files stay); without "
                     "it or --resume, a --out-dir holding them is an error")
  g.add_argument("--log-every", type=cli.positive_int, default=10,
                 help="fetch losses and update the bar every N updates")
  g.add_argument("--checkpoint-every", type=int, default=0,
                 help="save every N updates (0: only at the end; "
                 "negative: never)")
  g.add_argument("--keep-checkpoints", type=cli.positive_int, default=3,
                 help="how many of the latest checkpoints are kept")
  g.add_argument("--plot", action=argparse.BooleanOptionalAction,
                 default=True, help="write loss.png")
  g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction,
                 default=True, help="write TensorBoard scalars")
  g.add_argument("--progress", action=argparse.BooleanOptionalAction,
                 default=True, help="tqdm progress bar")
  g.add_argument("--fast-compile", action="store_true",
                 help="XLA's cheapest CPU compile settings: 2-4x faster "
                 "compiles, slower steps, float rounding may differ (for "
                 "tests and smoke runs)")


def default_out_dir(args: argparse.Namespace) -> str:
  """``runs/<optimizer>-<model>``: ``--out-dir`` when it is not given."""
  return os.path.join("runs", f"{args.optimizer}-{_model_tag(args.model)}")


def parse_args(argv: Sequence[str] | None,
               parser: argparse.ArgumentParser | None = None
               ) -> argparse.Namespace:
  """Parses and completes the arguments (default ``--lr`` and ``--out-dir``).

  Args:
    argv: command-line arguments (default ``sys.argv[1:]``).
    parser: the parser (default ``build_parser()``).

  Returns:
    The arguments.
  """
  parser = parser or build_parser()
  args = parser.parse_args(argv)
  if ((args.num_processes is not None or args.process_id is not None)
      and not (args.coordinator or args.distributed)):
    parser.error("--num-processes and --process-id need --coordinator (or "
                 "--distributed).")
  if args.fused and not is_layerwise(args.optimizer):
    parser.error("--fused needs a _layerwise optimizer.")
  if (args.layer_residuals != "recompute"
      and not is_layerwise(args.optimizer)):
    parser.error("--layer-residuals needs a _layerwise optimizer.")
  if args.lr is None:
    args.lr = default_lr(args.optimizer)
  if args.out_dir is None:
    args.out_dir = default_out_dir(args)
  if args.data is not None and len(args.data) == 1:
    args.data = args.data[0]
  elif args.data == []:
    args.data = None
  return args


# ---------------------------------------------------------------------------
# Setup: processes, data, model, mesh, steps
# ---------------------------------------------------------------------------


def prepare_run(args: argparse.Namespace) -> tuple[Path, Path]:
  """Joins a multi-host job if asked; makes and returns the output dirs.

  Checkpoints are written jointly by all processes into one directory (a
  shared filesystem across hosts); metrics and plots are per process, those
  of process ``i > 0`` under ``out-dir/process-i`` (without a progress bar).

  Args:
    args: the parsed arguments; ``progress`` is switched off for processes
      other than the first.

  Returns:
    ``(out_dir, checkpoint_dir)``.

  Raises:
    ValueError: if ``--out-dir`` holds an earlier run's outputs and neither
      ``--resume`` nor ``--overwrite`` is given.
  """
  if args.coordinator or args.distributed:
    # Multi-host: one process per host, all running this same command. The
    # mesh then spans every process's devices; each process feeds the parts
    # of the (identical, seeded) global batch its devices hold.
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes,
                               process_id=args.process_id)
  out_dir = Path(args.out_dir)
  ckpt_dir = (out_dir / "checkpoints").absolute()
  if jax.process_index() > 0:
    out_dir = out_dir / f"process-{jax.process_index()}"
    args.progress = False
  replace_earlier_run(args, out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  return out_dir, ckpt_dir


def replace_earlier_run(args: argparse.Namespace, out_dir: Path) -> None:
  """Removes an earlier run's outputs with ``--overwrite``; refuses without.

  Each process looks at its own directory (process 0's holds the shared
  checkpoints); with ``--resume`` the outputs are continued instead.

  Args:
    args: the parsed arguments (``resume``, ``overwrite``, ``out_dir``).
    out_dir: this process's output directory.

  Raises:
    ValueError: if ``out_dir`` holds some of ``RUN_OUTPUTS`` and neither
      ``--resume`` nor ``--overwrite`` is given.
  """
  found = [name for name in RUN_OUTPUTS if (out_dir / name).exists()]
  if found and not (args.resume or args.overwrite):
    which = ("the default --out-dir" if args.out_dir == default_out_dir(args)
             else "--out-dir")
    raise ValueError(
        f"{which} {out_dir} already holds a run ({', '.join(found)}): pass "
        "--resume to continue it, --overwrite to replace it, or another "
        "--out-dir.")
  if args.overwrite:
    for name in found:
      path = out_dir / name
      if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
      else:
        path.unlink()
    if found:
      print(f"--overwrite: removed the earlier run's {', '.join(found)} in "
            f"{out_dir}.")
    if jax.process_count() > 1:
      # No process may write into the checkpoint directory before process 0
      # has removed the old one.
      multihost_utils.sync_global_devices("pretrain_llama: --overwrite done")


@dataclasses.dataclass
class Data:
  """The tokenised corpus, its training batches and fixed held-out batches."""
  corpus: Any
  train_batches: Any
  eval_batches: Any


def load_data(args: argparse.Namespace) -> Data:
  """Loads (or tokenises) the corpus and prints its sizes."""
  corpus = data_lib.load_corpus(
      args.data, tokenizer=args.tokenizer,
      max_train_bytes=args.max_train_bytes, cache_dir=args.cache_dir)
  shard = dict(process_index=jax.process_index(),
               process_count=jax.process_count())
  train_batches = corpus.train_batches(
      seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed, **shard)
  eval_batches = corpus.eval_batches(
      seq_len=args.seq_len, batch_size=args.batch_size,
      num_batches=args.eval_batches, **shard)
  print(f"data: {corpus.source}: {len(corpus.train_tokens):,} train / "
        f"{len(corpus.eval_tokens):,} eval tokens "
        f"({'cached' if corpus.from_cache else 'tokenised'} in "
        f"{corpus.seconds:.1f} s); {train_batches.steps_per_epoch:,} "
        f"micro-batches per epoch; {len(eval_batches)} eval batches")
  return Data(corpus, train_batches, eval_batches)


@dataclasses.dataclass
class Model:
  """The model's structure and the parameters as the train step holds them.

  Attributes:
    config: the model configuration.
    graphdef: the ``nnx`` graph definition, merged with parameter dicts.
    model_kw: keyword arguments of ``llama.build_model`` (dtypes, remat,
      scan_layers).
    dtype: the parameter and computation dtype.
    params_abstract: the float parameters, as ``jax.ShapeDtypeStruct``s.
    stored_abstract: what the train step holds: the parameters, int8 where
      ``--weights int8`` selects them.
    n_params: the number of parameters.
    int8_weights: whether some matrices are stored as int8.
    quantize: float parameters -> stored parameters.
    dequantize: stored parameters -> float parameters.
  """
  config: Any
  graphdef: Any
  model_kw: dict[str, Any]
  dtype: Any
  params_abstract: Any
  stored_abstract: Any
  n_params: int
  int8_weights: bool
  quantize: Callable[[Any], Any]
  dequantize: Callable[[Any], Any]


def setup_model(args: argparse.Namespace, corpus: Any) -> Model:
  """The model's structure (nothing allocated) and its int8 storage."""
  config = llama.get_config(args.model)
  if config.vocab_size < corpus.vocab_size:
    raise ValueError(f"Model vocabulary ({config.vocab_size}) is smaller than "
                     f"the tokenizer's ({corpus.vocab_size}).")
  max_pos = getattr(config, "max_position_embeddings", None)
  if max_pos and args.seq_len > max_pos:
    warnings.warn(f"--seq-len {args.seq_len} exceeds the config's "
                  f"max_position_embeddings {max_pos}.")
  dtype = jnp.dtype(args.param_dtype)
  model_kw = dict(dtype=dtype, param_dtype=dtype, remat=args.remat,
                  scan_layers=args.scan_layers)
  abstract = llama.abstract_model(config, **model_kw)
  graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError("The model has non-parameter state; this script only "
                     "handles nnx.Param variables.")
  params_abstract = nnx.to_pure_dict(abstract_params)
  n_params = llama.param_count(params_abstract)
  int8_weights = args.weights == "int8"
  weight_modules = parse_target_modules(
      args.weight_modules or args.target_modules)

  def quantize(params):
    if not int8_weights:
      return params
    return weight_quantization.quantize_params(
        params, weight_modules, group_size=args.weight_group_size)

  def dequantize(stored):
    # Under jit each int8 matrix is dequantised where the model uses it.
    return weight_quantization.dequantize_params(stored, dtype)

  return Model(
      config=config, graphdef=graphdef, model_kw=model_kw, dtype=dtype,
      params_abstract=params_abstract,
      stored_abstract=jax.eval_shape(quantize, params_abstract),
      n_params=n_params, int8_weights=int8_weights, quantize=quantize,
      dequantize=dequantize)


@dataclasses.dataclass
class Placement:
  """The device mesh and the shardings of the step's inputs and outputs.

  Attributes:
    mesh: the ``(data, fsdp)`` mesh.
    replicated: a sharding that replicates over the whole mesh.
    batch: the sharding of a batch (its first axis over every device).
    params: the shardings of the stored parameters.
    opt_state: the shardings of the optimizer state, once it is known.
  """
  mesh: jax.sharding.Mesh
  replicated: NamedSharding
  batch: NamedSharding
  params: Any
  opt_state: Any = None

  def put(self, batch: Any) -> Any:
    """This process's rows of a batch as global arrays like ``self.batch``."""
    # Each process loads only its rows of the seeded global batch (grain's
    # per-process shard, see examples/data.py), those its devices hold.
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.batch, x), batch)


def setup_mesh(args: argparse.Namespace, model: Model) -> Placement:
  """The mesh of ``--mesh`` and the shardings of batches and parameters."""
  mesh = make_mesh(args.mesh)
  n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if args.batch_size % n_batch_shards:
    raise ValueError(f"--batch-size {args.batch_size} must be divisible by "
                     f"data * fsdp = {n_batch_shards}.")
  return Placement(mesh=mesh, replicated=NamedSharding(mesh, P()),
                   batch=NamedSharding(mesh, P(MESH_AXES, None)),
                   params=tree_shardings(mesh, model.stored_abstract))


def make_update(args: argparse.Namespace, model: Model,
                tx: optax.GradientTransformation
                ) -> tuple[Callable[..., Any], Callable[..., Any]]:
  """The optimizer's init and one update, before ``jax.jit``.

  Args:
    args: the parsed arguments.
    model: the model.
    tx: the optimizer (``build_tx``).

  Returns:
    ``(opt_init, core_step)``: ``opt_init(stored)`` is the optimizer state;
    ``core_step(stored, opt_state, batch, key=None)`` returns the updated
    ``(stored, opt_state, loss)``, ``key`` rounding int8 weights.
  """

  def loss_of(params, batch):
    return llama.loss_fn(nnx.merge(model.graphdef, params), batch)

  if is_layerwise(args.optimizer):
    # Each leaf is updated inside the backward pass as soon as its gradient
    # exists (galore_torch's per-layer mode). A global norm does not exist
    # yet at that point: clipping is per leaf; accumulation is done by the
    # step in the low-rank space.
    # int8 leaves are dequantised inside each layer and rounded back inside
    # the backward pass (keys as in the ordinary step).
    lw = galore_layerwise.make_layerwise_step(
        loss_of, tx, clip_norm=args.max_grad_norm or None,
        accumulate_steps=args.grad_accum, weight_dtype=model.dtype,
        fused=args.fused, recompute=LAYER_RESIDUALS[args.layer_residuals],
        donate=False, jit=False)
    if args.max_grad_norm > 0:
      print(f"layer-wise updates: gradients clipped to norm "
            f"{args.max_grad_norm:g} per leaf, not globally.")
    return lw.init, lw.step

  dequantize = model.dequantize

  def opt_init(stored):
    return tx.init(dequantize(stored))

  def core_step(stored, opt_state, batch, key=None):
    params = dequantize(stored)
    loss, grads = jax.value_and_grad(loss_of)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    if model.int8_weights:
      # int8 matrices: the update is added to the dequantised weight and
      # rounded back, stochastically with a key derived from the step.
      return weight_quantization.apply_updates(
          stored, updates, key=key), opt_state, loss
    return optax.apply_updates(params, updates), opt_state, loss

  return opt_init, core_step


@dataclasses.dataclass
class Steps:
  """The compiled steps and what the run needs to know about them.

  Attributes:
    lrs: the learning rate of update ``k`` (1-based) at index ``k - 1``.
    opt_init: stored parameters -> optimizer state (not jitted).
    opt_abstract: the optimizer state's shapes and dtypes.
    train_step: ``(stored, opt_state, batch, rng, micro_step) -> (stored,
      opt_state, loss)``, jitted, donating the parameters and state.
    eval_step: ``(stored, batch) -> (loss sum, token count)``, jitted.
    traces: how often each was traced (``"train"``, ``"eval"``).
    jit_kw: the keyword arguments of every ``jax.jit`` of the run.
  """
  lrs: np.ndarray
  opt_init: Callable[..., Any]
  opt_abstract: Any
  train_step: Callable[..., Any]
  eval_step: Callable[..., Any]
  traces: dict[str, int]
  jit_kw: dict[str, Any]


def setup_steps(args: argparse.Namespace, model: Model, placement: Placement,
                schedule: optax.Schedule,
                tx: optax.GradientTransformation) -> Steps:
  """Builds the jitted steps around ``tx``; sets the state shardings."""
  jit_kw = {}
  if args.fast_compile and jax.default_backend() == "cpu":
    jit_kw["compiler_options"] = FAST_COMPILE_OPTIONS
  # The learning rate of update k (1-based) is schedule(k - 1); computed
  # once, not with one tiny dispatch per step.
  lrs = np.asarray(jax.jit(jax.vmap(schedule), **jit_kw)(
      jnp.arange(args.steps)))
  opt_init, core_step = make_update(args, model, tx)
  opt_abstract = jax.eval_shape(opt_init, model.stored_abstract)
  placement.opt_state = tree_shardings(placement.mesh, opt_abstract)
  print_setup(args, model, placement, opt_abstract)
  traces = {"train": 0, "eval": 0}

  def train_step(params, opt_state, batch, rng, micro_step):
    traces["train"] += 1  # runs only while tracing
    if not model.int8_weights:
      return core_step(params, opt_state, batch)
    key = None
    if args.weight_rounding == "stochastic":
      key = jax.random.fold_in(
          jax.random.fold_in(jax.random.wrap_key_data(rng), micro_step),
          0x57)  # a stream of its own, apart from other uses of the seed
    return core_step(params, opt_state, batch, key)

  def eval_step(params, batch):
    traces["eval"] += 1
    logits = nnx.merge(model.graphdef, model.dequantize(params))(
        batch["input_ids"])
    loss, count = llama.cross_entropy(logits, batch["labels"])
    return loss * count, count

  sh = placement
  return Steps(
      lrs=lrs, opt_init=opt_init, opt_abstract=opt_abstract,
      train_step=jax.jit(
          train_step, donate_argnums=(0, 1),
          in_shardings=(sh.params, sh.opt_state, sh.batch, sh.replicated,
                        sh.replicated),
          out_shardings=(sh.params, sh.opt_state, sh.replicated), **jit_kw),
      eval_step=jax.jit(
          eval_step, in_shardings=(sh.params, sh.batch),
          out_shardings=(sh.replicated, sh.replicated), **jit_kw),
      traces=traces, jit_kw=jit_kw)


def print_setup(args: argparse.Namespace, model: Model, placement: Placement,
                opt_abstract: Any) -> None:
  """Prints the model, optimizer, mesh and int8-weight line."""
  weights_msg = ""
  if model.int8_weights:
    n_int8 = sum(int(np.prod(x.codes.shape)) for x in jax.tree.leaves(
        model.stored_abstract, is_leaf=weight_quantization.is_quantized)
                 if weight_quantization.is_quantized(x))
    weights_msg = (f"; int8 weights: {n_int8:,} values "
                   f"({args.weight_rounding} rounding, groups of "
                   f"{args.weight_group_size})")
  mesh = placement.mesh
  print(f"model: {args.model} ({model.n_params:,} parameters, "
        f"{_fmt_bytes(tree_bytes(model.params_abstract))} "
        f"{args.param_dtype}); optimizer: {args.optimizer} (lr {args.lr:g}, "
        f"state {_fmt_bytes(tree_bytes(opt_abstract))}); mesh "
        f"{dict(mesh.shape)} on {mesh.devices.size} "
        f"{jax.devices()[0].platform} device(s){weights_msg}")


# ---------------------------------------------------------------------------
# Checkpointing
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class TrainState:
  """The state a checkpoint holds, and where the run starts.

  Attributes:
    params: the stored parameters (int8 where selected).
    opt_state: the optimizer state.
    rng: the run's key data, replicated over the mesh.
    start_step: the updates done before this run (0 unless resumed).
    elapsed_before: the training seconds of the runs before a resume.
  """
  params: Any
  opt_state: Any
  rng: jax.Array
  start_step: int = 0
  elapsed_before: float = 0.0


class Checkpoints:
  """Orbax checkpoints of a ``TrainState``, with data position and arguments.

  Args:
    args: the parsed arguments (``keep_checkpoints``, and the
      ``RESUME_KEYS`` saved with every checkpoint).
    directory: the checkpoint directory (an earlier run's is removed by
      ``prepare_run`` with ``--overwrite``).
  """

  def __init__(self, args: argparse.Namespace, directory: Path):
    import orbax.checkpoint as ocp  # noqa: PLC0415  (slow import, only here)
    self.ocp = ocp
    self.directory = directory
    self.args = args
    self.resume_key = {k: getattr(args, k) for k in RESUME_KEYS}
    options = ocp.CheckpointManagerOptions(
        max_to_keep=args.keep_checkpoints, create=True,
        # Synchronous: the next train step donates (deletes) these buffers.
        enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, step: int, abstract_state: dict[str, Any]
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state saved at ``step`` and its metadata; warns on changed args."""
    ocp = self.ocp
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore()))
    meta = restored["meta"]
    changed = {k: (meta["args"].get(k), v)
               for k, v in self.resume_key.items()
               if json.dumps(meta["args"].get(k)) != json.dumps(v)}
    if changed:
      warnings.warn(f"Resuming with changed arguments {changed}: the run "
                    "will not reproduce an uninterrupted one.")
    return restored["state"], meta

  def save(self, step: int, state: TrainState, elapsed: float) -> None:
    meta = {"step": step, "data_step": step * self.args.grad_accum,
            "seed": self.args.seed, "elapsed": elapsed,
            "args": self.resume_key}
    ocp = self.ocp
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": state.params,
                                     "opt_state": state.opt_state,
                                     "rng": state.rng}),
        meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def restore_or_init(args: argparse.Namespace, model: Model,
                    placement: Placement, steps: Steps,
                    checkpoints: Checkpoints) -> TrainState:
  """The latest checkpoint's state with ``--resume``, else a fresh one."""
  # Replicated over the mesh (not on one device), so that every process
  # of a multi-host job holds it and Orbax can save it.
  rng = jax.device_put(jax.random.key_data(jax.random.key(args.seed)),
                       placement.replicated)
  latest = checkpoints.latest_step() if args.resume else None
  if args.resume and latest is None:
    print(f"--resume: no checkpoint in {checkpoints.directory}; starting "
          "from scratch.")
  if latest is None:
    init = jax.jit(
        lambda: model.quantize(llama.get_params(llama.build_model(
            model.config, rngs=args.seed, **model.model_kw))),
        out_shardings=placement.params, **steps.jit_kw)
    params = init()
    opt_state = jax.jit(steps.opt_init, out_shardings=placement.opt_state,
                        **steps.jit_kw)(params)
    return TrainState(params, opt_state, rng)

  def sharded(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        tree, shardings)

  restored, meta = checkpoints.restore(latest, {
      "params": sharded(model.stored_abstract, placement.params),
      "opt_state": sharded(steps.opt_abstract, placement.opt_state),
      "rng": jax.ShapeDtypeStruct(rng.shape, rng.dtype,
                                  sharding=placement.replicated),
  })
  start_step = int(meta["step"])
  if int(meta["data_step"]) != start_step * args.grad_accum:
    raise ValueError("Checkpoint data position does not match its step.")
  print(f"Resumed from {checkpoints.directory / str(latest)} at step "
        f"{start_step}.")
  return TrainState(restored["params"], restored["opt_state"],
                    restored["rng"], start_step,
                    float(meta.get("elapsed", 0.0)))


# ---------------------------------------------------------------------------
# Metrics, evaluation and the training loop
# ---------------------------------------------------------------------------


class Metrics:
  """``metrics.csv`` (continued on resume), TensorBoard, ``args.json``.

  Args:
    out_dir: the output directory.
    args: the parsed arguments, written to ``args.json``.
    start_step: rows of an earlier run up to this step are kept.
  """

  def __init__(self, out_dir: Path, args: argparse.Namespace,
               start_step: int):
    path = out_dir / "metrics.csv"
    self.rows = _read_metrics(path, start_step) if start_step else []
    with (out_dir / "args.json").open("w") as f:
      json.dump(vars(args), f, indent=2)
    self.file = path.open("w", newline="")
    self.writer = csv.DictWriter(self.file, fieldnames=METRIC_FIELDS)
    self.writer.writeheader()
    self.writer.writerows(self.rows)
    self.file.flush()
    self.tb = _TensorBoard(out_dir / "tensorboard" if args.tensorboard
                           else None)

  def record(self, row: dict[str, Any]) -> None:
    """Appends a row: floats as their exact ``repr``, missing values empty."""
    row = {k: ("" if v is None else (repr(float(v)) if k != "step" else v))
           for k, v in row.items()}
    self.writer.writerow(row)
    self.rows.append(row)

  def flush(self) -> None:
    self.file.flush()

  def close(self) -> None:
    self.file.close()
    self.tb.close()


def evaluate(steps: Steps, placement: Placement, params: Any,
             eval_batches: Any) -> tuple[float, float]:
  """Mean held-out loss per token and its perplexity."""
  total = count = 0.0
  for b in eval_batches:
    s, c = steps.eval_step(params, placement.put(b))
    total += float(s)
    count += float(c)
  loss = total / max(count, 1.0)
  return loss, math.exp(min(loss, 700.0))


@dataclasses.dataclass
class _Window:
  """Losses fetched lazily; a sync per log window, not per step."""
  start: float
  tokens: int = 0
  pending: list = dataclasses.field(default_factory=list)


class _TrainLog:
  """Training losses, learning rates and throughput, one window at a time.

  Args:
    metrics: where the rows go.
    lrs: the learning rate of update ``k`` at index ``k - 1``.
    bar: the tqdm progress bar, or None.
    elapsed: the training seconds so far.
  """

  def __init__(self, metrics: Metrics, lrs: np.ndarray, bar: Any,
               elapsed: Callable[[], float]):
    self.metrics, self.lrs, self.bar, self.elapsed = metrics, lrs, bar, elapsed
    self.window = _Window(start=time.perf_counter())
    self.first_rate: list[float] = []
    self.later_rates: list[float] = []
    self.last_train_loss = float("nan")

  def restart_window(self) -> None:
    self.window = _Window(start=time.perf_counter())

  def flush(self) -> None:
    """Fetches the window's losses, records them and starts a new window."""
    window = self.window
    if not window.pending:
      return
    losses = jax.device_get([l for _, l in window.pending])
    now = time.perf_counter()
    rate = window.tokens / max(now - window.start, 1e-9)
    # The first window of a run includes the compilation: it counts towards
    # the peak only when it is the only one.
    (self.later_rates if self.first_rate else self.first_rate).append(rate)
    tb = self.metrics.tb
    for (step, _), micro in zip(window.pending, losses):
      loss = float(np.mean(micro))
      lr = float(self.lrs[step - 1])
      self.metrics.record({"step": step, "train_loss": loss, "lr": lr,
                           "tokens_per_s": rate, "elapsed": self.elapsed()})
      tb.scalar("train/loss", loss, step)
      tb.scalar("train/lr", lr, step)
      tb.scalar("train/tokens_per_s", rate, step)
      self.last_train_loss = loss
    self.metrics.flush()
    if self.bar is not None:
      self.bar.set_postfix(
          loss=f"{self.last_train_loss:.3f}", tok_s=f"{rate:,.0f}",
          mem=_fmt_bytes(memory_usage()[0]), refresh=False)
    self.restart_window()

  def rates(self) -> list[float]:
    """Tokens per second of the windows that count towards the peak."""
    return self.later_rates or self.first_rate


def _progress_bar(args: argparse.Namespace, start_step: int) -> Any:
  """A tqdm bar over the updates, or None (disabled or not installed)."""
  try:
    from tqdm.auto import tqdm  # noqa: PLC0415
  except ImportError:
    return None
  if not args.progress:
    return None
  return tqdm(total=args.steps, initial=start_step, desc="train",
              unit="step", dynamic_ncols=True, mininterval=0.5)


@dataclasses.dataclass
class Outcome:
  """What the training loop measured.

  Attributes:
    start_eval: ``(loss, perplexity)`` at step 0 (of the first run).
    last_eval: the last ``(loss, perplexity)`` of this run, or None.
    rates: tokens per second of the windows that count towards the peak.
    first_step_s: seconds of the first step, compilation included.
  """
  start_eval: tuple[float, float] | None
  last_eval: tuple[float, float] | None
  rates: list[float]
  first_step_s: float | None


def train(args: argparse.Namespace, data: Data, placement: Placement,
          steps: Steps, state: TrainState, checkpoints: Checkpoints,
          metrics: Metrics) -> Outcome:
  """The training loop: updates, evaluations, logging and checkpoints.

  ``state`` holds the current parameters and optimizer state throughout.
  """
  tokens_per_update = args.batch_size * args.seq_len * args.grad_accum
  start_eval = next(((float(r["eval_loss"]), float(r["eval_ppl"]))
                     for r in metrics.rows if r.get("eval_loss")), None)
  last_eval: tuple[float, float] | None = None
  t_loop = time.perf_counter()

  def elapsed() -> float:
    return state.elapsed_before + time.perf_counter() - t_loop

  def do_eval(step: int) -> tuple[float, float]:
    loss, ppl = evaluate(steps, placement, state.params, data.eval_batches)
    metrics.record({"step": step, "eval_loss": loss, "eval_ppl": ppl,
                    "elapsed": elapsed()})
    metrics.tb.scalar("eval/loss", loss, step)
    metrics.tb.scalar("eval/perplexity", ppl, step)
    return loss, ppl

  if state.start_step == 0:
    start_eval = last_eval = do_eval(0)
    print(f"step 0: eval loss {start_eval[0]:.4f} (ppl {start_eval[1]:.2f})")
  bar = _progress_bar(args, state.start_step)
  log = _TrainLog(metrics, steps.lrs, bar, elapsed)
  step = state.start_step
  first_step_s = None
  t_first = time.perf_counter()
  while step < args.steps:
    micro_losses = []
    for k in range(args.grad_accum):
      micro_step = step * args.grad_accum + k
      batch = placement.put(data.train_batches.batch(micro_step))
      state.params, state.opt_state, loss = steps.train_step(
          state.params, state.opt_state, batch, state.rng,
          np.int32(micro_step))
      micro_losses.append(loss)
      if first_step_s is None:
        loss.block_until_ready()
        first_step_s = time.perf_counter() - t_first
    step += 1
    log.window.pending.append((step, micro_losses))
    log.window.tokens += tokens_per_update
    if bar is not None:
      bar.update(1)
    is_last = step == args.steps
    eval_due = is_last or (args.eval_every and step % args.eval_every == 0)
    ckpt_due = args.checkpoint_every >= 0 and (
        is_last or (args.checkpoint_every
                    and step % args.checkpoint_every == 0))
    if step % args.log_every == 0 or eval_due or ckpt_due:
      log.flush()
    if eval_due:
      last_eval = do_eval(step)
      msg = (f"step {step}: train loss {log.last_train_loss:.4f}, "
             f"eval loss {last_eval[0]:.4f} (ppl {last_eval[1]:.2f})")
      (bar.write if bar is not None else print)(msg)
      metrics.flush()
    if ckpt_due:
      checkpoints.save(step, state, elapsed())
    if eval_due or ckpt_due:
      log.restart_window()  # exclude eval/saving time
  log.flush()
  if bar is not None:
    bar.close()
  return Outcome(start_eval, last_eval, log.rates(), first_step_s)


# ---------------------------------------------------------------------------
# Summary and report
# ---------------------------------------------------------------------------


def summarize(args: argparse.Namespace, model: Model, placement: Placement,
              steps: Steps, state: TrainState, outcome: Outcome,
              rows: list[dict[str, str]], out_dir: Path,
              t_main: float) -> dict[str, Any]:
  """The run's summary dict (see ``summary.json``)."""
  start_eval, last_eval, rates = (outcome.start_eval, outcome.last_eval,
                                  outcome.rates)
  if last_eval is None and rows:  # resumed at the end: nothing ran
    evals = [r for r in rows if r.get("eval_loss")]
    if evals:
      last_eval = (float(evals[-1]["eval_loss"]),
                   float(evals[-1]["eval_ppl"]))
  train_rows = [r for r in rows if r.get("train_loss")]
  mem_bytes, mem_where = memory_usage()

  def sharded_leaves(shardings: Any) -> int:
    return sum(any(a is not None for a in sh.spec)
               for sh in jax.tree.leaves(shardings))

  return {
      "model": args.model,
      "optimizer": args.optimizer,
      "layerwise": is_layerwise(args.optimizer),
      "steps": args.steps,
      "start_step": state.start_step,
      "tokens_per_update": args.batch_size * args.seq_len * args.grad_accum,
      "param_count": model.n_params,
      "param_bytes": tree_bytes(model.stored_abstract),
      "weights": args.weights,
      "opt_state_bytes": tree_bytes(steps.opt_abstract),
      "start_eval_loss": start_eval[0] if start_eval else None,
      "start_eval_ppl": start_eval[1] if start_eval else None,
      "final_eval_loss": last_eval[0] if last_eval else None,
      "final_eval_ppl": last_eval[1] if last_eval else None,
      "final_train_loss": (float(train_rows[-1]["train_loss"])
                           if train_rows else None),
      "peak_tokens_per_s": max(rates) if rates else None,
      "peak_memory_bytes": mem_bytes,
      "peak_memory_source": mem_where,
      "first_step_s": outcome.first_step_s,  # includes compiling the step
      "train_step_traces": steps.traces["train"],
      "eval_step_traces": steps.traces["eval"],
      "mesh": dict(placement.mesh.shape),
      "sharded_param_leaves": sharded_leaves(placement.params),
      "sharded_opt_state_leaves": sharded_leaves(placement.opt_state),
      "wall_time_s": time.perf_counter() - t_main,
      "out_dir": str(out_dir),
      # Per projected leaf and matrix: refreshes, intervals, similarities.
      "lazy_refresh": (lazy_refresh.schedule_summary(jax.device_get(
          state.opt_state)) if args.refresh_schedule == "lazy" else None),
  }


def report(args: argparse.Namespace, summary: dict[str, Any],
           rows: list[dict[str, str]], out_dir: Path) -> None:
  """Writes ``summary.json`` and ``loss.png``; prints the summary."""
  with (out_dir / "summary.json").open("w") as f:
    json.dump(summary, f, indent=2)
  if args.plot:
    compare.plot_runs([compare.make_run(vars(args), rows, args.optimizer)],
                      out_dir / "loss.png",
                      title=f"{args.optimizer} on {args.model}")

  def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)

  print(
      f"\n== {args.optimizer} on {args.model}: {args.steps} steps "
      f"({summary['tokens_per_update']:,} tokens each) ==\n"
      f"eval loss  {fmt(summary['start_eval_loss'], '.4f')} -> "
      f"{fmt(summary['final_eval_loss'], '.4f')}   "
      f"(ppl {fmt(summary['start_eval_ppl'], '.2f')} -> "
      f"{fmt(summary['final_eval_ppl'], '.2f')})\n"
      f"parameters {summary['param_count']:,}; optimizer state "
      f"{_fmt_bytes(summary['opt_state_bytes'])}; peak "
      f"{fmt(summary['peak_tokens_per_s'], ',.0f')} tokens/s; peak memory "
      f"{_fmt_bytes(summary['peak_memory_bytes'])} "
      f"({summary['peak_memory_source']})\n"
      f"wall time {summary['wall_time_s']:.1f} s; outputs in {out_dir}")


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


# Errors of the setup that report bad input: bad values, unusable paths (a
# file where a directory is needed, ...), a missing optional package.
SETUP_ERRORS = (ValueError, OSError, ImportError)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs pre-training; returns (and writes) the summary.

  Args:
    argv: command-line arguments (default ``sys.argv[1:]``).

  Returns:
    The summary dict also written to ``summary.json``.
  """
  t_main = time.perf_counter()
  parser = build_parser()
  args = parse_args(argv, parser)
  # The documented input errors of the setup (a run directory in use, a
  # missing data path, an unreadable config, a mesh larger than the devices,
  # targets that match nothing...) are one line, not a traceback.
  with cli.user_errors(parser, SETUP_ERRORS):
    out_dir, ckpt_dir = prepare_run(args)
    data = load_data(args)
    model = setup_model(args, data.corpus)
    placement = setup_mesh(args, model)
    schedule = make_schedule(args)
    tx = build_tx(args, schedule, model.params_abstract)
    # The optimizer's own checks of the parameters (e.g. moments='project'
    # with 8-bit moments) run in init: trace it here, before any compilation.
    jax.eval_shape(tx.init, model.params_abstract)
  steps = setup_steps(args, model, placement, schedule, tx)
  checkpoints = Checkpoints(args, ckpt_dir)
  state = restore_or_init(args, model, placement, steps, checkpoints)
  metrics = Metrics(out_dir, args, state.start_step)
  outcome = train(args, data, placement, steps, state, checkpoints, metrics)
  metrics.close()
  checkpoints.close()
  if steps.traces["train"] > 1 or steps.traces["eval"] > 1:
    warnings.warn(f"Retraced: train step traced {steps.traces['train']} "
                  f"times, eval step {steps.traces['eval']} times (expected "
                  "once each).")
  summary = summarize(args, model, placement, steps, state, outcome,
                      metrics.rows, out_dir, t_main)
  report(args, summary, metrics.rows, out_dir)
  return summary


if __name__ == "__main__":
  main()
