"""Train-step time: GaLore projector methods and staggering vs the baselines.

A LLaMA-shaped model (examples/llama.py presets, float32, batch 1 x 256,
random tokens: the data does not change the cost) and one jitted train step
(forward, backward, optimizer update, apply; parameters and state donated)
per optimizer:

* ``optax.adamw``;
* ``optax.contrib.galore`` on the attention and MLP matrices (AdamW on the
  rest), the in-ecosystem peer;
* ``galore_adamw`` with the exact SVD and with the randomized method, each
  with and without ``stagger_refresh``.

All GaLore runs share rank, gap and targets. Reported per optimizer: compile
time (``lower().compile()``), then over a window of ``--window`` steps that
follows the first (refresh) step and contains every leaf's next refresh when
``--window >= --update-proj-gap``: the median step, the slowest step, and the
amortised step (mean over the window), plus ratios to ``optax.adamw`` and
``optax.contrib.galore``. Optimizers are timed one after another in the same
process (the models do not all fit in memory at once at 350M shapes), or with
``--interleave`` step by step in alternation (for a few optimizers at once).

Run from the repository root::

    python -m benchmarks.step_time --model 60m --window 200
    python -m benchmarks.step_time --model 350m --interleave \
        --only optax.contrib.galore "galore_adamw randomized staggered"
    python -m benchmarks.step_time --model 350m --compile-only --processes 5
"""

from __future__ import annotations

import argparse
import ast
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import galore_optax
from examples import llama
from galore_optax import memory

TARGETS = ["attn", "mlp"]
# The paper's rank for each size (tiny: the example's default).
PAPER_RANKS = memory.DEFAULT_RANKS


def optimizers(rank: int, gap: int,
               params) -> dict[str, Callable[[], optax.GradientTransformation]]:
  lr = 1e-3
  mask = galore_optax.target_mask(params, TARGETS)
  labels = jax.tree.map(lambda m: "galore" if m else "full_rank", mask)

  def contrib():
    return optax.partition(
        {"galore": optax.contrib.galore(lr, rank=rank, update_proj_gap=gap,
                                        scale=0.25),
         "full_rank": optax.adamw(lr)}, labels)

  def ours(method, stagger):
    return lambda: galore_optax.galore_adamw(
        lr, rank=rank, update_proj_gap=gap, target_modules=TARGETS,
        projector_method=method, stagger_refresh=stagger)

  return {
      "optax.adamw": lambda: optax.adamw(lr),
      "optax.contrib.galore": contrib,
      "galore_adamw svd": ours("svd", False),
      "galore_adamw randomized": ours("randomized", False),
      "galore_adamw svd staggered": ours("svd", True),
      "galore_adamw randomized staggered": ours("randomized", True),
  }


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
           str(args.update_proj_gap), "--compile-only", "--only", name],
          check=True, capture_output=True, text=True).stdout
      row = next(line for line in out.splitlines()
                 if line.startswith(name + " {"))
      samples[name].append(
          ast.literal_eval(row[len(name) + 1:])["compile_s"])
  print(f"\nmachine: {platform.machine()}, {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}, optax "
        f"{optax.__version__}; LLaMA-{args.model} shapes, float32, batch "
        f"1 x 256, rank {rank}, gap {args.update_proj_gap}; compile time "
        f"of one train step, median of {args.processes} fresh processes")
  base = statistics.median(samples.get("optax.adamw", [float("nan")]))
  print("| optimizer | compile (s), median | / optax.adamw | samples (s) |")
  print("|---|---:|---:|---|")
  for name, xs in samples.items():
    median = statistics.median(xs)
    print(f"| {name} | {median:.2f} | {median / base:.2f}x | "
          f"{', '.join(f'{x:.2f}' for x in xs)} |")


def _run_window(live: dict[str, list], step_times: dict[str, list[float]],
                batch, window: int) -> None:
  """Runs the first (refresh) step and ``window`` more of each live
  optimizer, in alternation, appending each step's time."""
  for _ in range(window + 1):  # step 0 refreshes every projector
    for name, run in live.items():
      compiled, params, state = run
      start = time.perf_counter()
      params, state, loss = compiled(params, state, batch)
      jax.block_until_ready(loss)
      step_times[name].append(time.perf_counter() - start)
      run[1:] = [params, state]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="60m")
  parser.add_argument("--rank", type=int, default=None,
                      help="default: the paper's rank for the model")
  parser.add_argument("--update-proj-gap", type=int, default=200)
  parser.add_argument("--window", type=int, default=200)
  parser.add_argument("--compile-only", action="store_true")
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
  args = parser.parse_args(argv)
  rank = args.rank or PAPER_RANKS[args.model]

  if args.processes:
    if not args.compile_only:
      parser.error("--processes needs --compile-only")
    compile_in_processes(args, rank)
    return

  config = llama.get_config(args.model)
  model = llama.abstract_model(config)
  graphdef, params_abstract = nnx.split(model, nnx.Param)
  tokens = jax.random.randint(jax.random.key(0), (1, 257), 0,
                              config.vocab_size)
  batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
  makers = optimizers(rank, args.update_proj_gap, params_abstract)
  if args.only:
    makers = {k: v for k, v in makers.items() if k in args.only}

  rows = {}
  step_times = {}
  live = {}  # with --interleave: name -> [compiled, params, state]
  for name, make in makers.items():
    tx = make()

    def train_step(params, state, batch, tx=tx):
      loss, grads = jax.value_and_grad(
          lambda p: llama.loss_fn(nnx.merge(graphdef, p), batch))(params)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss

    step = jax.jit(train_step, donate_argnums=(0, 1))
    state_abstract = jax.eval_shape(tx.init, params_abstract)
    start = time.perf_counter()
    compiled = step.lower(params_abstract, state_abstract, batch).compile()
    rows[name] = {"compile_s": time.perf_counter() - start}
    if args.compile_only:
      print(name, {k: round(v, 3) for k, v in rows[name].items()}, flush=True)
      continue
    params = nnx.state(llama.build_model(config, rngs=0), nnx.Param)
    state = jax.jit(tx.init)(params)
    live[name] = [compiled, params, state]
    step_times[name] = []
    if not args.interleave:  # one optimizer's window after another's
      _run_window(live, step_times, batch, args.window)
      del live[name]
  if args.interleave:  # every optimizer's step i, then every step i + 1
    _run_window(live, step_times, batch, args.window)
  for name, times in step_times.items():
    window = times[1:]
    rows[name].update(first_s=times[0], median_s=statistics.median(window),
                      slowest_s=max(window),
                      amortised_s=sum(window) / len(window))
    print(name, {k: round(v, 3) for k, v in rows[name].items()}, flush=True)
  if args.times_json:
    with open(args.times_json, "w") as f:
      json.dump(step_times, f)

  print(f"\nmachine: {platform.machine()}, {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}, optax "
        f"{optax.__version__}; LLaMA-{args.model} shapes, float32, batch "
        f"1 x 256, rank {rank}, gap {args.update_proj_gap}, window "
        f"{args.window} steps after the first")
  base = rows.get("optax.adamw")
  peer = rows.get("optax.contrib.galore")
  if args.compile_only:
    print("| optimizer | compile (s) | / optax.adamw |")
    print("|---|---:|---:|")
    for name, r in rows.items():
      ratio = f"{r['compile_s'] / base['compile_s']:.2f}x" if base else "-"
      print(f"| {name} | {r['compile_s']:.1f} | {ratio} |")
    return
  print("| optimizer | compile (s) | median (s) | slowest (s) | slowest / "
        "median | amortised (s) | amortised / adamw | amortised / contrib |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for name, r in rows.items():
    to_base = (f"{r['amortised_s'] / base['amortised_s']:.2f}x" if base
               else "-")
    to_peer = (f"{r['amortised_s'] / peer['amortised_s']:.2f}x" if peer
               else "-")
    print(f"| {name} | {r['compile_s']:.1f} | {r['median_s']:.3f} | "
          f"{r['slowest_s']:.3f} | {r['slowest_s'] / r['median_s']:.1f}x | "
          f"{r['amortised_s']:.3f} | {to_base} | {to_peer} |")


if __name__ == "__main__":
  main()
