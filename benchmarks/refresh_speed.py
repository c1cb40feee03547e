"""Projector refresh: randomized (warm-started) method vs the exact SVD.

The matrices of LLaMA-1B (examples/llama.py preset ``1b``: per layer four
2048 x 2048 attention projections and three 2048 x 5461 / 5461 x 2048 MLP
matrices), rank 512, ``proj_type="std"``. The gradients are real: the LM loss
of the 1B model (at initialisation, float32) on the Python standard
library's sources (ByT5 bytes; 8 x 256 tokens, so a gradient's rank can reach
2048 > r), for the decoder layers given by ``--layers``.
The previous projector that warm-starts the randomized method is the exact
projector of the gradient of another batch (``--previous-batch``), as in a
refresh during training; the cold start (from the initial projector) is
reported as the worst case.

Reported per shape and for the whole set: the wall time of one refresh with
each method (compiled once per shape beforehand, then timed with
``block_until_ready``), and the gradient energy the randomized projector
captures, ``|project(G)|^2``, relative to the exact top-r subspace's.

Run from the repository root: python -m benchmarks.refresh_speed
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from examples import data
from examples import llama
from galore_optax import projection
from galore_optax import targets


def layer_gradients(args) -> tuple[list[str], list[jax.Array], list[jax.Array]]:
  """Names and gradients (two batches) of the chosen layers' matrices."""
  config = llama.get_config(args.model)
  model = llama.build_model(config, rngs=0)
  graphdef, params = nnx.split(model, nnx.Param)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [targets.path_to_name(path) for path, _ in leaves]
  wanted = {f"model.layers.{i}." for i in args.layers}
  pick = [i for i, n in enumerate(names)
          if any(n.startswith(w) for w in wanted) and leaves[i][1].ndim == 2]
  flat = [x for _, x in leaves]

  rest_ids = [i for i in range(len(flat)) if i not in pick]

  def loss(selected, rest, batch):
    full = list(flat)
    for i, x in zip(pick, selected):
      full[i] = x
    for i, x in zip(rest_ids, rest):
      full[i] = x
    return llama.loss_fn(nnx.merge(graphdef, treedef.unflatten(full)), batch)

  # Only the chosen matrices' gradients are formed; the other parameters are
  # arguments (not captured constants, which XLA would copy).
  grad = jax.jit(jax.grad(loss))
  rest = [flat[i] for i in rest_ids]
  corpus = data.load_corpus(max_train_bytes=2_000_000)
  batches = corpus.train_batches(seq_len=args.seq, batch_size=args.batch_size,
                                 seed=0)
  out = []
  for b in (args.previous_batch, args.batch):
    batch = jax.tree.map(jnp.asarray, batches.batch(b))
    out.append(grad([flat[i] for i in pick], rest, batch))
  return [names[i] for i in pick], out[0], out[1]


def timed(fn, *args) -> tuple[float, object]:
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return time.perf_counter() - start, out


def energy(g, proj, plan) -> float:
  return float(jnp.sum(projection.project(g, proj, plan) ** 2))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="1b")
  parser.add_argument("--rank", type=int, default=512)
  parser.add_argument("--layers", type=int, nargs="+", default=[0, 12, 23])
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--batch", type=int, default=1,
                      help="index of the batch whose gradient is refreshed")
  parser.add_argument("--batch-size", type=int, default=8,
                      help="sequences per batch: the gradient's rank is at "
                      "most batch_size * seq, which must exceed the rank "
                      "for the energy comparison to mean anything")
  parser.add_argument("--previous-batch", type=int, default=0)
  args = parser.parse_args(argv)

  names, previous_grads, grads = layer_gradients(args)
  compiled = {}

  def fn(method, shape):
    """One compiled refresh per (method, shape), compiled before timing."""
    if (method, shape) not in compiled:
      plan = projection.plan_leaf(shape, args.rank, "std")
      f = jax.jit(lambda g, prev, key: projection.compute_projector(
          g, plan, method=method, previous=prev, key=key))
      spec = jax.ShapeDtypeStruct(shape, jnp.float32)
      prev = jax.eval_shape(lambda: projection.initial_projector(plan))
      compiled[method, shape] = f.lower(spec, prev,
                                        jax.random.key(0)).compile()
    return compiled[method, shape]

  rows = []
  for name, g0, g in zip(names, previous_grads, grads):
    shape = tuple(g.shape)
    plan = projection.plan_leaf(shape, args.rank, "std")
    key = jax.random.key(0)
    init = projection.initial_projector(plan)
    exact_s, exact = timed(fn("svd", shape), g, init, key)
    _, previous = timed(fn("svd", shape), g0, init, key)
    warm_s, warm = timed(fn("randomized", shape), g, previous, key)
    _, cold = timed(fn("randomized", shape), g, init, key)
    best = energy(g, exact, plan)
    rows.append(dict(name=name, shape=shape, exact_s=exact_s, warm_s=warm_s,
                     warm=energy(g, warm, plan) / best,
                     cold=energy(g, cold, plan) / best))
    print(f"{name} {shape}: svd {exact_s:.2f} s, randomized {warm_s:.3f} s, "
          f"energy warm {rows[-1]['warm']:.5f} cold {rows[-1]['cold']:.5f}",
          flush=True)

  print(f"\nmachine: {platform.machine()}, {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}; "
        f"LLaMA-{args.model} layers {args.layers}, rank {args.rank}, "
        f"gradients of batch {args.batch} ({args.batch_size} x {args.seq}), "
        f"warm start from "
        f"batch {args.previous_batch}")
  print("| shape | matrices | exact SVD (s) | randomized (s) | speed-up | "
        "energy / exact: warm mean | warm min | cold min |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for shape in sorted({r["shape"] for r in rows}):
    rs = [r for r in rows if r["shape"] == shape]
    ex, wa = sum(r["exact_s"] for r in rs), sum(r["warm_s"] for r in rs)
    print(f"| {shape[0]} x {shape[1]} | {len(rs)} | {ex:.2f} | {wa:.2f} | "
          f"{ex / wa:.1f}x | {statistics.mean(r['warm'] for r in rs):.5f} | "
          f"{min(r['warm'] for r in rs):.5f} | "
          f"{min(r['cold'] for r in rs):.5f} |")
  ex, wa = sum(r["exact_s"] for r in rows), sum(r["warm_s"] for r in rows)
  print(f"| all | {len(rows)} | {ex:.2f} | {wa:.2f} | {ex / wa:.1f}x | "
        f"{statistics.mean(r['warm'] for r in rows):.5f} | "
        f"{min(r['warm'] for r in rows):.5f} | "
        f"{min(r['cold'] for r in rows):.5f} |")


if __name__ == "__main__":
  main()
