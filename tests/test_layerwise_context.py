"""The per-layer step's trace-time context (layerwise.context) and its
helpers (trees, carrier), on their own."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from galore_optax import weight_quantization as wq
from galore_optax.layerwise import carrier
from galore_optax.layerwise import context
from galore_optax.layerwise import layout
from galore_optax.layerwise import options
from galore_optax.layerwise import trees
from galore_optax.layerwise import unit_update


def _context(params, per_layer=None):
  opts = options.make_options(
      clip_norm=None, accumulate_steps=1, accumulate_dtype=jnp.float32,
      per_layer=per_layer, row_chunks=None, weight_dtype=jnp.float32)
  tx = optax.sgd(0.1)
  updater = unit_update.UnitUpdater(tx, opts,
                                    layout.LayoutCache(tx, opts)(params))
  leaves = updater.layout.treedef.flatten_up_to(params)
  packed = [updater.init_leaf(i, x) for i, x in enumerate(leaves)]
  return context.LayerwiseContext(updater, leaves, packed,
                                  [None] * len(leaves), None, set())


def test_activate_nests_and_restores():
  assert context.current() is None
  a, b = object(), object()
  with context.activate(a):
    assert context.current() is a
    with context.activate(b):
      assert context.current() is b
    assert context.current() is a
    with pytest.raises(RuntimeError):
      with context.activate(b):
        raise RuntimeError
    assert context.current() is a
  assert context.current() is None


def test_trace_state_tells_inner_traces_apart():
  states = {}

  def f(x):
    states["outer"] = context.trace_state()
    states["outer_again"] = context.trace_state()

    def body(c, _):
      states["scan_body"] = context.trace_state()
      return c, None

    return jax.lax.scan(body, x, None, length=2)[0]

  jax.make_jaxpr(f)(jnp.ones(3))
  assert states["outer"] == states["outer_again"]
  assert states["outer"] != states["scan_body"]


def test_leaves_are_found_by_identity_not_equality():
  params = {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 4)),
            "s": jnp.ones((2, 4))}
  ctx = _context(params, per_layer=["s"])
  a, b, s = ctx.leaves
  ctx.set_hooked([a, b, s])
  twin = jnp.ones((4, 4))  # equal to a and b, but neither
  assert ctx.hooked_index(b) == 1 and ctx.hooked_index(twin) is None
  assert ctx.per_layer_index(s) == 2 and ctx.per_layer_index(a) is None
  assert ctx.dense_target(s) is None  # per_layer leaves go through scans
  i, (stored, packed, key_data) = ctx.dense_target(a)
  assert i == 0 and stored is a and packed is ctx.packed[0]
  assert key_data is None
  with pytest.raises(ValueError, match="more than one"):
    ctx.take(0)
  with pytest.raises(ValueError, match="also elsewhere"):
    ctx.reach_directly(0)
  ctx.reach_directly(1)
  assert ctx.reached == {1}
  ctx.consume_per_layer(2)
  assert ctx.unconsumed_per_layer() == []
  with pytest.raises(ValueError, match="twice"):
    ctx.consume_per_layer(2)


def test_dense_target_inside_a_layer_only_at_the_layers_trace():
  params = {"w": jnp.ones((4, 4))}
  ctx = _context(params)
  found = {}

  def layer(w):
    inputs = (w, ctx.packed[0], None)
    with ctx.layer_scope([w], (0,), [inputs]) as used:
      assert context.current() is ctx and ctx.inside_layer

      def body(c, _):
        found["scan_body"] = ctx.dense_target(w)  # closed over: plain
        return c, None

      jax.lax.scan(body, w, None, length=1)
      found["layer"] = ctx.dense_target(w)
      found["other"] = ctx.dense_target(w + 1)
      with pytest.raises(ValueError, match="more than one"):
        ctx.dense_target(w)
    assert used == {0} and not ctx.inside_layer
    return w

  jax.make_jaxpr(layer)(params["w"])
  assert found["scan_body"] is None and found["other"] is None
  assert found["layer"][0] == 0


def test_values_dequantise_int8_leaves():
  q = wq.quantize_weight(jnp.linspace(-1, 1, 32).reshape(4, 8),
                         group_size=8)
  params = {"a": q, "b": jnp.ones(3)}
  ctx = _context(params)
  stored = [carrier.to_carrier(q), params["b"]]
  q_value, f_value = ctx.values([0, 1], stored, after=jnp.ones(2))
  np.testing.assert_array_equal(q_value, wq.dequantize_weight(q))
  assert f_value is params["b"]


def test_carrier_keeps_every_code():
  codes = jnp.arange(-128, 128, dtype=jnp.int8).reshape(16, 16)
  q = wq.QuantizedWeight(codes, jnp.ones((16, 1)))
  c = carrier.to_carrier(q)
  assert c.codes.dtype == carrier.CARRIER_DTYPE
  np.testing.assert_array_equal(carrier.from_carrier(c).codes, codes)


def test_trees_helpers():
  mask = [True, False, True, False]
  xs = ["a", "b", "c", "d"]
  assert trees.select(xs, mask) == ["a", "c"]
  assert trees.interleave(mask, ["A", "C"], ["b", "d"]) == ["A", "b", "C",
                                                           "d"]
  assert trees.merge(xs, mask, ["A", "C"]) == ["A", "b", "C", "d"]
  z = trees.float0_like(jnp.ones((2, 3), jnp.int32))
  assert z.shape == (2, 3) and z.dtype == jax.dtypes.float0
  assert trees.is_float(jnp.ones(2)) and not trees.is_float(jnp.ones(2, int))
