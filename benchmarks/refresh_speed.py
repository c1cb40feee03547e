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

Timing: every refresh is compiled and run once before any is timed (the
model and its gradient computation are freed first: the first decomposition
after them ran several times slower). Then, ``--repeats`` times, each
matrix's three refreshes run back to back in a rotating order: the exact
SVD of the gradient ``G``, the exact SVD of ``G^T`` (a leaf of the
transposed shape: the exact method decomposes the tall orientation of both,
so the two should cost the same) and the warm-started randomized method.
Reported per shape: the medians over its matrices and repeats, the
randomized method's speed-up over the exact SVD, and the gradient energy
the randomized projector captures, ``|project(G)|^2``, relative to the exact
top-r subspace's (minimum over the matrices, warm and cold). The raw LAPACK
SVD of one tall gradient and of its transpose are timed the same way, to
show which orientation is the cheap one. Timings on a loaded machine are
noisy; the interleaving and medians keep the ratios fair.

Run from the repository root: python -m benchmarks.refresh_speed
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from examples import data
from examples import llama
from galore_optax import projection
from galore_optax import targets

# The pass criteria of issue #26.
MIN_SPEED_UP = 10.0
MIN_ENERGY = 0.99


def layer_gradients(args) -> tuple[list[str], list[np.ndarray],
                                   list[np.ndarray]]:
  """Names and gradients (two batches) of the chosen layers' matrices, as
  host arrays (the model and its compiled gradient are dropped)."""
  config = llama.get_config(args.model)
  # Activations recomputed per decoder layer: without, the 1B model's
  # gradient at 8 x 256 tokens held ~17 GB.
  model = llama.build_model(config, rngs=0, remat=True)
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
    out.append([np.asarray(g) for g in grad([flat[i] for i in pick], rest,
                                              batch)])
  return [names[i] for i in pick], out[0], out[1]


def load_gradients(paths: list[str], layers: list[int]
                   ) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
  """The chosen layers' matrices from ``--save-gradients`` files."""
  wanted = tuple(f"model.layers.{i}." for i in layers)
  names, previous, current = [], [], []
  for path in paths:
    with np.load(path) as f:
      for key in sorted(f.files):
        name = key.split("/", 1)[1]
        if key.startswith("cur/") and name.startswith(wanted):
          names.append(name)
          previous.append(f[f"prev/{name}"])
          current.append(f[key])
  return names, previous, current


def timed(fn, *args) -> tuple[float, object]:
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return time.perf_counter() - start, out


def energy(g, proj, plan) -> float:
  return float(jnp.sum(projection.project(g, proj, plan) ** 2))


class Refreshes:
  """One compiled refresh per (method, shape), compiled before timing."""

  def __init__(self, rank: int):
    self.rank = rank
    self.compiled = {}

  def plan(self, shape):
    return projection.plan_leaf(shape, self.rank, "std")

  def __call__(self, method: str, shape: tuple[int, int]):
    if (method, shape) not in self.compiled:
      plan = self.plan(shape)
      f = jax.jit(lambda g, prev, key: projection.compute_projector(
          g, plan, method=method, previous=prev, key=key))
      spec = jax.ShapeDtypeStruct(shape, jnp.float32)
      prev = jax.eval_shape(lambda: projection.initial_projector(plan))
      self.compiled[method, shape] = f.lower(spec, prev,
                                             jax.random.key(0)).compile()
    return self.compiled[method, shape]


def measure(args, names, previous_grads, grads) -> list[dict]:
  """Energies, then interleaved timings, of every matrix's refreshes."""
  refresh = Refreshes(args.rank)
  key = jax.random.key(0)
  rows = []
  for name, g0, g in zip(names, previous_grads, grads):
    g0, g = jnp.asarray(g0), jnp.asarray(g)
    shape = tuple(g.shape)
    plan = refresh.plan(shape)
    init = projection.initial_projector(plan)
    exact = refresh("svd", shape)(g, init, key)
    previous = refresh("svd", shape)(g0, init, key)
    warm = refresh("randomized", shape)(g, previous, key)
    cold = refresh("randomized", shape)(g, init, key)
    transposed = tuple(reversed(shape))
    best = energy(g, exact, plan)
    rows.append(dict(name=name, shape=shape, g=g, g_t=jnp.asarray(g.T),
                     init=init, init_t=projection.initial_projector(
                         refresh.plan(transposed)), previous=previous,
                     warm=energy(g, warm, plan) / best,
                     cold=energy(g, cold, plan) / best,
                     exact_s=[], transposed_s=[], randomized_s=[]))
    if ("svd", transposed) not in refresh.compiled:
      # Compiled and run once before any refresh is timed.
      jax.block_until_ready(refresh("svd", transposed)(
          rows[-1]["g_t"], rows[-1]["init_t"], key))
    print(f"{name} {shape}: energy / exact: warm {rows[-1]['warm']:.5f}, "
          f"cold {rows[-1]['cold']:.5f}", flush=True)
  for rep in range(args.repeats):
    for row in rows:
      shape = row["shape"]
      transposed = tuple(reversed(shape))
      runs = [
          ("exact_s", lambda: refresh("svd", shape)(row["g"], row["init"],
                                                    key)),
          ("transposed_s", lambda: refresh("svd", transposed)(
              row["g_t"], row["init_t"], key)),
          ("randomized_s", lambda: refresh("randomized", shape)(
              row["g"], row["previous"], key)),
      ]
      for j in range(len(runs)):  # a rotating order
        label, run = runs[(j + rep) % len(runs)]
        row[label].append(timed(run)[0])
    print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
  return rows


def raw_svd_orientations(rows, repeats: int) -> dict[str, float] | None:
  """Median times of the raw LAPACK SVD of one tall gradient and of its
  transpose, interleaved."""
  tall = [r["g"] for r in rows if r["shape"][0] > r["shape"][1]]
  if not tall:
    return None
  svd = jax.jit(lambda x: jnp.linalg.svd(x, full_matrices=False))
  mats = {"tall": tall[0], "wide": jnp.asarray(np.asarray(tall[0]).T.copy())}
  compiled = {k: svd.lower(x).compile() for k, x in mats.items()}
  times = {k: [] for k in mats}
  for k, x in mats.items():
    jax.block_until_ready(compiled[k](x))
  for rep in range(repeats):
    for k in (("tall", "wide") if rep % 2 == 0 else ("wide", "tall")):
      times[k].append(timed(compiled[k], mats[k])[0])
  return {f"{k} {tuple(mats[k].shape)}": statistics.median(v)
          for k, v in times.items()}


def report(args, rows, raw) -> None:
  print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}, jax "
        f"{jax.__version__}, OPENBLAS_NUM_THREADS="
        f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, load average "
        f"{os.getloadavg()[0]:.1f} at the end; LLaMA-{args.model} layers "
        f"{args.layers}, rank {args.rank}, gradients of batch {args.batch} "
        f"({args.batch_size} x {args.seq}), warm start from batch "
        f"{args.previous_batch}; medians of {args.repeats} interleaved "
        "repeats per matrix")
  print("| shape | matrices | exact SVD (s) | exact SVD of G^T (s) | "
        "randomized (s) | speed-up | energy / exact: warm min | cold min |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  verdicts = []
  for shape in sorted({r["shape"] for r in rows}):
    rs = [r for r in rows if r["shape"] == shape]
    med = {k: statistics.median(t for r in rs for t in r[k])
           for k in ("exact_s", "transposed_s", "randomized_s")}
    speed_up = med["exact_s"] / med["randomized_s"]
    warm, cold = min(r["warm"] for r in rs), min(r["cold"] for r in rs)
    print(f"| {shape[0]} x {shape[1]} | {len(rs)} | {med['exact_s']:.3g} | "
          f"{med['transposed_s']:.3g} | {med['randomized_s']:.3g} | "
          f"{speed_up:.1f}x | {warm:.5f} | {cold:.5f} |")
    verdicts.append((shape, speed_up >= MIN_SPEED_UP and warm >= MIN_ENERGY))
  if raw:
    print("\nraw jnp.linalg.svd (LAPACK gesdd), one gradient, medians: " +
          ", ".join(f"{k}: {v:.2f} s" for k, v in raw.items()) +
          "; the exact method decomposes the tall orientation of every "
          "shape (G^T of a wide G).")
  failed = [s for s, ok in verdicts if not ok]
  print(f"\n{'PASS' if not failed else 'FAIL'}: randomized refresh >= "
        f"{MIN_SPEED_UP:.0f}x faster than the exact SVD at >= {MIN_ENERGY} "
        "of its energy (warm start, minimum over matrices) for every shape" +
        ("" if not failed else "; failing: " + ", ".join(
            f"{s[0]} x {s[1]}" for s in failed)))


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
  parser.add_argument("--repeats", type=int, default=3,
                      help="interleaved timings of each matrix's refreshes")
  parser.add_argument("--save-gradients", metavar="FILE",
                      help="save the gradients (.npz) for --gradients")
  parser.add_argument("--gradients", metavar="FILE", nargs="+",
                      help="load the gradients from --save-gradients files "
                      "(made with the same settings) instead of computing "
                      "them, which needs ~15 GB for the 1B model")
  args = parser.parse_args(argv)

  start = time.perf_counter()
  if args.gradients:
    names, previous_grads, grads = load_gradients(args.gradients,
                                                  args.layers)
    print(f"gradients of {len(names)} matrices from {args.gradients}",
          flush=True)
  else:
    names, previous_grads, grads = layer_gradients(args)
    print(f"gradients of {len(names)} matrices in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
  if args.save_gradients:
    np.savez(args.save_gradients,
             **{f"prev/{n}": g for n, g in zip(names, previous_grads)},
             **{f"cur/{n}": g for n, g in zip(names, grads)})
  jax.clear_caches()
  gc.collect()
  rows = measure(args, names, previous_grads, grads)
  report(args, rows, raw_svd_orientations(rows, args.repeats))


if __name__ == "__main__":
  main()
