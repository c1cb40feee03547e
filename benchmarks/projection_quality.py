"""Projection quality on real gradients: randomized and 8-bit projectors.

A tiny LLaMA (examples/llama.py preset ``tiny``) is trained with AdamW on the
Python standard library's sources; at two points (``--early``, ``--late``)
the gradients of every attention and MLP matrix are taken. For each matrix,
with ``r = --rank``, we report the gradient energy captured,
``|project(G)|^2``, relative to the exact top-r subspace's:

* ``randomized (cold)``: subspace iteration from the initial projector;
* ``randomized (warm)``: started from the exact projector of the early
  gradient, the way refreshes run in training;
* ``bfloat16`` / ``int8`` stored exact projectors, and for those the relative
  error of the low-rank gradient ``|P~^T G - P^T G| / |P^T G|``.

Run from the repository root: python -m benchmarks.projection_quality
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from examples import data
from examples import llama
from galore_optax import projection
from galore_optax import quantization
from galore_optax import targets


def _gradients(args):
  config = llama.get_config(args.model)
  model = llama.build_model(config, rngs=0)
  graphdef, params = nnx.split(model, nnx.Param)
  corpus = data.load_corpus(max_train_bytes=4_000_000)
  batches = corpus.train_batches(seq_len=256, batch_size=8, seed=0)
  tx = optax.adamw(3e-3)
  state = tx.init(params)

  def loss(p, batch):
    return llama.loss_fn(nnx.merge(graphdef, p), batch)

  @jax.jit
  def step(p, s, batch):
    value, g = jax.value_and_grad(loss)(p, batch)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, value, g

  grads = {}
  for t in range(args.late + 1):
    batch = jax.tree.map(jnp.asarray, batches.batch(t))
    params, state, value, g = step(params, state, batch)
    if t in (args.early, args.late):
      grads[t] = g
      print(f"step {t}: loss {float(value):.3f}")
  mask = targets.target_mask(grads[args.late], ["attn", "mlp"])
  pick = lambda g: [x for x, m in zip(jax.tree.leaves(g), jax.tree.leaves(mask))
                    if m]
  return pick(grads[args.early]), pick(grads[args.late])


def _energy(g, proj, plan):
  return float(jnp.sum(projection.project(g, proj, plan) ** 2))


def _stored(proj, storage):
  def one(x):
    if isinstance(x, optax.MaskedNode):
      return x
    if storage == "bfloat16":
      return x.astype(jnp.bfloat16).astype(jnp.float32)
    return quantization.dequantize(quantization.quantize(x, True, 256), True,
                                   256)
  return projection.Projector(*(one(f) for f in proj))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", default="tiny")
  parser.add_argument("--rank", type=int, default=32)
  parser.add_argument("--early", type=int, default=20)
  parser.add_argument("--late", type=int, default=40)
  args = parser.parse_args()
  early, late = _gradients(args)
  rows = {k: [] for k in ("randomized (cold)", "randomized (warm)",
                          "bfloat16", "int8")}
  errors = {"bfloat16": [], "int8": []}
  for g0, g in zip(early, late):
    plan = projection.plan_leaf(g.shape, args.rank, "std")
    exact = projection.compute_projector(g, plan)
    best = _energy(g, exact, plan)
    key = jax.random.key(0)
    cold = projection.compute_projector(
        g, plan, method="randomized",
        previous=projection.initial_projector(plan), key=key)
    warm = projection.compute_projector(
        g, plan, method="randomized",
        previous=projection.compute_projector(g0, plan), key=key)
    rows["randomized (cold)"].append(_energy(g, cold, plan) / best)
    rows["randomized (warm)"].append(_energy(g, warm, plan) / best)
    low = projection.project(g, exact, plan)
    for storage in ("bfloat16", "int8"):
      stored = _stored(exact, storage)
      rows[storage].append(_energy(g, stored, plan) / best)
      err = jnp.linalg.norm(projection.project(g, stored, plan) - low)
      errors[storage].append(float(err / jnp.linalg.norm(low)))
  print(f"{len(late)} attention/MLP matrices of LLaMA-{args.model}, rank "
        f"{args.rank}, gradients at step {args.late} (warm start from step "
        f"{args.early})")
  print("| projector | captured energy / exact top-r: mean | min | "
        "low-rank gradient rel. error: mean | max |")
  print("|---|---:|---:|---:|---:|")
  for name, ratios in rows.items():
    err = errors.get(name)
    err_txt = (f"{statistics.mean(err):.2e} | {max(err):.2e}" if err
               else "- | -")
    print(f"| {name} | {statistics.mean(ratios):.5f} | {min(ratios):.5f} | "
          f"{err_txt} |")


if __name__ == "__main__":
  main()
