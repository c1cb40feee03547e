"""Train-step time: GaLore modes and projector methods vs the baselines.

A LLaMA-shaped model (examples/llama.py presets, float32, random tokens: the
data does not change the cost; batch ``--batch-size`` x ``--seq-len``,
default 1 x 256 as in BENCHMARKS.md, and 8 x 256 or 4 x 256 are the sizes
people train with) and one jitted train step (forward, backward, optimizer
update, apply; parameters and state donated) per optimizer or mode:

* ``optax.adamw``, ordinary, per-layer and per-layer "kept";
* ``optax.contrib.galore`` on the attention and MLP matrices (AdamW on the
  rest), the in-ecosystem peer;
* ``galore_adamw`` with the exact SVD and with the randomized method, each
  with and without ``stagger_refresh`` (ordinary steps);
* ``galore_adamw`` (exact SVD) per-layer, per-layer fused and both
  "kept", and both "products";
* ``apollo_adamw`` (random projection at the table's rank, per-channel scaling)
  and ``apollo_mini`` (rank 1, per-matrix scaling), issue 24's SVD-free peers,
  and ``fira_adamw`` (exact SVD, plus the norm-limited residual).

"Per-layer" is ``galore_optax.layerwise.make_layerwise_step``: each leaf is
updated inside the backward pass (the model's products go through
``layerwise.dense``, its layers through ``layerwise.call_layer``); "fused"
(``fused=True``) makes, between refreshes, each projected kernel's low-rank
gradient from the product's inputs without its ``m x n`` gradient; "kept"
(``recompute=False``) keeps each layer's forward residuals instead of
recomputing the layer in the backward pass, and "products" (``recompute=
layerwise.KEEP_DENSE_OUTPUTS``, a checkpoint policy) keeps only its
``dense`` products' outputs and recomputes the rest. All
GaLore runs share rank, gap and targets (attention + MLP); no run clips
gradients.

Steps. Each optimizer runs one warm-up step on copies of its parameters and
state (first-execution costs), then step 0 (a refresh of every projector)
and ``--window`` more, with ``--interleave`` step by step in round-robin
(so machine load hits all alike). Reported per optimizer: compile time
(``lower().compile()``); the median ordinary step (every step but the
refreshes, those at a multiple of ``--update-proj-gap``); the refresh step
(median of the refresh steps, step 0 included); the amortised step over a
window of ``gap`` steps with its one refresh, ``(refresh + (gap - 1) *
median) / gap``; and, when ``--window >= --update-proj-gap``, the measured
mean over the full windows that follow step 0 (each contains one refresh).
Staggered runs refresh some projectors on most steps of a window: their
"refresh" is step 0 (every projector), and their measured window mean is
the figure to read. Ratios: to ``optax.adamw``'s amortised step (its
median: it never refreshes) and to ``optax.contrib.galore``'s.

Flops. XLA's count from ``compiled.cost_analysis()["flops"]``. Measured on
XLA:CPU with toys (jax 0.10; every run prints its own backend's finding,
``cost_analysis_semantics``): a ``lax.cond`` counts as its costliest branch
(not the sum of both, nor the branch taken, in either branch order), a
while loop's body counts once whatever its trip count, and decompositions
that are library calls (SVD, QR, eigh) count as zero. So the compiled
step's count of a GaLore step is its ordinary path plus, where the refresh
branch does more arithmetic than the ordinary one, that excess (the fused
step's refresh branch makes the full gradient, its ordinary branch only the
low-rank one). The "ordinary path" column is therefore the count of a second
compilation in which no refresh exists (``galore_optax.refresh.is_due``
patched to a constant false for that trace, so XLA removes the refresh
branches and loops); it is never run. ``optax.contrib.galore``'s refresh
conds hold only its SVDs (counted as zero), so its compiled count is its
ordinary path; ``optax.adamw`` has no refresh. With both per-layer
``galore_adamw`` rows, a last line compares the fused step's saving of
ordinary-path flops with issue #26's arithmetic (``expected_fused_saving``).
"GB accessed" is XLA's estimate of the compiled step's memory traffic
(``"bytes accessed"``, counted the same way), "temps" its temporary buffers
(``memory_analysis``), and "page faults" the median minor page faults of
the process per ordinary step (``getrusage``): first touches of memory
pages, which a step pays for every fresh page of its buffers. "User CPU" and
"system CPU" are the process's CPU seconds per ordinary step (medians, all
threads): the first is the step's computation, the second mostly the kernel
serving those page faults, whose price is the machine's (on a virtual
machine that hands freed memory back to its host, a page re-touched after
being handed back costs a host fault too, so which step pays depends on what
ran before it). Their ratio to AdamW's is the comparison that no machine's
memory manager moves.

Run from the repository root (on whatever backend JAX has; nothing is
CPU-specific)::

    python -m benchmarks.step_time --model 60m --window 200
    python -m benchmarks.step_time --model 60m --batch-size 8 --interleave \
        --window 200 --only optax.adamw "optax.adamw per-layer" \
        optax.contrib.galore "galore_adamw svd" "galore_adamw per-layer" \
        "galore_adamw per-layer fused"
    python -m benchmarks.step_time --model 350m --batch-size 4 --interleave \
        --window 200 --only optax.adamw "optax.adamw per-layer" \
        optax.contrib.galore "galore_adamw svd" "galore_adamw per-layer" \
        "galore_adamw per-layer fused"
    python -m benchmarks.step_time --model 350m --interleave \
        --only optax.contrib.galore "galore_adamw randomized staggered"
    python -m benchmarks.step_time --model 350m --compile-only --processes 5
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import mmap
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import galore_optax
from examples import llama
from galore_optax import layerwise
from galore_optax import memory
from galore_optax import refresh

TARGETS = ["attn", "mlp"]
# The paper's rank for each size (tiny: the example's default).
PAPER_RANKS = memory.DEFAULT_RANKS
NO_REFRESH, REFRESH_ALL, STAGGERED = "none", "all", "staggered"


@dataclasses.dataclass(frozen=True)
class Mode:
  """One optimizer in one kind of train step.

  Attributes:
    make_tx: builds the optimizer.
    per_layer: run it with ``layerwise.make_layerwise_step``.
    fused: ``make_layerwise_step(..., fused=True)``.
    recompute: ``make_layerwise_step``'s ``recompute`` (per-layer only): a
      bool or a ``jax.checkpoint`` policy.
    refreshes: ``NO_REFRESH``, ``REFRESH_ALL`` (every projector at each
      multiple of the gap) or ``STAGGERED``.
    refresh_by_is_due: its refreshes are decided by
      ``galore_optax.refresh.is_due`` (so they can be compiled away).
  """

  make_tx: Callable[[], optax.GradientTransformation]
  per_layer: bool = False
  fused: bool = False
  recompute: bool | Callable[..., bool] = True
  refreshes: str = REFRESH_ALL
  refresh_by_is_due: bool = True


def optimizers(rank: int, gap: int, params: Any) -> dict[str, Mode]:
  """The optimizers and modes, by name (the names ``--only`` takes)."""
  lr = 1e-3
  mask = galore_optax.target_mask(params, TARGETS)
  labels = jax.tree.map(lambda m: "galore" if m else "full_rank", mask)

  def contrib():
    return optax.partition(
        {"galore": optax.contrib.galore(lr, rank=rank, update_proj_gap=gap,
                                        scale=0.25),
         "full_rank": optax.adamw(lr)}, labels)

  def ours(method, stagger=False, proj_type="std"):
    return lambda: galore_optax.galore_adamw(
        lr, rank=rank, update_proj_gap=gap, target_modules=TARGETS,
        projector_method=method, stagger_refresh=stagger, proj_type=proj_type)

  adamw = lambda: optax.adamw(lr)
  # APOLLO (issue 24): random projections, no SVD; Hugging Face's defaults
  # (scale 1, per channel) at the table's rank, and APOLLO-Mini (rank 1).
  apollo = lambda: galore_optax.apollo_adamw(
      lr, rank=rank, update_proj_gap=gap, target_modules=TARGETS)
  apollo_mini = lambda: galore_optax.apollo_mini(
      lr, update_proj_gap=gap, target_modules=TARGETS)
  fira = lambda: galore_optax.fira_adamw(
      lr, rank=rank, update_proj_gap=gap, target_modules=TARGETS)
  return {
      "optax.adamw": Mode(adamw, refreshes=NO_REFRESH),
      "optax.adamw per-layer": Mode(adamw, per_layer=True,
                                    refreshes=NO_REFRESH),
      "optax.adamw per-layer kept": Mode(adamw, per_layer=True,
                                         recompute=False,
                                         refreshes=NO_REFRESH),
      "optax.contrib.galore": Mode(contrib, refresh_by_is_due=False),
      "galore_adamw svd": Mode(ours("svd")),
      "galore_adamw randomized": Mode(ours("randomized")),
      # optax.contrib.galore's side: the projector on each matrix's larger
      # dimension, the moments on the smaller (the reference's "std" does the
      # opposite).
      "galore_adamw svd reverse_std": Mode(ours("svd", proj_type="reverse_std")),
      "galore_adamw svd staggered": Mode(ours("svd", True),
                                         refreshes=STAGGERED),
      "galore_adamw randomized staggered": Mode(ours("randomized", True),
                                                refreshes=STAGGERED),
      "galore_adamw per-layer": Mode(ours("svd"), per_layer=True),
      "galore_adamw per-layer fused": Mode(ours("svd"), per_layer=True,
                                           fused=True),
      "galore_adamw per-layer kept": Mode(ours("svd"), per_layer=True,
                                          recompute=False),
      "galore_adamw per-layer fused kept": Mode(
          ours("svd"), per_layer=True, fused=True, recompute=False),
      "galore_adamw per-layer products": Mode(
          ours("svd"), per_layer=True, recompute=layerwise.KEEP_DENSE_OUTPUTS),
      "galore_adamw per-layer fused products": Mode(
          ours("svd"), per_layer=True, fused=True, recompute=layerwise.KEEP_DENSE_OUTPUTS),
      "apollo_adamw": Mode(apollo),
      "apollo_mini": Mode(apollo_mini),
      "fira_adamw": Mode(fira),
  }


def make_step(mode: Mode, graphdef: Any) -> tuple[Callable[..., Any],
                                                  Callable[[Any], Any]]:
  """``(step, init)``: ``step(params, state, batch) -> (params, state,
  loss)`` (not jitted) and ``init(params) -> state``."""
  tx = mode.make_tx()

  def loss_of(params, batch):
    return llama.loss_fn(nnx.merge(graphdef, params), batch)

  if mode.per_layer:
    lw = layerwise.make_layerwise_step(loss_of, tx, fused=mode.fused,
                                       recompute=mode.recompute, jit=False)
    return lw.step, lw.init

  def train_step(params, state, batch):
    loss, grads = jax.value_and_grad(loss_of)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return train_step, tx.init


def compile_step(mode: Mode, graphdef: Any, params_abstract: Any,
                 batch: Any) -> tuple[Any, Callable[[Any], Any], float]:
  """``(compiled step, init, compile seconds)``, a fresh trace each call."""
  step, init = make_step(mode, graphdef)
  state_abstract = jax.eval_shape(init, params_abstract)
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params_abstract, state_abstract, batch).compile()
  return compiled, init, time.perf_counter() - start


def xla_cost(compiled: Any, key: str = "flops") -> float:
  """One figure of XLA's cost analysis of a compiled step (NaN if absent):
  ``"flops"``, or ``"bytes accessed"`` (its estimate of memory traffic)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per module
    cost = cost[0] if cost else None
  return float(cost.get(key, float("nan"))) if cost else float("nan")


def xla_flops(compiled: Any) -> float:
  """XLA's flop count of a compiled step (NaN if it has none)."""
  return xla_cost(compiled, "flops")


def cost_analysis_semantics(n: int = 128) -> str:
  """How this backend's ``cost_analysis`` counts conds, loops and SVDs,
  measured on toys (an ``n x n`` matrix product costs ``F = 2 n^3``)."""
  x = jax.ShapeDtypeStruct((n, n), jnp.float32)
  due = jax.ShapeDtypeStruct((), jnp.bool_)
  count = lambda f, *a: xla_flops(jax.jit(f).lower(*a).compile())
  unit = count(lambda x: x @ x, x)
  one, two = lambda x: x @ x, lambda x: (x @ x) @ x
  conds = [count(lambda p, x: jax.lax.cond(p, a, b, x), due, x) / unit
           for a, b in ((one, two), (two, one))]  # either branch order
  loop = count(lambda x: jax.lax.fori_loop(0, 3, lambda i, c: c @ x, x), x)
  svd = count(lambda x: jnp.linalg.svd(x)[0], x)
  cond = ({2: "its costliest branch", 3: "the sum of its branches"}.get(
      round(conds[0])) if round(conds[0]) == round(conds[1]) else None) or (
          "%.2f F and %.2f F for branches (F, 2F) and (2F, F)" % tuple(conds))
  return (f"a cond counts as {cond}, a 3-trip loop of F as "
          f"{loop / unit:.2f} F, an n x n SVD as {svd / unit:.2f} F")


def _never_due(count: jax.Array, offset: int, gap: int) -> np.bool_:
  del count, offset, gap
  return np.False_


def ordinary_path_flops(mode: Mode, graphdef: Any, params_abstract: Any,
                        batch: Any, compiled_flops: float) -> float:
  """The flops of ``mode``'s step without its refresh branches.

  ``galore_adamw``'s refreshes are compiled away by tracing a second step
  with ``refresh.is_due`` constant false (XLA then drops the refresh
  branches and zero-trip loops); the others' compiled count already is
  their ordinary path (see the module docstring).
  """
  if mode.refreshes == NO_REFRESH or not mode.refresh_by_is_due:
    return compiled_flops
  with mock.patch.object(refresh, "is_due", _never_due):
    compiled, _, _ = compile_step(mode, graphdef, params_abstract, batch)
  return xla_flops(compiled)


def compile_in_processes(args: argparse.Namespace, rank: int) -> None:
  """Median compile time per optimizer, each compiled in fresh processes."""
  _, params_abstract = nnx.split(
      llama.abstract_model(llama.get_config(args.model)), nnx.Param)
  names = args.only or list(
      optimizers(rank, args.update_proj_gap, params_abstract))
  samples = {name: [] for name in names}
  for _ in range(args.processes):
    for name in names:  # interleaved, so drift hits every optimizer alike
      out = subprocess.run(
          [sys.executable, "-m", "benchmarks.step_time", "--model",
           args.model, "--rank", str(rank), "--update-proj-gap",
           str(args.update_proj_gap), "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--no-ordinary-flops",
           "--compile-only", "--only", name],
          check=True, capture_output=True, text=True).stdout
      row = next(line for line in out.splitlines()
                 if line.startswith(name + " {"))
      samples[name].append(
          ast.literal_eval(row[len(name) + 1:])["compile_s"])
  print(f"\n{_setting(args, rank)}; compile time of one train step, median "
        f"of {args.processes} fresh processes")
  base = statistics.median(samples.get("optax.adamw", [float("nan")]))
  print("| optimizer | compile (s), median | / optax.adamw | samples (s) |")
  print("|---|---:|---:|---|")
  for name, xs in samples.items():
    median = statistics.median(xs)
    print(f"| {name} | {median:.2f} | {median / base:.2f}x | "
          f"{', '.join(f'{x:.2f}' for x in xs)} |")


def _warm_up(live: dict[str, list], batch: Any) -> None:
  """One step of each live optimizer on copies of its parameters and state
  (the step donates them), so step 0 is timed without first-run costs."""
  for compiled, params, state in live.values():
    copies = jax.tree.map(jnp.copy, (params, state))
    jax.block_until_ready(compiled(*copies, batch))


class ProcessUsage(NamedTuple):
  """What the process spent, from ``getrusage``: minor page faults (first
  touches of fresh memory pages) and CPU seconds in user and kernel mode,
  summed over its threads."""

  faults: int
  user_s: float
  system_s: float


def process_usage() -> ProcessUsage:
  """This process's page faults and CPU seconds so far."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return ProcessUsage(usage.ru_minflt, usage.ru_utime, usage.ru_stime)


def usage_since(before: ProcessUsage) -> ProcessUsage:
  """What the process spent since ``before``."""
  return ProcessUsage(*(now - then
                        for now, then in zip(process_usage(), before)))


def median_usage(usages: list[ProcessUsage]) -> ProcessUsage:
  """Each field's median over the steps after step 0 (over all if only
  one)."""
  steps = usages[1:] or usages
  return ProcessUsage(*(statistics.median(field) for field in zip(*steps)))


def page_fault_cost(megabytes: int = 256) -> float:
  """Microseconds per 4 KiB page of first touching fresh memory, here.

  XLA:CPU allocates a step's temporaries afresh on every execution, so each
  step pays ``temps / page size`` such faults; their cost varies with the
  machine (a virtual machine's can move several-fold within a day), and a
  step with more temporaries (an ordinary one) pays more of it.
  """
  size = megabytes << 20
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    # A fresh anonymous mapping, as glibc gives XLA for a large buffer
    # (numpy's own allocations ask for huge pages).
    with mmap.mmap(-1, size) as fresh:
      np.frombuffer(fresh, np.uint8)[::4096] = 1
      best = min(best, time.perf_counter() - start)
  return best / (size // 4096) * 1e6


def run_window(live: dict[str, list], step_times: dict[str, list[float]],
               step_usage: dict[str, list[ProcessUsage]], batch: Any,
               window: int) -> None:
  """Runs the first (refresh) step and ``window`` more of each live
  optimizer, in alternation, appending each step's time and the process's
  usage during it."""
  _warm_up(live, batch)
  for _ in range(window + 1):  # step 0 refreshes every projector
    for name, run in live.items():
      compiled, params, state = run
      usage = process_usage()
      start = time.perf_counter()
      params, state, loss = compiled(params, state, batch)
      jax.block_until_ready(loss)
      step_times[name].append(time.perf_counter() - start)
      step_usage[name].append(usage_since(usage))
      run[1:] = [params, state]


def summarise(times: list[float], refreshes: str,
              gap: int) -> dict[str, float | None]:
  """Step 0 and ``window`` more steps' times -> the reported figures."""
  refresh_steps = ([] if refreshes == NO_REFRESH
                   else list(range(0, len(times), gap)))
  ordinary = [t for k, t in enumerate(times) if k not in refresh_steps]
  median = statistics.median(ordinary) if ordinary else float("nan")
  refresh_s = (statistics.median(times[k] for k in refresh_steps)
               if refresh_steps else None)
  amortised = (median if refresh_s is None
               else (refresh_s + (gap - 1) * median) / gap)
  full = (len(times) - 1) // gap * gap  # steps in whole windows after 0
  return {"first_s": times[0], "median_s": median, "refresh_s": refresh_s,
          "slowest_s": max(times[1:] or times), "amortised_s": amortised,
          "window_mean_s": statistics.mean(times[1:full + 1]) if full
                           else None}


def _setting(args: argparse.Namespace, rank: int) -> str:
  return (f"machine: {platform.machine()}, {jax.device_count()} x "
          f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax "
          f"{jax.__version__}, optax {optax.__version__}; LLaMA-{args.model} "
          f"shapes, float32, batch {args.batch_size} x {args.seq_len}, rank "
          f"{rank}, gap {args.update_proj_gap}")


def _ratio(a: float | None, b: float | None) -> str:
  return f"{a / b:.2f}x" if a is not None and b else "-"


def _seconds(x: float | None) -> str:
  return "-" if x is None else f"{x:.3f}"


def print_table(rows: dict[str, dict[str, Any]], compile_only: bool) -> None:
  """The markdown table of ``rows`` (name -> figures)."""
  base = rows.get("optax.adamw", {})
  peer = rows.get("optax.contrib.galore", {})
  gflop = lambda x: "-" if x is None else f"{x / 1e9:.2f}"
  head = ["optimizer / mode", "compile (s)", "GFLOP/step, ordinary path",
          "GFLOP/step, compiled step", "ordinary GFLOP / adamw",
          "GB accessed/step, compiled step", "temps (GB)"]
  head += (["compile / adamw"] if compile_only else [
      "median ordinary (s)", "refresh (s)", "slowest (s)", "amortised (s)",
      "window mean (s)", "amortised / adamw", "amortised / contrib",
      "median / adamw", "median / contrib", "page faults / step",
      "user CPU (s) / step", "system CPU (s) / step", "user CPU / adamw"])
  print("| " + " | ".join(head) + " |")
  print("|---|" + "---:|" * (len(head) - 1))
  for name, r in rows.items():
    cells = [name, f"{r['compile_s']:.1f}", gflop(r["path_flops"]),
             gflop(r["flops"]),
             _ratio(r["path_flops"], base.get("path_flops")),
             gflop(r["bytes"]), gflop(r["temps"])]
    if compile_only:
      cells.append(_ratio(r["compile_s"], base.get("compile_s")))
    else:
      cells += [_seconds(r["median_s"]), _seconds(r["refresh_s"]),
                _seconds(r["slowest_s"]), _seconds(r["amortised_s"]),
                _seconds(r["window_mean_s"]),
                _ratio(r["amortised_s"], base.get("amortised_s")),
                _ratio(r["amortised_s"], peer.get("amortised_s")),
                _ratio(r["median_s"], base.get("median_s")),
                _ratio(r["median_s"], peer.get("median_s")),
                f"{r['faults']:.0f}", _seconds(r["user_s"]),
                _seconds(r["system_s"]),
                _ratio(r["user_s"], base.get("user_s"))]
    print("| " + " | ".join(cells) + " |")


def expected_fused_saving(params: Any, rank: int, tokens: int) -> float:
  """Issue #26's arithmetic: the flops that fusion saves per ordinary step.

  For ``y = x W`` with ``W`` ``m x n``, ``t`` tokens and rank ``r``, the
  unfused step makes ``G = x^T dy`` (``2 t m n``) and projects it
  (``2 m n r``); the fused one makes ``(x P)^T dy`` or ``x^T (dy Q)``
  (``2 t r (m + n)``). Summed over the projected (target) kernels.
  """
  mask = galore_optax.target_mask(params, TARGETS)
  saving = 0.0
  for leaf, projected in zip(jax.tree.leaves(params), jax.tree.leaves(mask)):
    if projected and len(leaf.shape) == 2:
      m, n = leaf.shape
      r = min(rank, m, n)
      saving += 2 * tokens * m * n + 2 * m * n * r - 2 * tokens * r * (m + n)
  return saving


def print_fused_saving(rows: dict[str, dict[str, Any]], params: Any,
                       rank: int, tokens: int) -> None:
  """The fused per-layer step's measured and expected flop saving."""
  plain = rows.get("galore_adamw per-layer", {}).get("path_flops")
  fused = rows.get("galore_adamw per-layer fused", {}).get("path_flops")
  if plain is None or fused is None:
    return
  print(f"\nfused per-layer ordinary path: {(plain - fused) / 1e9:.3f} GFLOP "
        f"fewer than per-layer (XLA); expected from 2tmn + 2mnr - 2tr(m + n) "
        f"per projected kernel: "
        f"{expected_fused_saving(params, rank, tokens) / 1e9:.3f} GFLOP")


def _parse(argv: list[str] | None) -> tuple[argparse.ArgumentParser,
                                            argparse.Namespace]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="60m")
  parser.add_argument("--rank", type=int, default=None,
                      help="default: the paper's rank for the model")
  parser.add_argument("--update-proj-gap", type=int, default=200)
  parser.add_argument("--batch-size", type=int, default=1,
                      help="sequences per step (BENCHMARKS.md's batch-of-one "
                      "figures: 1; realistic: 8 for 60M, 4 for 350M)")
  parser.add_argument("--seq-len", type=int, default=256,
                      help="tokens per sequence")
  parser.add_argument("--window", type=int, default=200,
                      help="steps timed after step 0")
  parser.add_argument("--compile-only", action="store_true")
  parser.add_argument("--ordinary-flops", action=argparse.BooleanOptionalAction,
                      default=True,
                      help="compile each galore_adamw step a second time "
                      "without refreshes, for its ordinary path's flops")
  parser.add_argument("--only", nargs="*", default=None,
                      help="a subset of the optimizers, by name")
  parser.add_argument("--processes", type=int, default=0,
                      help="with --compile-only: compile each optimizer in "
                      "this many fresh processes, in interleaved rounds, and "
                      "report the median (a process's first compilation "
                      "also pays one-time start-up costs)")
  parser.add_argument("--interleave", action="store_true",
                      help="run the optimizers' windows in alternation, step "
                      "by step, so that machine drift hits all alike (all "
                      "models and states must fit in memory at once)")
  parser.add_argument("--times-json", default=None,
                      help="write every step's time, per optimizer, here")
  return parser, parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  parser, args = _parse(argv)
  rank = args.rank or PAPER_RANKS[args.model]
  if args.processes:
    if not args.compile_only:
      parser.error("--processes needs --compile-only")
    compile_in_processes(args, rank)
    return

  config = llama.get_config(args.model)
  graphdef, params_abstract = nnx.split(llama.abstract_model(config),
                                        nnx.Param)
  tokens = jax.random.randint(jax.random.key(0),
                              (args.batch_size, args.seq_len + 1), 0,
                              config.vocab_size)
  batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
  modes = optimizers(rank, args.update_proj_gap, params_abstract)
  if args.only:
    unknown = sorted(set(args.only) - set(modes))
    if unknown:
      parser.error(f"unknown optimizers {unknown}; known: {list(modes)}")
    modes = {k: v for k, v in modes.items() if k in args.only}

  rows, step_times, step_usage = {}, {}, {}
  live = {}  # with --interleave: name -> [compiled, params, state]
  for name, mode in modes.items():
    compiled, init, compile_s = compile_step(mode, graphdef, params_abstract,
                                             batch)
    flops = xla_flops(compiled)
    path_flops = (ordinary_path_flops(mode, graphdef, params_abstract, batch,
                                      flops) if args.ordinary_flops else None)
    rows[name] = {"compile_s": compile_s, "flops": flops,
                  "path_flops": path_flops,
                  "bytes": xla_cost(compiled, "bytes accessed"),
                  "temps": compiled.memory_analysis().temp_size_in_bytes}
    if args.compile_only:
      print(name, {k: round(v, 3) for k, v in rows[name].items()
                   if v is not None}, flush=True)
      continue
    params = nnx.state(llama.build_model(config, rngs=0), nnx.Param)
    live[name] = [compiled, params, jax.jit(init)(params)]
    step_times[name], step_usage[name] = [], []
    if not args.interleave:  # one optimizer's window after another's
      run_window(live, step_times, step_usage, batch, args.window)
      del live[name]
  fault_us = [page_fault_cost()]
  if args.interleave:  # every optimizer's step i, then every step i + 1
    run_window(live, step_times, step_usage, batch, args.window)
  fault_us.append(page_fault_cost())
  for name, times in step_times.items():
    rows[name].update(summarise(times, modes[name].refreshes,
                                args.update_proj_gap))
    rows[name].update(median_usage(step_usage[name])._asdict())
    print(name, {k: round(v, 3) for k, v in rows[name].items()
                 if v is not None}, flush=True)
  if args.times_json:
    with open(args.times_json, "w") as f:
      json.dump(step_times, f)

  window = "" if args.compile_only else (
      f", window {args.window} steps after step 0"
      f"{', interleaved' if args.interleave else ''}")
  faults = ("" if args.compile_only else
            f"; a page fault cost {fault_us[0]:.2f} us before the steps, "
            f"{fault_us[1]:.2f} us after")
  print(f"\n{_setting(args, rank)}{window}; flops: XLA cost_analysis, in "
        f"which {cost_analysis_semantics()}; ordinary path: the step "
        f"compiled without refreshes{faults}")
  print_table(rows, args.compile_only)
  print_fused_saving(rows, params_abstract, rank,
                     args.batch_size * args.seq_len)


if __name__ == "__main__":
  main()
