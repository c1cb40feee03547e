"""Static facts about a per-layer step's parameter tree (layerwise.layout)
and the step's options (layerwise.options), on their own."""

import jax
import jax.numpy as jnp
import optax
import pytest

import galore_optax as go
from galore_optax import weight_quantization as wq
from galore_optax.layerwise import layout
from galore_optax.layerwise import options
from galore_optax.layerwise import packing


def _options(**kw):
  args = dict(clip_norm=None, accumulate_steps=1,
              accumulate_dtype=jnp.float32, per_layer=None, row_chunks=None,
              weight_dtype=jnp.float32)
  return options.make_options(**(args | kw))


def _params():
  s = jax.ShapeDtypeStruct
  return {"blocks": {"attn": s((3, 8, 8), jnp.float32),
                     "norm": s((3, 8), jnp.float32)},
          "embed": jax.eval_shape(
              lambda: wq.quantize_weight(jnp.ones((16, 8)), group_size=8)),
          "head": s((8, 16), jnp.float32)}


def test_layout_of_stacked_chunked_and_int8_leaves():
  tx = optax.adam(1e-2)
  opts = _options(per_layer=["blocks"], row_chunks={"head": 4},
                  weight_dtype=jnp.bfloat16)
  lay = layout.LayoutCache(tx, opts)(_params())
  assert lay.names == ("blocks.attn", "blocks.norm", "embed", "head")
  assert lay.per_layer == (True, True, False, False)
  assert lay.chunks == (1, 1, 1, 4)
  assert lay.quantized == (False, False, True, False)
  assert lay.qindex == (None, None, 0, None)
  assert [u.shape for u in lay.unit_avals] == [(8, 8), (8,), (16, 8), (2, 16)]
  assert lay.unit_avals[2].dtype == jnp.bfloat16  # as the optimizer sees it
  assert lay.anchor == (None,) * 4 and lay.lowrank == (None,) * 4
  # Each unit's state is tx.init of a tree holding only that unit.
  for i, spec in enumerate(lay.specs):
    assert isinstance(spec, packing.LeafState)
    expected = jax.eval_shape(tx.init,
                              lay.single(i, lay.unit_avals[i], None))
    assert jax.tree.structure(spec.opt_state) == jax.tree.structure(expected)
    assert isinstance(spec.acc, optax.MaskedNode)
  tree = lay.single(3, "x", None)
  assert jax.tree.leaves(tree) == ["x"]
  assert isinstance(tree["blocks"]["attn"], optax.MaskedNode)


def test_anchor_and_low_rank_accumulators():
  # galore_labels refuses a tree without any GaLore target: the bias gets
  # a 1x1 placeholder of the kernel beside it.
  tx = go.galore_adamw(1e-2, rank=2, target_modules=["attn"])
  cache = layout.LayoutCache(tx, _options(accumulate_steps=2))
  params = {"attn": jnp.ones((8, 6)), "norm": jnp.ones((6,))}
  lay = cache(params)
  assert lay.anchor[0] is None
  index, aval = lay.anchor[1]
  assert index == 0 and aval.shape == (1, 1)
  assert lay.anchor_zeros(1).shape == (1, 1) and lay.anchor_zeros(0) is None
  # The projected leaf accumulates in its low-rank shape, the other whole.
  assert lay.lowrank[0].lowrank_shape == (8, 2) and lay.lowrank[1] is None
  assert lay.specs[0].acc.shape == (8, 2)
  assert lay.specs[1].acc.shape == (6,)
  assert lay.specs[1].mini_step.dtype == jnp.int32
  # Cached by structure, shapes and dtypes: abstract params hit the cache.
  assert cache(jax.eval_shape(lambda: params)) is lay
  assert cache({"attn": jnp.ones((8, 4)), "norm": jnp.ones((4,))}) is not lay


def test_layout_errors():
  tx = optax.sgd(0.1)
  with pytest.raises(ValueError, match="floating-point"):
    layout.LayoutCache(tx, _options())({"w": jnp.ones(3, jnp.int32)})
  with pytest.raises(ValueError, match="no leading layer axis"):
    layout.LayoutCache(tx, _options(per_layer=["w"]))({"w": jnp.ones(())})
  with pytest.raises(ValueError, match="matches no parameter"):
    layout.LayoutCache(tx, _options(per_layer="x"))({"w": jnp.ones(3)})
  with pytest.raises(ValueError, match="cannot be split"):
    layout.LayoutCache(tx, _options(row_chunks={"w": 2}))({"w": jnp.ones(3)})


def test_options():
  opts = _options(row_chunks={"head": 4, "embed": 2}, per_layer="blocks\\..*")
  assert opts.row_chunks("lm.head.kernel") == 4
  assert opts.row_chunks("embed") == 2 and opts.row_chunks("attn") == 1
  assert opts.is_per_layer("blocks.attn") and not opts.is_per_layer("x.blocks")
  assert opts.accumulate_dtype == jnp.float32
  with pytest.raises(ValueError, match="clip_norm"):
    _options(clip_norm=-1.0)
  with pytest.raises(ValueError, match="row_chunks"):
    _options(row_chunks={"head": 0})
  with pytest.raises(ValueError, match="floating dtype"):
    _options(weight_dtype=jnp.int8)
