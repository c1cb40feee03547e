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
* ``metrics.csv``, TensorBoard scalars, ``loss.png`` and ``summary.json`` in
  ``--out-dir``;
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import galore_optax
from galore_optax import layerwise as galore_layerwise
from galore_optax import weight_quantization
from examples import data as data_lib
from examples import llama

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
    "optax_contrib_galore",
)

# Peak learning rates when --lr is not given. GaLore uses the paper's 0.01
# (Table 5, with alpha 0.25); the full-rank baselines a lower rate, as in the
# paper's baselines (they diverge more easily at 0.01).
_GALORE_LR = 1e-2
_FULL_RANK_LR = 3e-3


def default_lr(name: str) -> float:
  return _GALORE_LR if "galore" in name else _FULL_RANK_LR


def is_layerwise(name: str) -> bool:
  """Whether ``name`` asks for per-layer updates in the backward pass."""
  return name != "optax_contrib_galore" and galore_optax.parse_optimizer_name(
      name)[1]


# AdamW hyper-parameters of the paper and of torch.optim.AdamW.
ADAM_B1 = 0.9
ADAM_B2 = 0.999
ADAM_EPS = 1e-8


def parse_target_modules(spec: str | None) -> galore_optax.targets.TargetModules:
  """``--target-modules`` -> a ``galore_optax.targets`` selection.

  Args:
    spec: a comma-separated list of names/substrings/regexes
      (``"attn,mlp"``); ``"re:REGEX"`` for a single regex that must match
      the whole name (Hugging Face's single-string semantics);
      ``"all-linear"`` for every dense kernel; ``"all"`` (or ``None``) for
      every leaf with two or more dimensions.

  Returns:
    ``None``, a string or a list of strings.
  """
  if spec is None or spec.strip().lower() in ("", "all", "none"):
    return None
  spec = spec.strip()
  if spec.startswith("re:"):
    return spec[3:]
  if spec.replace("_", "-") == "all-linear":
    return "all-linear"
  entries = [s.strip() for s in spec.split(",") if s.strip()]
  if not entries:
    raise ValueError(f"Empty --target-modules {spec!r}.")
  return entries


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
    ValueError: for an unknown name.
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
                seed=args.seed)
  if "b1" in accepted:  # the AdamW family (Adafactor has its own eps)
    wanted.update(b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS)
  kwargs = {k: v for k, v in wanted.items() if k in accepted}
  galore = base in galore_optax.names.GALORE_NAMES
  if galore and targets is None:
    targets = ".*"  # every leaf with two or more dimensions
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
  """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}`` (missing axes: 1)."""
  shape = {axis: 1 for axis in MESH_AXES}
  if not spec:
    return shape
  for part in spec.split(","):
    part = part.strip()
    if not part:
      continue
    m = re.fullmatch(r"(\w+)\s*=\s*(\d+)", part)
    if not m or m.group(1) not in MESH_AXES or int(m.group(2)) < 1:
      raise ValueError(f"Bad --mesh entry {part!r}: expected AXIS=N with AXIS "
                       f"in {MESH_AXES} and N >= 1, e.g. 'data=2,fsdp=4'.")
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

METRIC_FIELDS = ("step", "train_loss", "eval_loss", "eval_ppl", "lr",
                 "tokens_per_s", "elapsed")
# Arguments a resumed run must share with the run that wrote the checkpoint.
RESUME_KEYS = ("model", "optimizer", "rank", "update_proj_gap", "scale",
               "proj_type", "target_modules", "projector_method", "moments", "lr",
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


def _float(x: str | None) -> float | None:
  return float(x) if x not in (None, "") else None


def plot_losses(rows: list[dict[str, str]], path: Path, title: str) -> bool:
  """Writes the train and eval loss curves to a PNG (matplotlib, Agg)."""
  try:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    print("matplotlib is not installed: no plot.")
    return False
  train = [(int(r["step"]), float(r["train_loss"])) for r in rows
           if r.get("train_loss")]
  evals = [(int(r["step"]), float(r["eval_loss"])) for r in rows
           if r.get("eval_loss")]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  if train:
    ax.plot(*zip(*train), lw=1, alpha=0.8, label="train loss")
  if evals:
    ax.plot(*zip(*evals), "o-", lw=1.5, label="eval loss")
  ax.set_xlabel("optimizer step")
  ax.set_ylabel("cross-entropy (nats / token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


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


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m examples.pretrain_llama",
      description="Pre-train a LLaMA-style model with GaLore (JAX/Optax).",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  g = p.add_argument_group("model")
  g.add_argument("--model", default="tiny",
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
  g.add_argument("--weight-group-size", type=int, default=256,
                 help="values of a matrix row per int8 scale")
  g.add_argument("--weight-modules", default=None,
                 help="which matrices --weights int8 stores in int8 (same "
                 "syntax as --target-modules; default: the same selection)")
  g.add_argument("--scan-layers", action="store_true",
                 help="stack the decoder layers and scan over them")
  g = p.add_argument_group("optimizer")
  g.add_argument("--optimizer", default="galore_adamw", choices=OPTIMIZERS)
  g.add_argument("--rank", type=int, default=64, help="GaLore rank r")
  g.add_argument("--update-proj-gap", type=int, default=50,
                 help="GaLore T: updates between projector refreshes")
  g.add_argument("--scale", type=float, default=0.25, help="GaLore alpha")
  g.add_argument("--proj-type", default="std",
                 choices=galore_optax.PROJ_TYPES)
  g.add_argument("--target-modules", default="attn,mlp",
                 help="comma-separated names/substrings/regexes; 're:REGEX' "
                 "for one full-match regex; 'all-linear'; 'all'")
  g.add_argument("--projector-method", default="svd",
                 choices=galore_optax.PROJECTOR_METHODS)
  g.add_argument("--moments", default="keep",
                 choices=galore_optax.MOMENT_POLICIES,
                 help="GaLore moments at a projector refresh")
  g.add_argument("--lr", type=float, default=None,
                 help=f"peak learning rate (default: {_GALORE_LR:g} for the "
                 f"GaLore optimizers, {_FULL_RANK_LR:g} for the others)")
  g.add_argument("--min-lr-ratio", type=float, default=0.1,
                 help="final learning rate / peak")
  g.add_argument("--warmup-ratio", type=float, default=0.1,
                 help="fraction of the steps spent warming up")
  g.add_argument("--weight-decay", type=float, default=0.0)
  g.add_argument("--max-grad-norm", type=float, default=1.0,
                 help="clip gradients to this global norm (0: off)")
  g.add_argument("--grad-accum", type=int, default=1,
                 help="micro-batches per optimizer update (optax.MultiSteps)")
  g = p.add_argument_group("data and schedule")
  g.add_argument("--data", nargs="*", default=None,
                 help="stdlib (default), files/dirs/globs, or hf:NAME[:CONFIG]")
  g.add_argument("--tokenizer", default=None,
                 help="byt5 (default) or a local tokenizer directory")
  g.add_argument("--max-train-bytes", type=int, default=None,
                 help="cap on the training text read")
  g.add_argument("--cache-dir", default=None,
                 help="tokenised-corpus cache (default ~/.cache/galore_optax)")
  g.add_argument("--batch-size", type=int, default=8,
                 help="sequences per micro-batch")
  g.add_argument("--seq-len", type=int, default=256)
  g.add_argument("--steps", type=int, default=64, help="optimizer updates")
  g.add_argument("--eval-every", type=int, default=16,
                 help="evaluate every N updates (0: only at start and end)")
  g.add_argument("--eval-batches", type=int, default=4,
                 help="fixed held-out batches per evaluation")
  g.add_argument("--seed", type=int, default=0)
  g = p.add_argument_group("parallelism")
  g.add_argument("--mesh", default=None,
                 help="e.g. 'data=2,fsdp=4' or 'fsdp=8' (default: 1 device)")
  g.add_argument("--distributed", action="store_true",
                 help="multi-host: jax.distributed.initialize() with the "
                 "cluster's auto-detected settings (SLURM, Cloud TPU, ...)")
  g.add_argument("--coordinator", default=None,
                 help="multi-host: address host:port of process 0")
  g.add_argument("--num-processes", type=int, default=None,
                 help="multi-host: number of processes (with --coordinator)")
  g.add_argument("--process-id", type=int, default=None,
                 help="multi-host: this process's index (with --coordinator)")
  g = p.add_argument_group("output")
  g.add_argument("--out-dir", default=None,
                 help="default runs/<optimizer>-<model>")
  g.add_argument("--log-every", type=int, default=10,
                 help="fetch losses and update the bar every N updates")
  g.add_argument("--checkpoint-every", type=int, default=0,
                 help="save every N updates (0: only at the end; "
                 "negative: never)")
  g.add_argument("--keep-checkpoints", type=int, default=3)
  g.add_argument("--resume", action="store_true",
                 help="continue from the latest checkpoint in --out-dir")
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
  return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  args = build_parser().parse_args(argv)
  if args.lr is None:
    args.lr = default_lr(args.optimizer)
  for name in ("steps", "batch_size", "seq_len", "grad_accum", "rank",
               "update_proj_gap", "eval_batches", "log_every",
               "weight_group_size"):
    if getattr(args, name) < 1:
      raise SystemExit(f"--{name.replace('_', '-')} must be >= 1.")
  if args.out_dir is None:
    args.out_dir = os.path.join(
        "runs", f"{args.optimizer}-{_model_tag(args.model)}")
  if args.data is not None and len(args.data) == 1:
    args.data = args.data[0]
  elif args.data == []:
    args.data = None
  return args


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Window:
  """Losses fetched lazily; a sync per log window, not per step."""
  start: float
  tokens: int = 0
  pending: list = dataclasses.field(default_factory=list)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs pre-training; returns (and writes) the summary.

  Args:
    argv: command-line arguments (default ``sys.argv[1:]``).

  Returns:
    The summary dict also written to ``summary.json``.
  """
  t_main = time.perf_counter()
  args = parse_args(argv)
  if args.coordinator or args.distributed:
    # Multi-host: one process per host, all running this same command. The
    # mesh then spans every process's devices; each process feeds the parts
    # of the (identical, seeded) global batch its devices hold.
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes,
                               process_id=args.process_id)
  out_dir = Path(args.out_dir)
  # Checkpoints are written jointly by all processes into one directory
  # (a shared filesystem across hosts); metrics and plots are per process.
  ckpt_dir = (out_dir / "checkpoints").absolute()
  if jax.process_index() > 0:
    out_dir = out_dir / f"process-{jax.process_index()}"
    args.progress = False
  out_dir.mkdir(parents=True, exist_ok=True)

  import orbax.checkpoint as ocp  # noqa: PLC0415  (slow import, only here)

  # -- data ----------------------------------------------------------------
  corpus = data_lib.load_corpus(
      args.data, tokenizer=args.tokenizer,
      max_train_bytes=args.max_train_bytes, cache_dir=args.cache_dir)
  train_batches = corpus.train_batches(
      seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
  eval_batches = corpus.eval_batches(
      seq_len=args.seq_len, batch_size=args.batch_size,
      num_batches=args.eval_batches)
  print(f"data: {corpus.source}: {len(corpus.train_tokens):,} train / "
        f"{len(corpus.eval_tokens):,} eval tokens "
        f"({'cached' if corpus.from_cache else 'tokenised'} in "
        f"{corpus.seconds:.1f} s); {train_batches.steps_per_epoch:,} "
        f"micro-batches per epoch; {len(eval_batches)} eval batches")

  # -- model ---------------------------------------------------------------
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

  # What the train step holds: the parameters, int8 where selected.
  stored_abstract = jax.eval_shape(quantize, params_abstract)

  # -- mesh and shardings --------------------------------------------------
  mesh = make_mesh(args.mesh)
  n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if args.batch_size % n_batch_shards:
    raise ValueError(f"--batch-size {args.batch_size} must be divisible by "
                     f"data * fsdp = {n_batch_shards}.")
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(MESH_AXES, None))
  param_sh = tree_shardings(mesh, stored_abstract)

  jit_kw = {}
  if args.fast_compile and jax.default_backend() == "cpu":
    jit_kw["compiler_options"] = FAST_COMPILE_OPTIONS
  schedule = make_schedule(args)
  # The learning rate of update k (1-based) is schedule(k - 1); computed
  # once, not with one tiny dispatch per step.
  lrs = np.asarray(jax.jit(jax.vmap(schedule), **jit_kw)(
      jnp.arange(args.steps)))
  tx = build_tx(args, schedule, params_abstract)

  def loss_of(params, batch):
    return llama.loss_fn(nnx.merge(graphdef, params), batch)

  layerwise = is_layerwise(args.optimizer)
  if layerwise:
    # Each leaf is updated inside the backward pass as soon as its gradient
    # exists (galore_torch's per-layer mode). A global norm does not exist
    # yet at that point: clipping is per leaf; accumulation is done by the
    # step in the low-rank space.
    # int8 leaves are dequantised inside each layer and rounded back inside
    # the backward pass (keys as in the ordinary step).
    lw = galore_layerwise.make_layerwise_step(
        loss_of, tx, clip_norm=args.max_grad_norm or None,
        accumulate_steps=args.grad_accum, weight_dtype=dtype, donate=False,
        jit=False)
    core_step = lw.step
    opt_init = lw.init
    if args.max_grad_norm > 0:
      print(f"layer-wise updates: gradients clipped to norm "
            f"{args.max_grad_norm:g} per leaf, not globally.")
  else:
    opt_init = lambda stored: tx.init(dequantize(stored))

    def core_step(stored, opt_state, batch, key=None):
      params = dequantize(stored)
      loss, grads = jax.value_and_grad(loss_of)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      if int8_weights:
        # int8 matrices: the update is added to the dequantised weight and
        # rounded back, stochastically with a key derived from the step.
        return weight_quantization.apply_updates(
            stored, updates, key=key), opt_state, loss
      return optax.apply_updates(params, updates), opt_state, loss

  opt_abstract = jax.eval_shape(opt_init, stored_abstract)
  weights_msg = ""
  if int8_weights:
    n_int8 = sum(int(np.prod(x.codes.shape)) for x in jax.tree.leaves(
        stored_abstract, is_leaf=weight_quantization.is_quantized)
                 if weight_quantization.is_quantized(x))
    weights_msg = (f"; int8 weights: {n_int8:,} values "
                   f"({args.weight_rounding} rounding, groups of "
                   f"{args.weight_group_size})")
  opt_sh = tree_shardings(mesh, opt_abstract)
  opt_bytes = tree_bytes(opt_abstract)
  print(f"model: {args.model} ({n_params:,} parameters, "
        f"{_fmt_bytes(tree_bytes(params_abstract))} {args.param_dtype}); "
        f"optimizer: {args.optimizer} (lr {args.lr:g}, state "
        f"{_fmt_bytes(opt_bytes)}); mesh {dict(mesh.shape)} on "
        f"{mesh.devices.size} {jax.devices()[0].platform} device(s)"
        f"{weights_msg}")

  traces = {"train": 0, "eval": 0}

  def train_step(params, opt_state, batch, rng, micro_step):
    traces["train"] += 1  # runs only while tracing
    if not int8_weights:
      return core_step(params, opt_state, batch)
    key = None
    if args.weight_rounding == "stochastic":
      key = jax.random.fold_in(
          jax.random.fold_in(jax.random.wrap_key_data(rng), micro_step),
          0x57)  # a stream of its own, apart from other uses of the seed
    return core_step(params, opt_state, batch, key)

  def eval_step(params, batch):
    traces["eval"] += 1
    logits = nnx.merge(graphdef, dequantize(params))(batch["input_ids"])
    loss, count = llama.cross_entropy(logits, batch["labels"])
    return loss * count, count

  train_step = jax.jit(
      train_step, donate_argnums=(0, 1),
      in_shardings=(param_sh, opt_sh, batch_sharding, replicated,
                    replicated),
      out_shardings=(param_sh, opt_sh, replicated), **jit_kw)
  eval_step = jax.jit(eval_step, in_shardings=(param_sh, batch_sharding),
                      out_shardings=(replicated, replicated), **jit_kw)

  def put(batch):
    # Every process holds the whole global batch (a pure function of seed
    # and step) and provides the slices of its own devices.
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(
            x.shape, batch_sharding, lambda index: x[index]), batch)

  def evaluate(params) -> tuple[float, float]:
    total = count = 0.0
    for b in eval_batches:
      s, c = eval_step(params, put(b))
      total += float(s)
      count += float(c)
    loss = total / max(count, 1.0)
    return loss, math.exp(min(loss, 700.0))

  # -- state: fresh or restored ---------------------------------------------
  # Replicated over the mesh (not on one device), so that every process
  # of a multi-host job holds it and Orbax can save it.
  rng_key = jax.device_put(jax.random.key_data(jax.random.key(args.seed)),
                           replicated)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=args.keep_checkpoints, create=True,
      # Synchronous: the next train step donates (deletes) these buffers.
      enable_async_checkpointing=False)
  if not args.resume and ckpt_dir.exists():
    print(f"Not resuming: removing the old checkpoints in {ckpt_dir}.")
    shutil.rmtree(ckpt_dir)
  manager = ocp.CheckpointManager(ckpt_dir, options=options)
  resume_key = {k: getattr(args, k) for k in RESUME_KEYS}
  start_step, elapsed_before = 0, 0.0
  latest = manager.latest_step() if args.resume else None
  if args.resume and latest is None:
    print(f"--resume: no checkpoint in {ckpt_dir}; starting from scratch.")
  if latest is not None:
    abstract_state = {
        "params": jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            stored_abstract, param_sh),
        "opt_state": jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            opt_abstract, opt_sh),
        "rng": jax.ShapeDtypeStruct(rng_key.shape, rng_key.dtype,
                                    sharding=replicated),
    }
    restored = manager.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore()))
    meta = restored["meta"]
    changed = {k: (meta["args"].get(k), v) for k, v in resume_key.items()
               if json.dumps(meta["args"].get(k)) != json.dumps(v)}
    if changed:
      warnings.warn(f"Resuming with changed arguments {changed}: the run "
                    "will not reproduce an uninterrupted one.")
    params = restored["state"]["params"]
    opt_state = restored["state"]["opt_state"]
    rng_key = restored["state"]["rng"]
    start_step = int(meta["step"])
    elapsed_before = float(meta.get("elapsed", 0.0))
    if int(meta["data_step"]) != start_step * args.grad_accum:
      raise ValueError("Checkpoint data position does not match its step.")
    print(f"Resumed from {ckpt_dir / str(latest)} at step {start_step}.")
  else:
    init = jax.jit(
        lambda: quantize(llama.get_params(llama.build_model(
            config, rngs=args.seed, **model_kw))),
        out_shardings=param_sh, **jit_kw)
    params = init()
    opt_state = jax.jit(opt_init,
                        out_shardings=opt_sh, **jit_kw)(params)

  def save(step: int, elapsed: float) -> None:
    meta = {"step": step, "data_step": step * args.grad_accum,
            "seed": args.seed, "elapsed": elapsed, "args": resume_key}
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(
            {"params": params, "opt_state": opt_state, "rng": rng_key}),
        meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()

  # -- outputs -------------------------------------------------------------
  metrics_path = out_dir / "metrics.csv"
  rows = _read_metrics(metrics_path, start_step) if start_step else []
  with (out_dir / "args.json").open("w") as f:
    json.dump(vars(args), f, indent=2)
  metrics_file = metrics_path.open("w", newline="")
  writer = csv.DictWriter(metrics_file, fieldnames=METRIC_FIELDS)
  writer.writeheader()
  writer.writerows(rows)
  metrics_file.flush()
  tb = _TensorBoard(out_dir / "tensorboard" if args.tensorboard else None)

  def record(row: dict[str, Any]) -> None:
    row = {k: ("" if v is None else (repr(float(v)) if k != "step" else v))
           for k, v in row.items()}
    writer.writerow(row)
    rows.append(row)

  # -- loop ----------------------------------------------------------------
  tokens_per_update = args.batch_size * args.seq_len * args.grad_accum
  start_eval = None
  for r in rows:  # a resumed run's first evaluation
    if r.get("eval_loss"):
      start_eval = (float(r["eval_loss"]), float(r["eval_ppl"]))
      break
  last_eval: tuple[float, float] | None = None
  rates: list[float] = []
  t_loop = time.perf_counter()

  def elapsed() -> float:
    return elapsed_before + time.perf_counter() - t_loop

  def do_eval(step: int) -> tuple[float, float]:
    loss, ppl = evaluate(params)
    record({"step": step, "eval_loss": loss, "eval_ppl": ppl,
            "elapsed": elapsed()})
    tb.scalar("eval/loss", loss, step)
    tb.scalar("eval/perplexity", ppl, step)
    return loss, ppl

  if start_step == 0:
    start_eval = last_eval = do_eval(0)
    print(f"step 0: eval loss {start_eval[0]:.4f} (ppl {start_eval[1]:.2f})")

  try:
    from tqdm.auto import tqdm  # noqa: PLC0415
  except ImportError:
    tqdm = None
  bar = None
  if tqdm is not None and args.progress:
    bar = tqdm(total=args.steps, initial=start_step, desc="train",
               unit="step", dynamic_ncols=True, mininterval=0.5)
  window = _Window(start=time.perf_counter())
  first_rate: list[float] = []
  last_train_loss = [float("nan")]

  def flush() -> None:
    nonlocal window
    if not window.pending:
      return
    losses = jax.device_get([l for _, l in window.pending])
    now = time.perf_counter()
    rate = window.tokens / max(now - window.start, 1e-9)
    # The first window of a run includes the compilation: it counts towards
    # the peak only when it is the only one.
    (rates if first_rate else first_rate).append(rate)
    for (step, _), micro in zip(window.pending, losses):
      loss = float(np.mean(micro))
      lr = float(lrs[step - 1])
      record({"step": step, "train_loss": loss, "lr": lr,
              "tokens_per_s": rate, "elapsed": elapsed()})
      tb.scalar("train/loss", loss, step)
      tb.scalar("train/lr", lr, step)
      tb.scalar("train/tokens_per_s", rate, step)
      last_train_loss[0] = loss
    metrics_file.flush()
    if bar is not None:
      bar.set_postfix(loss=f"{last_train_loss[0]:.3f}", tok_s=f"{rate:,.0f}",
                      mem=_fmt_bytes(memory_usage()[0]), refresh=False)
    window = _Window(start=time.perf_counter())

  step = start_step
  first_step_s = None
  t_first = time.perf_counter()
  while step < args.steps:
    micro_losses = []
    for k in range(args.grad_accum):
      batch = put(train_batches.batch(step * args.grad_accum + k))
      params, opt_state, loss = train_step(
          params, opt_state, batch, rng_key,
          np.int32(step * args.grad_accum + k))
      micro_losses.append(loss)
      if first_step_s is None:
        loss.block_until_ready()
        first_step_s = time.perf_counter() - t_first
    step += 1
    window.pending.append((step, micro_losses))
    window.tokens += tokens_per_update
    if bar is not None:
      bar.update(1)
    is_last = step == args.steps
    eval_due = is_last or (args.eval_every and step % args.eval_every == 0)
    ckpt_due = args.checkpoint_every >= 0 and (
        is_last or (args.checkpoint_every
                    and step % args.checkpoint_every == 0))
    if step % args.log_every == 0 or eval_due or ckpt_due:
      flush()
    if eval_due:
      last_eval = do_eval(step)
      msg = (f"step {step}: train loss {last_train_loss[0]:.4f}, "
             f"eval loss {last_eval[0]:.4f} (ppl {last_eval[1]:.2f})")
      (bar.write if bar is not None else print)(msg)
      metrics_file.flush()
    if ckpt_due:
      save(step, elapsed())
    if eval_due or ckpt_due:
      window = _Window(start=time.perf_counter())  # exclude eval/saving time
  flush()
  if not rates:
    rates.extend(first_rate)
  if bar is not None:
    bar.close()
  metrics_file.close()
  tb.close()
  manager.close()

  if traces["train"] > 1 or traces["eval"] > 1:
    warnings.warn(f"Retraced: train step traced {traces['train']} times, eval "
                  f"step {traces['eval']} times (expected once each).")

  # -- summary -------------------------------------------------------------
  if last_eval is None and rows:  # resumed at the end: nothing ran
    evals = [r for r in rows if r.get("eval_loss")]
    if evals:
      last_eval = (float(evals[-1]["eval_loss"]),
                   float(evals[-1]["eval_ppl"]))
  train_rows = [r for r in rows if r.get("train_loss")]
  mem_bytes, mem_where = memory_usage()
  summary = {
      "model": args.model,
      "optimizer": args.optimizer,
      "layerwise": layerwise,
      "steps": args.steps,
      "start_step": start_step,
      "tokens_per_update": tokens_per_update,
      "param_count": n_params,
      "param_bytes": tree_bytes(stored_abstract),
      "weights": args.weights,
      "opt_state_bytes": opt_bytes,
      "start_eval_loss": start_eval[0] if start_eval else None,
      "start_eval_ppl": start_eval[1] if start_eval else None,
      "final_eval_loss": last_eval[0] if last_eval else None,
      "final_eval_ppl": last_eval[1] if last_eval else None,
      "final_train_loss": (float(train_rows[-1]["train_loss"])
                           if train_rows else None),
      "peak_tokens_per_s": max(rates) if rates else None,
      "peak_memory_bytes": mem_bytes,
      "peak_memory_source": mem_where,
      "first_step_s": first_step_s,  # includes compiling the step
      "train_step_traces": traces["train"],
      "eval_step_traces": traces["eval"],
      "mesh": dict(mesh.shape),
      "sharded_param_leaves": sum(
          any(a is not None for a in sh.spec)
          for sh in jax.tree.leaves(param_sh)),
      "sharded_opt_state_leaves": sum(
          any(a is not None for a in sh.spec)
          for sh in jax.tree.leaves(opt_sh)),
      "wall_time_s": time.perf_counter() - t_main,
      "out_dir": str(out_dir),
  }
  with (out_dir / "summary.json").open("w") as f:
    json.dump(summary, f, indent=2)
  if args.plot:
    plot_losses(rows, out_dir / "loss.png",
                f"{args.optimizer} on {args.model}")

  def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)

  print(
      f"\n== {args.optimizer} on {args.model}: {args.steps} steps "
      f"({tokens_per_update:,} tokens each) ==\n"
      f"eval loss  {fmt(summary['start_eval_loss'], '.4f')} -> "
      f"{fmt(summary['final_eval_loss'], '.4f')}   "
      f"(ppl {fmt(summary['start_eval_ppl'], '.2f')} -> "
      f"{fmt(summary['final_eval_ppl'], '.2f')})\n"
      f"parameters {n_params:,}; optimizer state "
      f"{_fmt_bytes(opt_bytes)}; peak {fmt(summary['peak_tokens_per_s'], ',.0f')}"
      f" tokens/s; peak memory {_fmt_bytes(mem_bytes)} ({mem_where})\n"
      f"wall time {summary['wall_time_s']:.1f} s; outputs in {out_dir}")
  return summary


if __name__ == "__main__":
  main()
