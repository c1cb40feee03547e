"""Compiled memory of an 8-bit GaLore per-layer step (regression guard).

The per-layer step exists so that the backward pass holds one layer's work at
a time. This compiles (on abstract inputs, nothing is allocated) a per-layer
step set up as the LLaMA-7B benchmark is (``benchmarks/memory.py --modes
layerwise --remat --weights int8 --projector-dtype int8 --row-chunks``:
``galore_adamw_8bit``, int8 projectors, int8 weights dequantised inside
``layerwise.dense`` / ``embedding_lookup``, every layer through
``layerwise.call_layer``, embedding and head updated in row blocks) on a deep,
narrow stack, and bounds XLA's temporaries by what one layer needs plus the
activations. Anything the step keeps for every layer at once grows with the
depth and breaks the bound: e.g. a copy of each layer's donated 8-bit moments
made at the start of the step and kept until the layer's update (what
``quantize_state_8bit``'s per-use dequantisation cost until the new inner
state was ordered after the update in ``galore_project``: +1.5 GiB at
LLaMA-7B).
"""

import jax
import jax.numpy as jnp
import pytest

import galore_optax
from galore_optax import layerwise
from galore_optax import weight_quantization

# Eight layers leave 0.44 MiB of slack under the bound (1.87 MiB of
# temporaries): anything kept per layer above 56 KiB, such as a copy of a
# layer's 8-bit moments (196 KiB), breaks it.
VOCAB, D, LAYERS, RANK = 256, 256, 8, 192
BATCH, SEQ = 1, 32
ROW_CHUNKS = {"embed": 4, "head": 4}
MiB = 2**20


def _layer(h, p):
  """Two residual branches, each through a GaLore-projected int8 kernel."""
  h = h + jnp.tanh(layerwise.dense(h, p["attn"]))
  return h + jnp.tanh(layerwise.dense(h, p["mlp"]))


def _loss(params, ids):
  h = layerwise.embedding_lookup(params["embed"], ids).astype(jnp.float32)
  for i in range(LAYERS):
    h = layerwise.call_layer(_layer, h, params[f"layer{i}"], remat=True)
  logits = layerwise.dense(h, params["head"]).astype(jnp.float32)
  labels = jnp.roll(ids, -1, axis=1)
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], -1))


def _abstract_params():
  matrix = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  params = {"embed": matrix(VOCAB, D), "head": matrix(D, VOCAB)}
  for i in range(LAYERS):
    params[f"layer{i}"] = {"attn": matrix(D, D), "mlp": matrix(D, D)}
  # Every matrix stored in int8 (as --weights int8).
  return jax.eval_shape(lambda p: weight_quantization.quantize_params(
      p, ["attn", "mlp", "embed", "head"], group_size=64, min_size=1), params)


def _temp_bytes(fused: bool) -> int:
  tx = galore_optax.galore_adamw_8bit(
      1e-3, rank=RANK, target_modules=["attn", "mlp"], projector_dtype="int8")
  step = layerwise.make_layerwise_step(_loss, tx, row_chunks=ROW_CHUNKS,
                                       weight_dtype=jnp.bfloat16, fused=fused)
  params = _abstract_params()
  args = (params, jax.eval_shape(step.init, params),
          jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32),
          jax.eval_shape(lambda: jax.random.key(0)))
  compiled = step.step.lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("fused", [False, True])
def test_per_layer_step_temporaries_do_not_grow_with_depth(fused):
  """The same bound with fused low-rank gradients (``fused=True``), whose
  refresh and ordinary branches each hold one kernel's work."""
  temps = _temp_bytes(fused)
  # One layer's update at a time: a few full-size float32 buffers of the
  # largest kernel (its gradient, its back-projected update, ...).
  one_layer = 4 * D * D * 4
  # The activations: every layer's saved input (float32) and the logits
  # with their gradient.
  activations = BATCH * SEQ * (LAYERS * D + 2 * VOCAB) * 4
  # The 8-bit quantiser's constant lookup tables (a fixed ~0.8 MiB).
  tables = 1 * MiB
  bound = one_layer + activations + tables
  assert temps <= bound, (
      f"temporaries {temps / MiB:.2f} MiB > {bound / MiB:.2f} MiB: the "
      f"per-layer step holds more than one layer's work")
