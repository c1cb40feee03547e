"""Why the per-layer step is faster than the ordinary one on XLA:CPU.

At realistic batches (LLaMA-60M shapes, 8 x 256 tokens) the per-layer step
(``layerwise.make_layerwise_step``) is faster than the ordinary one although
it does more arithmetic (it recomputes every layer). This times, interleaved
step by step, variants that each change one thing of the ordinary
``optax.adamw`` step:

* ``sgd``: the same step with ``optax.sgd`` (what the optimizer's update
  itself costs);
* ``remat``: every layer recomputed in the backward pass, as the per-layer
  step does (what the recomputation costs, and whether fewer saved
  activations help);
* ``explicit weight gradients``: every ``layerwise.dense`` product of the
  model differentiated by a rule that writes the weight gradient
  ``x^T dy`` as one ``(d_in, d_out)`` product, as the per-layer step's
  ``dense`` does, instead of by JAX's transpose rule of the product;
* the per-layer step with ``optax.adamw`` and with ``optax.sgd``.

Reported: XLA's flops and temporaries, the median step, its ratio to the
ordinary ``optax.adamw`` step, and the process's minor page faults per step.

Run from the repository root: python -m benchmarks.step_anatomy
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any
from unittest import mock

import jax
import optax
from flax import nnx

from benchmarks import step_time
from examples import llama
from galore_optax import layerwise
from galore_optax.layerwise import context as context_lib


@jax.custom_vjp
def _product(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``x @ kernel`` whose weight gradient is one ``(d_in, d_out)`` product."""
  return context_lib.matmul(x, kernel, None)


def _product_fwd(x: jax.Array, kernel: jax.Array
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  return _product(x, kernel), (x, kernel)


def _product_bwd(res: tuple[jax.Array, jax.Array],
                 dy: jax.Array) -> tuple[jax.Array, jax.Array]:
  x, kernel = res
  (dx,) = jax.vjp(lambda x_: context_lib.matmul(x_, kernel, None), x)[1](dy)
  lead = tuple(range(x.ndim - 1))
  dw = jax.lax.dot_general(x, dy, ((lead, lead), ((), ())))
  return dx, dw.astype(kernel.dtype)


_product.defvjp(_product_fwd, _product_bwd)


def explicit_dense(x: jax.Array, kernel: jax.Array, *,
                   dtype: Any = None) -> jax.Array:
  """``layerwise.dense`` outside a step, with the explicit weight gradient."""
  if dtype is not None:
    x, kernel = x.astype(dtype), kernel.astype(dtype)
  return _product(x, kernel)


def variants() -> dict[str, tuple[Callable[[], optax.GradientTransformation],
                                  dict[str, Any]]]:
  """Name -> (optimizer, options: per_layer, remat, explicit)."""
  adamw, sgd = (lambda: optax.adamw(1e-3)), (lambda: optax.sgd(1e-3))
  return {
      "optax.adamw": (adamw, {}),
      "optax.sgd": (sgd, {}),
      "optax.adamw, remat": (adamw, {"remat": True}),
      "optax.adamw, explicit weight gradients": (adamw, {"explicit": True}),
      "optax.adamw per-layer": (adamw, {"per_layer": True}),
      "optax.sgd per-layer": (sgd, {"per_layer": True}),
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="60m")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=256)
  parser.add_argument("--window", type=int, default=10,
                      help="steps timed per variant, interleaved")
  args = parser.parse_args(argv)
  config = llama.get_config(args.model)
  tokens = jax.random.randint(jax.random.key(0),
                              (args.batch_size, args.seq_len + 1), 0,
                              config.vocab_size)
  batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
  live, figures = {}, {}
  for name, (make_tx, opts) in variants().items():
    remat = opts.get("remat", False)
    graphdef, params_abstract = nnx.split(
        llama.abstract_model(config, remat=remat), nnx.Param)
    mode = step_time.Mode(make_tx, per_layer=opts.get("per_layer", False),
                          refreshes=step_time.NO_REFRESH)
    dense = explicit_dense if opts.get("explicit") else layerwise.dense
    # The model calls ``layerwise.dense`` at trace time (compile_step).
    with mock.patch.object(layerwise, "dense", dense):
      compiled, init, _ = step_time.compile_step(mode, graphdef,
                                                 params_abstract, batch)
    params = nnx.state(llama.build_model(config, rngs=0, remat=remat),
                       nnx.Param)
    live[name] = [compiled, params, jax.jit(init)(params)]
    figures[name] = (step_time.xla_flops(compiled),
                     compiled.memory_analysis().temp_size_in_bytes)
  times = {name: [] for name in live}
  usage = {name: [] for name in live}
  step_time.run_window(live, times, usage, batch, args.window)
  base = statistics.median(times["optax.adamw"][1:])
  print(f"LLaMA-{args.model} shapes, float32, batch {args.batch_size} x "
        f"{args.seq_len}, {args.window} steps each, interleaved; jax "
        f"{jax.__version__} on {jax.default_backend()}")
  print("| variant | GFLOP/step | temps (GB) | median (s) | / optax.adamw | "
        "page faults / step |")
  print("|---|---:|---:|---:|---:|---:|")
  for name in live:
    median = statistics.median(times[name][1:])
    flops, temps = figures[name]
    print(f"| {name} | {flops / 1e9:.1f} | {temps / 1e9:.2f} | {median:.3f} | "
          f"{median / base:.2f}x | {step_time.median_usage(usage[name]).faults:.0f} |")


if __name__ == "__main__":
  main()
