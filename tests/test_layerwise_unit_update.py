"""The update of one leaf, layer slice or row block (layerwise.unit_update),
on its own: what it computes equals ``tx`` on that leaf."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import galore_optax as go
from galore_optax.layerwise import layout
from galore_optax.layerwise import options
from galore_optax.layerwise import packing
from galore_optax.layerwise import unit_update


def _updater(tx, params, **kw):
  args = dict(clip_norm=None, accumulate_steps=1,
              accumulate_dtype=jnp.float32, per_layer=None, row_chunks=None,
              weight_dtype=jnp.float32)
  opts = options.make_options(**(args | kw))
  return unit_update.UnitUpdater(tx, opts, layout.LayoutCache(tx, opts)(params))


_RNG = np.random.default_rng(0)
_P = {"a": jnp.asarray(_RNG.normal(size=(8, 4)), jnp.float32),
      "b": jnp.asarray(_RNG.normal(size=(4,)), jnp.float32)}
_G = jnp.asarray(_RNG.normal(size=(8, 4)), jnp.float32)


def _reference(tx, g, steps=1):
  """``tx`` on leaf ``a`` alone, as an ordinary step would run it."""
  p, s = _P["a"], tx.init({"a": _P["a"]})
  for _ in range(steps):
    u, s = tx.update({"a": g}, s, {"a": p})
    p = optax.apply_updates(p, u["a"])
  return p


def _counts(opt_state):
  """The step counts in an optax state."""
  return [x for path, x in jax.tree_util.tree_leaves_with_path(opt_state)
          if "count" in jax.tree_util.keystr(path)]


def test_leaf_update_is_tx_on_that_leaf():
  tx = optax.adamw(1e-2, weight_decay=0.1)
  up = _updater(tx, _P)
  packed = up.init_leaf(0, _P["a"])
  assert all(jnp.issubdtype(x.dtype, jnp.floating)
             for x in jax.tree.leaves(packed))
  new_p, packed = jax.jit(lambda g, p, s: up.update_leaf(0, g, p, s))(
      _G, _P["a"], packed)
  np.testing.assert_allclose(new_p, _reference(tx, _G), rtol=1e-6)
  assert [int(c) for c in _counts(up.unpack_leaf(0, packed).opt_state)] == [1]


def test_row_blocks_and_gradient_functions_match_the_whole_leaf():
  tx = go.adamw_8bit(1e-2, min_size=8, block_size=8)  # element-wise
  whole = _updater(tx, _P)
  blocks = _updater(tx, _P, row_chunks={"a": 4})
  assert blocks.layout.unit_avals[0].shape == (2, 4)
  rows = lambda start, n: jax.lax.dynamic_slice_in_dim(_G, start, n, axis=0)
  p1, s1 = jax.jit(lambda: whole.update_leaf(
      0, _G, _P["a"], whole.init_leaf(0, _P["a"])))()
  p2, s2 = jax.jit(lambda: blocks.update_leaf(
      0, rows, _P["a"], blocks.init_leaf(0, _P["a"])))()
  np.testing.assert_allclose(p1, p2, rtol=1e-6)
  assert all(x.shape[0] == 4 for x in jax.tree.leaves(s2))
  c1 = _counts(whole.unpack_leaf(0, s1).opt_state)
  c2 = _counts(blocks.unpack_leaf(0, s2).opt_state)
  assert c1 and all(int(c) == 1 for c in c1)
  assert c2 and all(np.all(np.asarray(c) == 1) for c in c2)


def test_accumulation_updates_on_the_last_micro_batch():
  tx = optax.sgd(0.5)
  up = _updater(tx, _P, accumulate_steps=2)
  step = jax.jit(lambda g, p, s: up.update_leaf(0, g, p, s))
  packed = up.init_leaf(0, _P["a"])
  p, packed = step(_G, _P["a"], packed)
  np.testing.assert_array_equal(p, _P["a"])  # mid-window: nothing moves
  assert int(up.unpack_leaf(0, packed).mini_step) == 1
  p, packed = step(3 * _G, p, packed)
  # A running mean: float32 rounding of (G + (3G - G) / 2).
  np.testing.assert_allclose(p, _reference(tx, 2 * _G), rtol=0, atol=1e-6)
  st = up.unpack_leaf(0, packed)
  assert int(st.mini_step) == 0 and not np.any(st.acc)


def test_clip_norm_clips_the_unit():
  tx = optax.sgd(1.0)
  up = _updater(tx, _P, clip_norm=1.0)
  new_p, _ = up.update_leaf(0, _G, _P["a"], up.init_leaf(0, _P["a"]))
  clipped = unit_update.clip_leaf(_G, 1.0)
  np.testing.assert_allclose(np.linalg.norm(clipped), 1.0, rtol=1e-6)
  np.testing.assert_allclose(new_p, _P["a"] - clipped, rtol=1e-6)


def test_init_leaf_of_a_stack_has_one_state_per_layer():
  params = {"s": jnp.ones((3, 8, 4))}
  up = _updater(go.adamw_8bit(1e-2, min_size=8, block_size=8), params,
                per_layer=["s"])
  packed = up.init_leaf(0, params["s"])
  assert all(x.shape[0] == 3 for x in jax.tree.leaves(packed))
  st = up.unpack_leaf(0, packed)
  assert isinstance(st, packing.LeafState)
  new_p, _ = up.update_leaf(0, jnp.ones((3, 8, 4)), params["s"], packed)
  assert new_p.shape == (3, 8, 4) and np.all(np.asarray(new_p) < 1)
