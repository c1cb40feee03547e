"""Packing of the per-layer step's states (galore_optax.layerwise.packing).

Every state array travels through the backward pass as a floating-point
cotangent: packing must be a bit-cast that keeps every bit pattern.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from galore_optax import layerwise as lw
from galore_optax import ordering
from galore_optax.layerwise import packing


def test_pack_round_trip_keeps_every_bit_pattern():
  rng = np.random.default_rng(1)
  codes = np.stack([np.roll(np.arange(256, dtype=np.uint8), i)
                    for i in range(4)])[:, :255]  # 255: needs padding
  words = rng.integers(0, 2**32, (3, 5), dtype=np.uint32)
  words[0, :3] = [0x7F800001, 0xFFC00000, 0x7FBFFFFF]  # NaN payloads
  state = {
      "codes": jnp.asarray(codes),
      "scalar_code": jnp.asarray(np.uint8(0xFF)),
      "count": jnp.asarray(words.view(np.int32)),
      "words": jnp.asarray(words),
      "flags": jnp.asarray([True, False, True]),
      "half": jnp.asarray(rng.integers(-2**15, 2**15, (4,), dtype=np.int16)),
      "moment": jnp.asarray(rng.normal(size=(2, 3)), jnp.bfloat16),
  }
  spec = jax.eval_shape(lambda: state)
  packed = jax.jit(lw.pack_state)(state)
  assert all(jnp.issubdtype(x.dtype, jnp.floating)
             for x in jax.tree.leaves(packed))
  assert packed["codes"].shape == (4, 64)

  # Through a custom_vjp cotangent, as in the step.
  @jax.custom_vjp
  def hook(p, s):
    del s
    return p

  hook.defvjp(lambda p, s: (p, s), lambda s, g: (g, s))
  _, back = jax.jit(jax.grad(lambda p, s: hook(p, s).sum(), argnums=(0, 1)))(
      jnp.ones(2), packed)
  out = jax.jit(lambda b: lw.unpack_state(b, spec))(back)
  for name in state:
    assert out[name].dtype == state[name].dtype, name
    np.testing.assert_array_equal(
        np.asarray(out[name]).view(np.uint8) if out[name].dtype != bool else
        out[name], np.asarray(state[name]).view(np.uint8)
        if state[name].dtype != bool else state[name], err_msg=name)


@pytest.mark.parametrize("dtype, shape, packed_dtype, packed_shape", [
    (jnp.float32, (3, 5), jnp.float32, (3, 5)),
    (jnp.bfloat16, (4,), jnp.bfloat16, (4,)),
    (jnp.int32, (3, 5), jnp.float32, (3, 5)),
    (jnp.uint32, (), jnp.float32, ()),
    (jnp.int16, (2, 3), jnp.float16, (2, 3)),
    (jnp.uint8, (3, 5), jnp.float32, (3, 2)),
    (jnp.int8, (8,), jnp.float32, (2,)),
    (jnp.uint8, (), jnp.float32, (1,)),
    (jnp.bool_, (2, 3), jnp.float32, (2, 1)),
])
def test_pack_array_shapes_and_round_trip(dtype, shape, packed_dtype,
                                          packed_shape):
  rng = np.random.default_rng(0)
  if dtype == jnp.bool_:
    x = jnp.asarray(rng.integers(0, 2, shape).astype(bool))
  elif jnp.issubdtype(dtype, jnp.integer):
    info = jnp.iinfo(dtype)
    x = jnp.asarray(rng.integers(info.min, info.max, shape, endpoint=True,
                                 dtype=np.int64).astype(dtype))
  else:
    x = jnp.asarray(rng.normal(size=shape), dtype)
  y = packing.pack_array(x)
  assert y.dtype == packed_dtype and y.shape == packed_shape
  spec = jax.ShapeDtypeStruct(shape, dtype)
  back = packing.unpack_array(y, spec)
  assert back.dtype == x.dtype and back.shape == x.shape
  np.testing.assert_array_equal(np.asarray(back), np.asarray(x))


def test_unpack_array_after_waits_and_keeps_the_bits():
  codes = jnp.arange(256, dtype=jnp.uint8).reshape(4, 64)
  flags = jnp.asarray([True, False, True])
  g = jnp.asarray([jnp.nan, -jnp.inf, 3.0])  # any values: the zero is exact

  def unpack(y_codes, y_flags, g):
    zero = ordering.zero_after(g)
    return (packing.unpack_array(y_codes, jax.eval_shape(lambda: codes),
                                 zero),
            packing.unpack_array(y_flags, jax.eval_shape(lambda: flags), zero))

  out = jax.jit(unpack)(packing.pack_array(codes), packing.pack_array(flags),
                        g)
  np.testing.assert_array_equal(out[0], codes)
  np.testing.assert_array_equal(out[1], flags)
  # The unpacked codes depend on g (that is the point of ``after``).
  jaxpr = jax.make_jaxpr(unpack)(packing.pack_array(codes),
                                 packing.pack_array(flags), g)
  assert "reduce_sum" in str(jaxpr)


def test_typed_keys_cannot_be_packed():
  with pytest.raises(TypeError, match="key_data"):
    packing.pack_array(jax.random.key(0))


def test_pack_state_keeps_structure():
  state = packing.LeafState({"mu": jnp.ones((2, 3)),
                             "count": jnp.zeros([], jnp.int32)},
                            jnp.zeros((2, 3)), jnp.zeros([], jnp.int32))
  packed = lw.pack_state(state)
  assert jax.tree.structure(packed) == jax.tree.structure(state)
  back = lw.unpack_state(packed, jax.eval_shape(lambda: state))
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


def test_pack_leaves_keeps_only_the_arrays():
  """A unit's state holds a masked node per other parameter: only its
  arrays are stored, in ``jax.tree.leaves`` order, and come back bit for
  bit in the spec's structure."""
  masked = {f"other{i}": optax.MaskedNode() for i in range(50)}
  state = packing.LeafState(
      {"mu": dict(masked, w=jnp.arange(6.0).reshape(2, 3)),
       "count": jnp.asarray(7, jnp.int32), "codes": jnp.arange(5, dtype=jnp.int8)},
      optax.MaskedNode(), optax.MaskedNode())
  packed = lw.pack_leaves(state)
  assert isinstance(packed, tuple) and len(packed) == 3
  assert all(jnp.issubdtype(x.dtype, jnp.floating) for x in packed)
  back = lw.unpack_leaves(packed, jax.eval_shape(lambda: state))
  assert jax.tree.structure(back) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


def test_step_state_is_flat():
  """The step's state has a few nodes per parameter leaf, however many
  parameters each unit's optax state masks (it is unflattened in Python
  after every step)."""
  params = {f"w{i}": jnp.ones((4, 4)) for i in range(30)}
  loss = lambda p, x: sum(jnp.sum(x @ w) for w in p.values())
  init, _ = lw.make_layerwise_step(loss, optax.adamw(1e-3))
  state = init(params)
  arrays = len(jax.tree.leaves(state))
  assert arrays == 30 * 3  # count, mu, nu
  assert jax.tree.structure(state).num_nodes <= arrays + 30 + 3
