"""Compiled memory of an 8-bit GaLore per-layer step (regression guard).

The per-layer step exists to keep one layer's gradient (and one leaf's
optimizer work) in memory at a time. This compiles, on abstract inputs
(nothing is allocated), a per-layer step configured like the LLaMA-7B
benchmark (``benchmarks/memory.py --modes layerwise --remat --weights int8
--projector-dtype int8 --row-chunks``) on a small stack of layers, and bounds
XLA's temporaries by what one layer needs. Anything the step keeps for every
layer at once -- a copy of each layer's donated 8-bit moments made at the
start of the step, say -- grows with the depth and breaks the bound.
"""

import jax
import jax.numpy as jnp
import numpy as np

import galore_optax
from galore_optax import layerwise
from galore_optax import weight_quantization

VOCAB, D, F, LAYERS, RANK = 1024, 256, 512, 12, 128
BATCH, SEQ = 2, 64
ROW_CHUNKS = {"embed": 4, "head": 4}


def _layer(h, p):
  """A pre-norm block: an attention-like and an MLP-like residual branch."""
  def norm(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale
  h = h + jnp.tanh(layerwise.dense(norm(h, p["norm"]), p["attn"]["q"]))
  u = jax.nn.silu(layerwise.dense(norm(h, p["norm"]), p["mlp"]["up"]))
  return h + layerwise.dense(u, p["mlp"]["down"])


def _loss(params, ids):
  h = layerwise.embedding_lookup(params["embed"], ids).astype(jnp.float32)
  for i in range(LAYERS):
    h = layerwise.call_layer(_layer, h, params[f"layer{i}"], remat=True)
  logits = layerwise.dense(h, params["head"]).astype(jnp.float32)
  labels = jnp.roll(ids, -1, axis=1)
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], -1))


def _abstract_params():
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  params = {"embed": s(VOCAB, D), "head": s(D, VOCAB)}
  for i in range(LAYERS):
    params[f"layer{i}"] = {"norm": s(D), "attn": {"q": s(D, D)},
                           "mlp": {"up": s(D, F), "down": s(F, D)}}
  # Every matrix in int8 (groups of 64 values), as --weights int8.
  return jax.eval_shape(lambda p: weight_quantization.quantize_params(
      p, ["attn", "mlp", "embed", "head"], group_size=64, min_size=1), params)


def _compiled_step():
  tx = galore_optax.galore_adamw_8bit(
      1e-3, rank=RANK, target_modules=["attn", "mlp"],
      projector_dtype="int8")
  lw = layerwise.make_layerwise_step(_loss, tx, row_chunks=ROW_CHUNKS,
                                     weight_dtype=jnp.bfloat16)
  params = _abstract_params()
  state = jax.eval_shape(lw.init, params)
  ids = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)
  key = jax.eval_shape(lambda: jax.random.key(0))
  return lw.step.lower(params, state, ids, key).compile()


def test_per_layer_step_temporaries_do_not_grow_with_depth():
  mem = _compiled_step().memory_analysis()
  temps = mem.temp_size_in_bytes
  # What one layer's update needs at once: the largest weight gradient in
  # float32, its GaLore update at full size and the layer's 8-bit state
  # work, a few such buffers; plus the activations (saved layer inputs,
  # one layer's recomputation, the logits and their gradient).
  largest_grad = D * F * 4
  activations = BATCH * SEQ * (LAYERS * D + 4 * F + 4 * VOCAB) * 4
  bound = 4 * largest_grad + activations
  # A copy of every layer's 8-bit moments kept from the start of the step
  # (two uint8 arrays of the low-rank shape per projected kernel, the
  # regression this guards against) grows with LAYERS and breaks the bound.
  assert temps <= bound, (temps, bound)
