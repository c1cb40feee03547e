"""projector_storage: float32, bfloat16 and int8 projectors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from galore_optax import projection
from galore_optax import projector_storage
from galore_optax import quantization


def _projector(shape=(3, 40, 12), proj_type="full", rank=5):
  """A float32 projector of orthonormal factors of a random gradient."""
  plan = projection.plan_leaf(shape, rank, proj_type)
  grad = jax.random.normal(jax.random.key(0), shape)
  return projection.compute_projector(grad, plan), plan


def test_float32_round_trip_is_exact():
  projector, _ = _projector()
  stored = projector_storage.store(projector, "float32")
  for got, want in zip(projector_storage.load(stored), projector):
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, want)


def test_bfloat16_round_trip_is_a_bfloat16_rounding():
  projector, _ = _projector()
  stored = projector_storage.store(projector, "bfloat16")
  assert all(f.dtype == jnp.bfloat16 for f in stored)
  for got, want in zip(projector_storage.load(stored), projector):
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(
        got, want.astype(jnp.bfloat16).astype(jnp.float32))


def test_int8_round_trip_is_the_signed_blockwise_quantisation():
  projector, _ = _projector()
  stored = projector_storage.store(projector, "int8")
  for factor, original, loaded in zip(stored, projector,
                                      projector_storage.load(stored)):
    assert isinstance(factor, quantization.QuantizedArray)
    assert factor.codes.shape == original.shape
    assert factor.codes.dtype == jnp.uint8
    blocks = -(-original.size // projector_storage.BLOCK_SIZE)
    assert factor.absmax.shape == (blocks,)
    want = quantization.dequantize(
        quantization.quantize(original, True, projector_storage.BLOCK_SIZE),
        True, projector_storage.BLOCK_SIZE)
    np.testing.assert_array_equal(loaded, want)
    # The signed dynamic map's worst relative step, times the block maxima.
    np.testing.assert_allclose(loaded, original,
                               atol=0.0071 * float(jnp.max(factor.absmax)))


@pytest.mark.parametrize("dtype", projector_storage.PROJECTOR_DTYPES)
@pytest.mark.parametrize("proj_type", ["left", "right", "full"])
def test_factor_shape_and_masked_sides(dtype, proj_type):
  projector, plan = _projector(proj_type=proj_type)
  stored = projector_storage.store(projector, dtype)
  shapes = (plan.left_shape, plan.right_shape)
  uses = (plan.use_left, plan.use_right)
  for factor, shape, used in zip(stored, shapes, uses):
    if used:
      assert projector_storage.factor_shape(factor) == shape
    else:
      assert isinstance(factor, optax.MaskedNode)
      assert isinstance(projector_storage.load_factor(factor),
                        optax.MaskedNode)
  loaded = jax.jit(projector_storage.load)(stored)
  assert isinstance(loaded, projection.Projector)
  assert jax.tree.structure(loaded) == jax.tree.structure(projector)


@pytest.mark.parametrize("dtype", projector_storage.PROJECTOR_DTYPES)
def test_storing_a_loaded_projector_gives_the_same_storage(dtype):
  # What a refresh that keeps the previous projector does: load, store.
  projector, _ = _projector()
  store = jax.jit(projector_storage.store, static_argnums=1)
  stored = store(projector, dtype)
  again = store(jax.jit(projector_storage.load)(stored), dtype)
  assert jax.tree.structure(again) == jax.tree.structure(stored)
  for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(stored)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
