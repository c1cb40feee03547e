"""int8 weight formats: round-to-nearest error by scale granularity.

Trains the example's ``tiny`` LLaMA for a few hundred steps (the
pre-training example, default data, bf16 weights, galore_adamw_8bit), then
quantises its attention and MLP matrices, at initialisation and after
training, to int8 with one float32 scale per

* group of 64, 128 or 256 consecutive values of a row (the library's format,
  ``galore_optax.weight_quantization``; groups along the last axis),
* row (``group_size=None``: one scale per input row of a Flax kernel),
* column (one scale per output channel, the usual "channel-wise" format),

and prints the relative error ``|Q(W) - W|_F / |W|_F`` (mean and worst over
the matrices) and the storage per value. This is the measurement behind the
choice of format in ``weight_quantization``'s docstring.

Run from the repository root: python -m benchmarks.weight_error [--steps 300]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from examples import llama
from examples import pretrain_llama
from galore_optax import targets
from galore_optax import weight_quantization as wq

FORMATS = {"group 64": 64, "group 128": 128, "group 256": 256,
           "per row": None, "per column": "column"}


def rel_error(w: np.ndarray, fmt) -> tuple[float, int]:
  """Relative Frobenius error of round-to-nearest, and the stored bytes."""
  x = jnp.asarray(w, jnp.float32)
  if fmt == "column":
    q = wq.quantize_weight(x.T, group_size=None)
    back = wq.dequantize_weight(q).T
  else:
    q = wq.quantize_weight(x, group_size=fmt)
    back = wq.dequantize_weight(q)
  err = float(jnp.linalg.norm(back - x) / jnp.linalg.norm(x))
  return err, q.codes.size + 4 * q.scale.size


def matrices(params) -> dict[str, np.ndarray]:
  mask = targets.target_mask(params, ["attn", "mlp"])
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {targets.path_to_name(path): np.asarray(leaf, np.float32)
          for (path, leaf), m in zip(flat, jax.tree.leaves(mask)) if m}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=300)
  args = parser.parse_args()
  init = llama.get_params(llama.build_model(llama.get_config("tiny"),
                                            rngs=0))
  with tempfile.TemporaryDirectory() as d:
    pretrain_llama.main([
        "--optimizer", "galore_adamw_8bit", "--param-dtype", "bfloat16",
        "--steps", str(args.steps), "--batch-size", "8", "--seq-len", "128",
        "--eval-every", "0", "--no-progress", "--no-plot",
        "--no-tensorboard", "--out-dir", d])
    ckpt = Path(d) / "checkpoints" / str(args.steps) / "state"
    trained = ocp.StandardCheckpointer().restore(ckpt.absolute())["params"]
  print(f"\nmachine: {platform.machine()}, jax {jax.__version__}; LLaMA tiny, "
        f"attention + MLP matrices, round to nearest")
  print("| format | bytes / value | init: mean rel. error | max | "
        f"after {args.steps} steps: mean | max |")
  print("|---|---:|---:|---:|---:|---:|")
  for name, fmt in FORMATS.items():
    row = []
    for params in (init, trained):
      mats = matrices(params)
      errs = [rel_error(w, fmt) for w in mats.values()]
      row.append([e for e, _ in errs])
      size = sum(b for _, b in errs) / sum(w.size for w in mats.values())
    print(f"| {name} | {size:.4f} | {np.mean(row[0]):.5f} | "
          f"{np.max(row[0]):.5f} | {np.mean(row[1]):.5f} | "
          f"{np.max(row[1]):.5f} |")


if __name__ == "__main__":
  main()
