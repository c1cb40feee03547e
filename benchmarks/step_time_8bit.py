"""Cost of 8-bit states: galore_adamw_8bit vs galore_adamw step time.

LLaMA-60M shapes (examples/llama.py preset ``60m``), batch 1 x 256, rank 128,
attention and MLP targets, float32 parameters, on whatever backend JAX has.
Both optimizers are compiled (train steps donate parameters and state, as in
training), warmed up past the first (refresh) step, then timed in alternation
so that machine noise hits both alike: train steps first, then updates alone. Reported: the median full train step
(forward, backward, update) and the median optimizer update alone, and their
ratios, all from one run.

Run from the repository root: python -m benchmarks.step_time_8bit [--steps 20]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import galore_optax
from examples import llama


def _timed(fn, *args):
  start = time.perf_counter()
  out = fn(*args)
  jax.block_until_ready(out)
  return time.perf_counter() - start, out


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--model", default="60m")
  parser.add_argument("--rank", type=int, default=128)
  args = parser.parse_args()

  config = llama.get_config(args.model)
  model = llama.build_model(config, rngs=0)
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = jax.random.randint(jax.random.key(0), (1, 257), 0,
                              config.vocab_size)
  batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

  def loss(p):
    return llama.loss_fn(nnx.merge(graphdef, p), batch)

  common = dict(rank=args.rank, update_proj_gap=200,
                target_modules=["attn", "mlp"])
  optimizers = {
      "galore_adamw": galore_optax.galore_adamw(1e-3, **common),
      "galore_adamw_8bit": galore_optax.galore_adamw_8bit(1e-3, **common),
  }
  runs = {}
  for name, tx in optimizers.items():

    def train_step(p, s, tx=tx):
      grads = jax.grad(loss)(p)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s

    state = tx.init(params)
    grads = jax.jit(jax.grad(loss))(params)
    runs[name] = {
        # Donated like a real training step, so that updates are in place.
        "train": jax.jit(train_step, donate_argnums=(0, 1)),
        "update": jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p)),
        "params": jax.tree.map(jnp.copy, params), "state": state,
        "grads": grads, "train_s": [], "update_s": [],
    }
    # Step 0 refreshes the projectors; warm up past it.
    for _ in range(2):
      _, (runs[name]["params"], runs[name]["state"]) = _timed(
          runs[name]["train"], runs[name]["params"], runs[name]["state"])
  # Train steps first, then updates alone: an undonated update between two
  # train steps leaves the allocator in another state and slowed the next
  # 8-bit train step by up to 0.3 s on this benchmark's 2-core VM.
  for _ in range(args.steps):
    for name, run in runs.items():
      dt, (run["params"], run["state"]) = _timed(run["train"], run["params"],
                                                 run["state"])
      run["train_s"].append(dt)
  for _ in range(args.steps):
    for name, run in runs.items():
      dt, (_, run["state"]) = _timed(run["update"], run["grads"],
                                     run["state"], run["params"])
      run["update_s"].append(dt)

  print(f"machine: {platform.processor() or platform.machine()}, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}")
  print(f"LLaMA-{args.model} shapes, batch 1 x 256, rank {args.rank}, "
        f"{args.steps} timed steps each, medians")
  print("| optimizer | train step (s) | optimizer update (s) |")
  print("|---|---:|---:|")
  med = {n: (statistics.median(r["train_s"]), statistics.median(r["update_s"]))
         for n, r in runs.items()}
  for name, (train_s, update_s) in med.items():
    print(f"| {name} | {train_s:.4f} | {update_s:.4f} |")
  base, q8 = med["galore_adamw"], med["galore_adamw_8bit"]
  print(f"ratio 8bit / float32 states: train step {q8[0] / base[0]:.3f}x, "
        f"update alone {q8[1] / base[1]:.3f}x")


if __name__ == "__main__":
  main()
