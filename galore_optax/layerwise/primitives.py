"""The layer-aware calls a loss function makes: plain JAX outside a step.

``call_layer``, ``dense``, ``embedding_lookup`` and ``scan_layers`` compute
what their names say. Inside a step from ``make_layerwise_step`` (while its
``context.LayerwiseContext`` is active) they ask the context whether their
arguments are the step's leaves and, if so, run as ``jax.custom_vjp``
functions whose backward rules (the context's methods, ``scan.backward``)
update those leaves inside the backward pass. ``hook`` is the identity on
one leaf that every other use of a leaf goes through.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from galore_optax import ordering
from galore_optax.layerwise import context as context_lib
from galore_optax.layerwise import scan
from galore_optax.layerwise import trees

Context = context_lib.LayerwiseContext
LayerCall = context_lib.LayerCall

# The name of every ``dense`` product's output (``jax.ad_checkpoint.
# checkpoint_name``), for checkpoint policies that keep the products.
DENSE_OUTPUT = "galore_optax.layerwise.dense"
# The checkpoint policy that keeps exactly those outputs
# (``make_layerwise_step(recompute=KEEP_DENSE_OUTPUTS)``).
KEEP_DENSE_OUTPUTS = jax.checkpoint_policies.save_only_these_names(
    DENSE_OUTPUT)

# -- public primitives ---------------------------------------------------------


def scan_layers(f: Callable[..., Any], carry: Any, layers: Any,
                *args: Any) -> Any:
  """Applies ``f(carry, layer, *args)`` to each slice of a stacked layer tree.

  ``layers`` is a tree whose arrays share a leading layer axis ``L``; the
  result is ``f(...f(f(carry, layers[0]), layers[1])..., layers[L-1])``
  (each call also given ``args``).

  Outside a layer-wise step (or for leaves not named in ``per_layer``) this
  is ``jax.lax.scan``. Inside a step from ``make_layerwise_step`` whose
  ``per_layer`` names these leaves, the backward pass is a reverse loop over
  the layers that recomputes layer ``l`` from its saved input and runs
  ``call_layer``'s backward pass on it: layer ``l``'s slices of the
  parameters and optimizer states are updated in place (a kernel that ``f``
  multiplies through ``dense`` inside its product's backward rule), so only
  one layer's gradients exist at a time. Pass the layer's other traced
  inputs (rotary tables, masks) as ``args``: ``f`` may close over traced
  arrays (their gradients are accumulated over the layers as usual), but
  then ``dense`` inside it is a plain product, as in ``call_layer``.

  Args:
    f: ``(carry, layer, *args) -> carry``, carry structure and shapes
      preserved.
    carry: the initial carry (e.g. the hidden states).
    layers: the stacked layer parameters (e.g. ``nnx.state`` of a stacked
      module or a dict of arrays with a leading layer axis).
    *args: other inputs of every layer (arrays or trees of arrays).

  Returns:
    The final carry.
  """
  leaves, ldef = jax.tree.flatten(layers)
  ctx = context_lib.current()
  if ctx is None or all(ctx.per_layer_index(x) is None for x in leaves):
    out, _ = jax.lax.scan(lambda c, p: (f(c, p, *args), None), carry, layers)
    return out
  return scan.scan_layerwise(ctx, f, carry, leaves, ldef, args)


def call_layer(f: Callable[..., Any], carry: Any, params: Any, *args: Any,
               remat: bool = False) -> Any:
  """Applies one (unrolled) layer, ``f(carry, params, *args)``.

  Outside a layer-wise step this is ``f(carry, params, *args)`` (under
  ``jax.checkpoint`` if ``remat``). Inside a step from
  ``make_layerwise_step`` the layer is recomputed in the backward pass
  (activation checkpointing; unless the step has ``recompute=False``, which
  keeps the forward pass's residuals instead, or a checkpoint policy, which
  keeps what it saves), when its output gradient
  arrives, and its weights are updated inside that backward pass in an order
  that lets XLA reuse memory:

  * a kernel that ``f`` multiplies through ``dense`` is updated inside that
    product's backward rule, one weight at a time: its gradient is made,
    consumed by its update and freed before the layer's backward pass goes
    on to the products below (only the inputs of the layer are saved);
  * every other weight of ``params`` gets its gradient at the end of the
    layer's backward pass, with the update ordered after the layer's input
    gradient (``dx = dy W^T`` reads the old ``W``; without that order
    XLA:CPU keeps a copy of every donated weight for the whole step). The
    order comes from ``galore_optax.ordering.after``, exact for any
    ``dx``.

  The step's leaves in ``params`` must not be used anywhere else in the loss
  (the step raises at trace time if one is). Pass the layer's other traced
  inputs (rotary tables, masks) as ``args`` rather than closing over them:
  ``f`` may close over traced arrays (they are hoisted with
  ``jax.closure_convert``), but then ``dense`` inside it is a plain product
  and the layer's kernels are updated at the end of its backward pass.

  Args:
    f: ``(carry, params, *args) -> carry``.
    carry: the layer input (e.g. hidden states).
    params: the layer's parameters (a tree of the step's parameter leaves,
      e.g. ``nnx.split(layer)[1]``).
    *args: other inputs of the layer (arrays or trees of arrays).
    remat: outside a step, checkpoint ``f`` (inside one, the step's
      ``recompute`` decides).

  Returns:
    ``f(carry, params, *args)``.
  """
  ctx = context_lib.current()
  if ctx is None or ctx.inside_layer:
    # Inside another layer's recomputation the outer layer already orders
    # the updates; run the plain function.
    fn = jax.checkpoint(f) if remat and ctx is None else f
    return fn(carry, params, *args)
  p_leaves, treedef = jax.tree.flatten(params)
  ids = [ctx.hooked_index(x) for x in p_leaves]
  if all(i is None for i in ids):
    f_conv, consts = jax.closure_convert(f, carry, params, *args)
    return _ordered_layer(f_conv, carry, params, *args, *consts)
  hooked = tuple(i is not None for i in ids)
  leaf_ids = tuple(i for i in ids if i is not None)
  h_inputs = [ctx.take(i) for i in leaf_ids]
  f_conv, consts = jax.closure_convert(f, carry, params, *args)
  # ``f`` itself (not its traced copy) must run for ``dense`` to find the
  # layer's weights; it can when it closes over no traced value.
  call = context_lib.LayerCall(f_conv if consts else f, treedef, hooked,
                               leaf_ids)
  others = trees.select(p_leaves, [not h for h in hooked])
  return _layer_update(ctx, call, carry, others, h_inputs, [*args, *consts])


def embedding_lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
  """Rows ``table[ids]`` (``jnp.take(table, ids, axis=0)``).

  Outside a layer-wise step this is ``jnp.take``. Inside one, the gradient
  (a scatter-add into a zero table) creates its zero table only when the
  output's gradient exists: the zero table of ``jnp.take``'s gradient is a
  constant, which XLA may allocate at the start of the step and keep live
  through the whole backward pass (a full table of extra memory at peak).
  An int8 or ``row_chunks`` table of the step reads only the looked-up rows
  (an int8 table's dequantised) and its gradient is scattered one row block
  at a time inside its update.

  Args:
    table: ``(num_rows, ...)`` embedding table (a parameter leaf).
    ids: integer indices of any shape.

  Returns:
    ``table[ids]``, of shape ``ids.shape + table.shape[1:]``.
  """
  ctx = context_lib.current()
  if ctx is None:
    return jnp.take(table, ids, axis=0)
  i = ctx.lookup_target(table)
  if i is not None:
    return _lookup_update(ctx, i, *ctx.take(i), ids)
  return _late_take((tuple(table.shape), jnp.dtype(table.dtype)), table, ids)


def dense(x: jax.Array, kernel: jax.Array, *,
          dtype: Any = None) -> jax.Array:
  """``x @ kernel`` (contracting ``x``'s last axis with the kernel's first).

  Outside a layer-wise step this is the product (what ``nnx.Linear``
  without bias computes, both operands cast to ``dtype`` if given). Inside
  one, when ``kernel`` is a parameter leaf of the step (or, inside
  ``call_layer``, one of the layer's weights), its backward pass updates
  the kernel itself: the input gradient is computed from the old kernel,
  then the kernel's gradient ``x^T dy`` is made inside the update (one row
  block at a time for a ``row_chunks`` leaf, so a large output layer's full
  gradient, LLaMA-7B's head: 500 MiB in float32, never exists), and what
  follows in the backward pass waits for the update. An int8 kernel is
  dequantised inside the product. The kernel must not be used anywhere
  else in the loss (a tied embedding, say): the step raises at trace time
  if it is.

  The output is named ``DENSE_OUTPUT`` for ``jax.checkpoint`` policies:
  ``KEEP_DENSE_OUTPUTS`` (``jax.checkpoint_policies.save_only_these_names(
  DENSE_OUTPUT)``) keeps the products and recomputes the rest (``make_layerwise_step(recompute=...)``,
  or any ``jax.checkpoint``).

  Args:
    x: ``(..., d_in)`` inputs.
    kernel: ``(d_in, d_out)`` weight (a parameter leaf).
    dtype: computation dtype of the product, or None (operands as they are).

  Returns:
    ``(..., d_out)``.
  """
  if kernel.ndim != 2:
    raise ValueError(f"dense needs a 2-D kernel, got shape {kernel.shape}.")
  ctx = context_lib.current()
  target = None if ctx is None else ctx.dense_target(kernel)
  if target is not None:
    i, (stored, packed, key_data) = target
    y = _dense_update(ctx, i, dtype, x, stored, packed, key_data)
  else:
    y = context_lib.matmul(x, kernel, dtype)
  return checkpoint_name(y, DENSE_OUTPUT)


# -- a leaf's hook -------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def hook(ctx: Context, i: int, stored: Any, packed: Any,
         key_data: Any) -> Any:
  """Identity on leaf ``i`` (an int8 leaf comes out dequantised); its
  backward rule updates the leaf with the gradient it receives.

  Args:
    ctx: the step's context.
    i: the leaf index.
    stored: the leaf's stored value (an int8 leaf as a carrier).
    packed: its packed state.
    key_data: its rounding key data, or None.

  Returns:
    The leaf's value; the cotangents of ``(stored, packed, key_data)`` are
    the new stored value, the new packed state and ``float0``.
  """
  del packed, key_data
  return ctx.values([i], [stored])[0]


def _hook_fwd(ctx: Context, i: int, stored: Any, packed: Any,
              key_data: Any) -> tuple[Any, tuple[Any, ...]]:
  return hook(ctx, i, stored, packed, key_data), (stored, packed, key_data)


def _hook_bwd(ctx: Context, i: int, res: tuple[Any, ...],
              g: jax.Array) -> tuple[Any, ...]:
  return ctx.hook_backward(i, res, g)


hook.defvjp(_hook_fwd, _hook_bwd)

# -- call_layer ----------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ordered_layer(f: Callable[..., Any], carry: Any, params: Any,
                   *consts: Any) -> Any:
  """A layer without step leaves, recomputed when its gradient arrives."""
  return f(carry, params, *consts)


def _ordered_layer_fwd(f: Callable[..., Any], carry: Any, params: Any,
                       *consts: Any) -> tuple[Any, tuple[Any, ...]]:
  return f(carry, params, *consts), (carry, params, consts)


def _ordered_layer_bwd(f: Callable[..., Any], res: tuple[Any, ...],
                       ct: Any) -> tuple[Any, ...]:
  carry, params, consts = res
  # The recomputation starts from an input that waits for the output
  # cotangent: XLA would otherwise schedule every layer's recomputation
  # early (as soon as its saved input exists) and keep all of them live.
  carry = ordering.after(carry, ct)
  _, vjp = jax.vjp(f, carry, params, *consts)
  ct_carry, ct_params, *ct_consts = vjp(ct)
  ct_params = ordering.after(ct_params, ct_carry)
  return (ct_carry, ct_params, *ct_consts)


_ordered_layer.defvjp(_ordered_layer_fwd, _ordered_layer_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _layer_update(ctx: Context, call: LayerCall,
                  c: Any, others: list[Any], h_in: list[Any],
                  cs: list[Any]) -> Any:
  """A layer with step leaves (``context.LayerwiseContext.layer_*``)."""
  return ctx.layer_forward(call, c, others, h_in, cs)


def _layer_update_fwd(ctx: Context, call: LayerCall,
                      c: Any, others: list[Any], h_in: list[Any],
                      cs: list[Any]) -> tuple[Any, tuple[Any, ...]]:
  ctx.check_layer(call, c, others, h_in, cs)
  if not ctx.recompute:
    return ctx.layer_forward_saved(call, c, others, h_in, cs)
  return _layer_update(ctx, call, c, others, h_in, cs), (c, others, h_in, cs)


def _layer_update_bwd(ctx: Context, call: LayerCall,
                      res: tuple[Any, ...], ct: Any) -> tuple[Any, ...]:
  if not ctx.recompute:
    return ctx.layer_backward_saved(call, res, ct)
  return ctx.layer_backward(call, res, ct)


_layer_update.defvjp(_layer_update_fwd, _layer_update_bwd)

# -- dense ---------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _dense_update(ctx: Context, i: int, dtype: Any, x: jax.Array,
                  stored: Any, packed: Any, key_data: Any) -> jax.Array:
  """``x @ kernel`` whose backward rule updates the kernel (leaf ``i``)."""
  del packed, key_data
  return ctx.dense_forward(i, dtype, x, stored)


def _dense_update_fwd(ctx: Context, i: int, dtype: Any,
                      x: jax.Array, stored: Any, packed: Any,
                      key_data: Any) -> tuple[jax.Array, tuple[Any, ...]]:
  return (_dense_update(ctx, i, dtype, x, stored, packed, key_data),
          (x, stored, packed, key_data))


def _dense_update_bwd(ctx: Context, i: int, dtype: Any,
                      res: tuple[Any, ...], dy: jax.Array) -> tuple[Any, ...]:
  return ctx.dense_backward(i, dtype, res, dy)


_dense_update.defvjp(_dense_update_fwd, _dense_update_bwd)

# -- embedding_lookup ----------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _lookup_update(ctx: Context, i: int, stored: Any, packed: Any,
                   key_data: Any, ids: jax.Array) -> jax.Array:
  """``table[ids]`` of an int8 or row-chunked table (leaf ``i``), updated
  by its backward rule."""
  del packed, key_data
  return ctx.lookup_forward(i, stored, ids)


def _lookup_update_fwd(ctx: Context, i: int, stored: Any,
                       packed: Any, key_data: Any, ids: jax.Array
                       ) -> tuple[jax.Array, tuple[Any, ...]]:
  return (_lookup_update(ctx, i, stored, packed, key_data, ids),
          (stored, packed, key_data, ids))


def _lookup_update_bwd(ctx: Context, i: int, res: tuple[Any, ...],
                       ct: jax.Array) -> tuple[Any, ...]:
  return ctx.lookup_backward(i, res, ct)


_lookup_update.defvjp(_lookup_update_fwd, _lookup_update_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _late_take(shape_dtype: tuple[tuple[int, ...], Any], table: jax.Array,
               ids: jax.Array) -> jax.Array:
  """``jnp.take`` whose gradient's zero table waits for the gradient."""
  del shape_dtype
  return jnp.take(table, ids, axis=0)


def _late_take_fwd(shape_dtype: tuple[tuple[int, ...], Any],
                   table: jax.Array,
                   ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  del shape_dtype
  return jnp.take(table, ids, axis=0), ids


def _late_take_bwd(shape_dtype: tuple[tuple[int, ...], Any], ids: jax.Array,
                   ct: jax.Array) -> tuple[jax.Array, Any]:
  shape, dtype = shape_dtype
  zeros = ordering.after(jnp.zeros(shape, dtype), ct)
  return zeros.at[ids].add(ct.astype(dtype)), trees.float0_like(ids)


_late_take.defvjp(_late_take_fwd, _late_take_bwd)
