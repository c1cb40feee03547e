"""The update of one unit: a leaf, a layer slice or a block of rows.

Each unit has its own optimizer state (``tx`` of a tree holding only that
leaf, see ``layout``). Its update clips the gradient (``clip_norm``),
accumulates it (``accumulate_steps``, in low rank for GaLore-projected
leaves) and runs ``tx`` on the unit; an int8 leaf's update is rounded back
to int8 (``weight_quantization.apply_update``). A leaf's update runs over
its units: a ``jax.vmap`` over the layer slices of a ``per_layer`` stack, a
loop over the row blocks of a ``row_chunks`` leaf.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Union

import jax
import jax.numpy as jnp
import optax

from galore_optax import gradient_supply
from galore_optax import ordering
from galore_optax import projection
from galore_optax import projector_storage
from galore_optax import weight_quantization
from galore_optax.layerwise import layout as layout_lib
from galore_optax.layerwise import options as options_lib
from galore_optax.layerwise import packing
from galore_optax.transform import GaLoreState

# int8 leaves are re-quantised this many values at a time (same bits as at
# once): the float32 intermediates and rounding noise of a LLaMA-7B MLP
# weight (45M values) are otherwise several 172 MiB buffers.
ROUND_BLOCK_ELEMENTS = 1 << 22

# A gradient, ``(start, rows) -> rows start:start+rows of the gradient``, or
# a fused kernel's ``gradient_supply.GradientSupply``.
Gradient = Union[jax.Array, Callable[[Any, int], jax.Array],
                 gradient_supply.GradientSupply]
Supply = gradient_supply.GradientSupply


def clip_leaf(g: jax.Array, max_norm: float) -> jax.Array:
  """``optax.clip_by_global_norm(max_norm)`` applied to a single array.

  Args:
    g: a gradient.
    max_norm: the largest Frobenius norm it may have.

  Returns:
    ``g * min(1, max_norm / ||g||_2)``.
  """
  clipped, _ = optax.clip_by_global_norm(max_norm).update(
      g, optax.EmptyState())
  return clipped


def clip_by_leaf_norm(max_norm: float) -> optax.GradientTransformation:
  """Clips each leaf to Frobenius norm ``max_norm`` on its own.

  ``g <- g * min(1, max_norm / ||g||_2)`` for every leaf separately (the
  same formula as ``optax.clip_by_global_norm``, with the leaf's own norm).
  It is what ``make_layerwise_step(clip_norm=...)`` does, usable in an
  ordinary step to get the same behaviour.

  Args:
    max_norm: the largest Frobenius norm a leaf's update may have.

  Returns:
    An ``optax.GradientTransformation`` with an empty state.
  """

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda g: clip_leaf(g, max_norm), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def with_projectors(old: Any, new: Any) -> Any:
  """``old`` with every GaLoreState's projectors taken from ``new``.

  Args:
    old: an optimizer state.
    new: a state of the same structure.

  Returns:
    ``old``, its GaLore projectors replaced.
  """
  is_galore = lambda x: isinstance(x, GaLoreState)
  return jax.tree.map(
      lambda a, b: a._replace(projectors=b.projectors) if is_galore(a) else a,
      old, new, is_leaf=is_galore)


@dataclasses.dataclass(frozen=True)
class UnitUpdater:
  """Initialises and updates the units of one parameter tree's leaves.

  Attributes:
    tx: the optimizer.
    options: the step's options.
    layout: the parameter tree's layout.
  """

  tx: optax.GradientTransformation
  options: options_lib.StepOptions
  layout: layout_lib.Layout

  def leaf_value(self, i: int, p: Any) -> jax.Array:
    """The float value of a stored leaf (int8 leaves dequantised).

    Args:
      i: the leaf index.
      p: its stored value (a ``QuantizedWeight`` for int8 leaves).

    Returns:
      The value the model and the optimizer see.
    """
    if self.layout.quantized[i]:
      return weight_quantization.dequantize_weight(p,
                                                   self.options.weight_dtype)
    return p

  def init_unit(self, i: int, p: jax.Array) -> packing.LeafState:
    """The unpacked state of one unit of leaf ``i``, with value ``p``."""
    layout = self.layout
    opt_state = self.tx.init(layout.single(i, p, layout.anchor_zeros(i)))
    spec = layout.specs[i]
    if self.options.accumulate_steps > 1:
      acc = jnp.zeros(spec.acc.shape, spec.acc.dtype)
      mini = jnp.zeros([], jnp.int32)
    else:
      acc = mini = optax.MaskedNode()
    return packing.LeafState(opt_state, acc, mini)

  def init_leaf(self, i: int, stored: Any) -> Any:
    """The packed state of leaf ``i`` (a leading axis over its units).

    Args:
      i: the leaf index.
      stored: its stored value.

    Returns:
      The packed ``LeafState``.
    """
    p = self.leaf_value(i, stored)
    fn = lambda x: packing.pack_leaves(self.init_unit(i, x))
    if self.layout.per_layer[i]:
      return jax.vmap(fn)(p)
    nk = self.layout.chunks[i]
    if nk > 1:
      return jax.vmap(fn)(p.reshape(nk, p.shape[0] // nk, *p.shape[1:]))
    return fn(p)

  def unpack_leaf(self, i: int, packed: Any) -> packing.LeafState:
    """Leaf ``i``'s packed state -> its unpacked ``LeafState``."""
    spec = self.layout.specs[i]
    if self.layout.per_layer[i] or self.layout.chunks[i] > 1:
      return jax.vmap(lambda s: packing.unpack_leaves(s, spec))(packed)
    return packing.unpack_leaves(packed, spec)

  def run_tx(self, i: int, g: jax.Array | Supply, opt_state: Any,
             value: jax.Array) -> tuple[Any, Any]:
    """``tx.update`` of one unit: (updates tree, new optimizer state).

    A supplied gradient goes in as a placeholder that ``galore_project``
    recognises (``gradient_supply``); it raises if none took it.
    """
    layout = self.layout
    z = layout.anchor_zeros(i)
    if not isinstance(g, Supply):
      return self.tx.update(layout.single(i, g, z), opt_state,
                            layout.single(i, value, z))
    aval = layout.unit_avals[i]
    stand_in = gradient_supply.placeholder(aval.shape, aval.dtype)
    with gradient_supply.supplying(stand_in, g):
      out = self.tx.update(layout.single(i, stand_in, z), opt_state,
                           layout.single(i, value, z))
    if not g.consumed:
      raise ValueError(
          f"fused=True: the gradient of {layout.names[i]!r} did not reach "
          "its galore_project unchanged (a transformation before it in the "
          "chain changed it); use fused=False with this optimizer.")
    return out

  def tx_update(self, i: int, g: jax.Array | Supply, opt_state: Any, p: Any,
                key: Any) -> tuple[Any, Any]:
    """``tx`` on one unit: (new stored value, new optimizer state).

    Args:
      i: the leaf index.
      g: the unit's (clipped, accumulated) gradient.
      opt_state: its unpacked optimizer state.
      p: its stored value.
      key: for int8 leaves, None (round to nearest) or ``(key, first row)``.

    Returns:
      The new stored value and optimizer state (dtypes unchanged).
    """
    layout = self.layout
    updates, new_state = self.run_tx(i, g, opt_state, self.leaf_value(i, p))
    u = layout.treedef.flatten_up_to(updates)[i]
    # Keep the state's dtypes fixed (lax.cond and donation need it).
    new_state = jax.tree.map(lambda a, b: jnp.asarray(b).astype(a.dtype),
                             opt_state, new_state)
    if layout.quantized[i]:
      key, row_offset = key if key is not None else (None, 0)
      return (weight_quantization.apply_update(
          p, u, key=key, row_offset=row_offset,
          block_elements=ROUND_BLOCK_ELEMENTS), new_state)
    return optax.apply_updates(p, u), new_state

  def accumulate(self, i: int, g: jax.Array, p: Any, st: packing.LeafState,
                 key: Any) -> tuple[Any, packing.LeafState]:
    """One micro-batch of ``accumulate_steps``; ``tx`` runs on the last.

    A GaLore-projected leaf accumulates its projected gradient: on the
    first micro-batch of a window the optimizer refreshes its projector
    from that micro-batch's gradient (a trial update of which only the
    projectors are kept), and the mean is projected back for ``tx``.

    Args:
      i: the leaf index.
      g: the unit's (clipped) gradient.
      p: its stored value.
      st: its unpacked state.
      key: as for ``tx_update``.

    Returns:
      The new stored value (``p`` mid-window) and state.
    """
    layout, k = self.layout, self.options.accumulate_steps
    plan = layout.lowrank[i]
    j = st.mini_step
    opt_state = st.opt_state
    factors = None
    if plan is not None:

      def probe(s):
        _, trial = self.run_tx(i, g, s, self.leaf_value(i, p))
        return with_projectors(s, trial)

      opt_state = jax.lax.cond(j == 0, probe, lambda s: s, opt_state)
      (gs,) = [s for s in layout_lib.galore_states(opt_state)
               if layout.names[i] in s.projectors]
      factors = projection.Projector(
          *(projector_storage.load_factor(f)
            for f in gs.projectors[layout.names[i]]))
      x = (g.make_lowrank(factors) if isinstance(g, Supply) else
           projection.project(g, factors, plan))
    else:
      x = g
    acc = (st.acc + (x - st.acc) / (j + 1)).astype(st.acc.dtype)
    dtype = layout.unit_avals[i].dtype

    def emit(opt_state, acc):
      full = lambda: (acc if plan is None else projection.project_back(
          acc, factors, plan)).astype(dtype)
      # A fused leaf hands the optimizer the accumulated low-rank gradient
      # itself (no back-projection to re-project, except on a refresh).
      mean = Supply(full, lambda _: acc) if isinstance(g, Supply) else full()
      new_p, new_opt = self.tx_update(i, mean, opt_state, p, key)
      return new_p, new_opt, jnp.zeros_like(acc)

    def hold(opt_state, acc):
      return p, opt_state, acc

    new_p, opt_state, acc = jax.lax.cond(j == k - 1, emit, hold, opt_state,
                                         acc)
    mini = (optax.safe_increment(j) % k).astype(jnp.int32)
    return new_p, packing.LeafState(opt_state, acc, mini)

  def update_unit(self, i: int, g: jax.Array, p: Any, st: packing.LeafState,
                  key: Any) -> tuple[Any, packing.LeafState]:
    """Clip, accumulate and update one unit (unpacked state)."""
    if self.options.clip_norm is not None:
      clip = lambda x: clip_leaf(x, self.options.clip_norm)
      # A supplied gradient: its low-rank form is clipped by its own norm.
      g = (gradient_supply.transformed(g, clip) if isinstance(g, Supply)
           else clip(g))
    if self.options.accumulate_steps == 1:
      new_p, opt_state = self.tx_update(i, g, st.opt_state, p, key)
      return new_p, st._replace(opt_state=opt_state)
    return self.accumulate(i, g, p, st, key)

  def update_packed(self, i: int, g: jax.Array, p: Any, packed: Any,
                    key: Any = None) -> tuple[Any, Any]:
    """``update_unit`` on a packed state; integer state waits for ``g``."""
    zero = ordering.zero_after(g.ready if isinstance(g, Supply) else g)
    st = packing.unpack_leaves(packed, self.layout.specs[i], zero)
    new_p, new_st = self.update_unit(i, g, p, st, key)
    return new_p, packing.pack_leaves(new_st)

  def update_leaf(self, i: int, g: Gradient, p: Any, packed: Any,
                  key: Any = None) -> tuple[Any, Any]:
    """A whole leaf's update (per layer slice or row block where stacked).

    Args:
      i: the leaf index.
      g: the leaf's gradient, or a function ``(start, rows) -> rows
        start:start+rows of the gradient`` (``dense``,
        ``embedding_lookup``), so a row-chunked leaf's gradient is made one
        block at a time, or a ``GradientSupply`` (a fused kernel).
      p: the leaf's stored value (of a ``per_layer`` leaf: the whole stack,
        or inside ``scan_layers`` one layer's slice).
      packed: its packed state.
      key: for int8 leaves, the leaf's rounding key (or None); a row block
        passes its first row along with it, so blocks draw the whole leaf's
        rounding bits.

    Returns:
      The new stored value and packed state.
    """
    nk = self.layout.chunks[i]
    unit_shape = self.layout.unit_avals[i].shape
    rows_total = unit_shape[0] * nk if unit_shape else 0
    if self.layout.per_layer[i] and jnp.shape(p) != unit_shape:
      # The whole stack (a scan_layers loss that does not reach it); inside
      # scan_layers' loop a per_layer leaf arrives one layer slice (unit)
      # at a time and takes the path below.
      return jax.vmap(lambda *a: self.update_packed(i, *a))(g, p, packed)
    if nk == 1:
      if callable(g):
        g = g(0, rows_total)
      return self.update_packed(i, g, p, packed,
                                None if key is None else (key, 0))
    return self.update_row_blocks(i, g, p, packed, key, rows_total // nk)

  def update_row_blocks(self, i: int, g: Gradient, p: Any, packed: Any,
                        key: Any, rows: int) -> tuple[Any, Any]:
    """``update_leaf`` of a ``row_chunks`` leaf: a loop over its blocks."""
    nk = self.layout.chunks[i]
    blocks = lambda x: x.reshape(nk, x.shape[0] // nk, *x.shape[1:])
    take = lambda x, c: jax.lax.dynamic_index_in_dim(x, c, 0, keepdims=False)
    put = lambda x, v, c: jax.lax.dynamic_update_index_in_dim(x, v, c, 0)

    def body(c, carry):
      pk, sk = carry
      if callable(g):
        g_c = g(c * rows, rows)
      else:
        # Row block c sliced from the gradient (no reshape of the whole
        # gradient into blocks first): a lower peak on the 60M per-layer
        # step. XLA:CPU still copies a weight gradient it laid out
        # transposed once.
        g_c = jax.lax.dynamic_slice_in_dim(g, c * rows, rows, axis=0)
      new_p, new_s = self.update_packed(
          i, g_c, jax.tree.map(lambda x: take(x, c), pk),
          jax.tree.map(lambda x: take(x, c), sk),
          None if key is None else (key, c * rows))
      return (jax.tree.map(lambda x, v: put(x, v, c), pk, new_p),
              jax.tree.map(lambda x, v: put(x, v, c), sk, new_s))

    pk, packed = jax.lax.fori_loop(0, nk, body,
                                   (jax.tree.map(blocks, p), packed))
    return jax.tree.map(lambda x, y: x.reshape(y.shape), pk, p), packed
