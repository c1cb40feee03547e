"""Per-layer (layer-wise) updates: each gradient is consumed in the backward pass.

``galore_torch``'s per-layer mode steps one optimizer per parameter from a
post-accumulate-grad hook, so a parameter's gradient is freed right after its
update and the full gradient never exists at once; that is how GaLore trains
LLaMA-7B in 22 GB. ``make_layerwise_step`` is the JAX equivalent: from a loss
function and any optax transformation it builds one jit-compiled train step

    params, opt_state, loss = step(params, opt_state, batch)

in which every parameter leaf passes through an identity ``jax.custom_vjp``
"hook". The hook's backward rule receives the leaf's gradient, runs the
optimizer for that leaf alone and returns, as cotangents, the *new* parameter
and the *new* optimizer state of the leaf, so ``jax.grad`` of the hooked loss
with respect to ``(params, opt_state)`` is the updated ``(params,
opt_state)``. Each gradient is consumed as soon as the backward pass has made
it; XLA is free to reuse its memory for the rest of the backward pass, and
with ``donate=True`` the new parameters and states are written into the
buffers of the old ones.

State. Every leaf (or, for ``per_layer`` leaves, every layer slice of a leaf)
has its own optimizer state, ``tx.init`` of a tree in which all other leaves
are ``optax.MaskedNode()``; the tree keeps its structure so name-based labels
(``optax.partition``, ``galore_labels``) see the real paths. Cotangents must
be floating point, so each leaf's state is stored *packed*: floating leaves
as they are, 32-bit integers bit-cast to float32, 16-bit ones to float16,
8-bit codes (8-bit moments and projectors) four to a float32 along the last
axis. Packing is a bit-cast, never arithmetic, so every bit pattern survives
(NaN payloads included; tested). ``LayerwiseStep.unpack_state`` gives the
ordinary optax states back.

What the step supports:

* ordinary (unrolled) models: each leaf is updated as soon as its gradient is
  complete (a leaf used several times is updated once, with the sum). Run
  each layer through ``call_layer(f, carry, layer_params, *args)`` (the
  plain call outside a layer-wise step) and its products through
  ``dense(x, kernel)``: the layer is recomputed when its output gradient
  arrives, and each kernel is updated inside its product's backward rule,
  after the input gradient that reads it and before the next product's
  weight gradient is made, so a layer's weight gradients exist one at a
  time. Without ``call_layer`` XLA (checked on CPU) keeps a copy of every
  donated weight for the whole step. Likewise ``embedding_lookup(table,
  ids)`` for embeddings, whose gradient is created only when it arrives
  (one row block at a time for a ``row_chunks`` or int8 table);
* int8 weights: ``weight_quantization.QuantizedWeight`` leaves of
  ``params`` are dequantised to ``weight_dtype`` for the model and the
  optimizer, and each is rounded back inside the backward pass
  (``weight_quantization.apply_update``; stochastic with
  ``fold_in(key, i)`` for the i-th int8 leaf when the step gets ``key``,
  as ``weight_quantization.apply_updates``). Inside ``call_layer`` the
  layer dequantises them itself (forward and recomputation), so no
  dequantised weight is kept from the forward to the backward pass;
  ``embedding_lookup`` dequantises only the looked-up rows and ``dense``
  the kernel inside the product. int8 leaves cannot be ``per_layer``;
* ``dense(x, kernel)``: the kernel's gradient ``x^T dy`` is made inside the
  kernel's update, one row block at a time for a ``row_chunks`` leaf (a
  large head never has its whole gradient in memory);
* scanned layer stacks as written (``nnx.scan``/``lax.scan`` over stacked
  weights): correct, the stacked leaf is hooked as a whole, so its gradient is
  the full stacked gradient before its update (no per-layer memory saving for
  that leaf);
* scanned layer stacks with per-layer memory: name the stacked leaves in
  ``per_layer`` and run the stack with ``scan_layers(f, carry, layers)`` in
  the loss instead of ``lax.scan``; the layer gradients are then consumed
  one layer at a time inside the reverse loop, whose parameters and states
  are updated in place. ``scan_layers`` recomputes each layer's forward pass
  in the backward loop (activation checkpointing per layer). Outside a
  layer-wise step ``scan_layers`` is a plain ``lax.scan``.
* any optax transformation whose update of a leaf depends only on that leaf
  (``optax.adamw``, ``adamw_8bit``, ``galore_adamw``, ``galore_adamw_8bit``,
  ``galore_adafactor``, LAMB's per-leaf trust ratio, ...). A transformation
  that couples leaves (e.g. ``optax.clip_by_global_norm`` inside ``tx``) is
  computed per leaf, which changes its meaning. ``galore_project``'s
  ``stagger_refresh`` and the randomized projector's keys depend on a leaf's
  position among all projected leaves, which a per-leaf state does not know:
  every leaf refreshes in the same step (as without staggering) and the
  randomized method draws the keys of the first leaf; exact-SVD results are
  unaffected.
* sharded parameters: the step is ordinary jitted JAX; shardings propagate as
  in a normal step (the packing keeps every axis but the last).

Clipping (``clip_norm``): a global norm cannot be known before the backward
pass ends, so each *leaf's* gradient (each layer slice's for ``per_layer``
leaves) is clipped on its own: ``g <- g * min(1, clip_norm / ||g||_2)`` with
``||g||_2`` the Frobenius norm of that leaf's full gradient from the current
micro-batch, before accumulation and projection. It equals
``optax.chain(clip_by_leaf_norm(clip_norm), tx)`` in an ordinary step.

Gradient accumulation (``accumulate_steps=k``): each call is one micro-batch;
parameters change on every k-th call. Leaves that ``galore_project`` projects
accumulate the *projected* gradient (low-rank shape), the others the full
gradient, as a running mean in ``accumulate_dtype`` (float32, as
``optax.MultiSteps``). On a window that starts with a projector refresh, the
refresh is run on the first micro-batch's gradient (by the optimizer itself,
so method and storage are the optimizer's), every micro-batch of the window
is projected with that new projector, and the optimizer's own refresh at the
end of the window sees the accumulated gradient, which lies in that subspace
(so it returns the same subspace, rotated to the accumulated gradient's
singular vectors). Without refreshes this equals ``optax.MultiSteps(tx, k)``
to float32 rounding; with refreshes MultiSteps uses the window's mean
gradient for the SVD, which only exists at full size.

Requirements and limits: parameters must be floating point; the loss must
be a scalar; a ``per_layer`` leaf must reach the loss only through one
``scan_layers`` call; leaves the loss does not use are updated with a zero
gradient (as optax would). The per-leaf hooks trace ``tx.update`` once per
leaf, so tracing time grows with the number of leaves.

References:
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
  Projection", ICML 2024, arXiv 2403.03507 (per-layer weight updates).
  Lv et al., "Full Parameter Fine-tuning for Large Language Models with
  Limited Resources" (LOMO), 2023, arXiv 2306.09782 (fused update in the
  backward pass).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Union

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax

from galore_optax import ordering
from galore_optax import projection
from galore_optax import projector_storage
from galore_optax import quantization
from galore_optax import targets
from galore_optax import weight_quantization
from galore_optax._checks import check_positive_int
from galore_optax.transform import GaLoreState

__all__ = (
    "LayerwiseState",
    "LayerwiseStep",
    "LeafState",
    "call_layer",
    "clip_by_leaf_norm",
    "dense",
    "embedding_lookup",
    "make_layerwise_step",
    "pack_state",
    "scan_layers",
    "unpack_state",
)

PerLayerSpec = Union[None, str, Sequence[str], Callable[[str], bool]]


# ---------------------------------------------------------------------------
# State containers
# ---------------------------------------------------------------------------


class LeafState(NamedTuple):
  """Unpacked state of one leaf (or one layer slice of a ``per_layer`` leaf).

  Attributes:
    opt_state: ``tx``'s state for a tree holding only this leaf.
    acc: the gradient accumulator (projected shape for GaLore-projected
      leaves), or ``optax.MaskedNode()`` without accumulation.
    mini_step: micro-steps accumulated so far (int32), or
      ``optax.MaskedNode()`` without accumulation.
  """

  opt_state: optax.OptState
  acc: Any
  mini_step: Any


class LayerwiseState(NamedTuple):
  """Optimizer state of a layer-wise step.

  Attributes:
    leaves: a dict from each parameter leaf's dotted name (see
      ``galore_optax.path_to_name``) to its packed ``LeafState`` (every
      array floating point; ``per_layer`` leaves carry a leading layer axis
      on every array). Use ``LayerwiseStep.unpack_state`` to read it.
  """

  leaves: dict[str, Any]


# ---------------------------------------------------------------------------
# Packing: any state leaf <-> floating-point arrays, by bit-casts only
# ---------------------------------------------------------------------------


def _is_float(x: Any) -> bool:
  return jnp.issubdtype(x.dtype, jnp.inexact)


def _pack_array(x: jax.Array) -> jax.Array:
  """One state array -> a floating array holding the same bits."""
  x = jnp.asarray(x)
  dtype = x.dtype
  if jnp.issubdtype(dtype, jnp.inexact):
    return x
  if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
    raise TypeError(
        f"Optimizer state leaves of dtype {dtype} (e.g. typed PRNG keys) "
        "cannot be packed; store jax.random.key_data(key) instead.")
  if dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  bits = x.dtype.itemsize * 8
  if bits == 32:
    return jax.lax.bitcast_convert_type(x, jnp.float32)
  if bits == 16:
    return jax.lax.bitcast_convert_type(x, jnp.float16)
  if bits == 64:  # (..., ) -> (..., 2) float32
    return jax.lax.bitcast_convert_type(x, jnp.float32)
  if bits == 8:  # four codes per float32, along the last axis
    if x.ndim == 0:
      x = x[None]
    pad = (-x.shape[-1]) % 4
    if pad:
      x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    x = x.reshape(*x.shape[:-1], x.shape[-1] // 4, 4)
    return jax.lax.bitcast_convert_type(x, jnp.float32)
  raise TypeError(f"Cannot pack optimizer state of dtype {dtype}.")


def _unpack_array(y: jax.Array, spec: Any,
                  zero: jax.Array | None = None) -> jax.Array:
  """Inverse of ``_pack_array`` given the original shape and dtype.

  ``zero``: an ``ordering.zero_after`` scalar; an integer array is then
  unpacked only once it is computed (XLA:CPU materialises the bit-cast of
  8-bit codes, and would otherwise do it for every leaf at the start of the
  step and keep them).
  """
  dtype = jnp.dtype(spec.dtype)
  if jnp.issubdtype(dtype, jnp.inexact):
    return y
  storage = jnp.dtype(jnp.uint8) if dtype == jnp.bool_ else dtype
  bits = storage.itemsize * 8
  if bits in (16, 32, 64):
    x = jax.lax.bitcast_convert_type(y, storage)
  else:
    x = jax.lax.bitcast_convert_type(y, storage)  # (..., n4, 4)
    x = x.reshape(*x.shape[:-2], x.shape[-2] * 4)
    n = spec.shape[-1] if spec.shape else 1
    x = x[..., :n].reshape(spec.shape)
  if zero is not None:
    x = x + zero.astype(storage)  # an integer zero: exact
  if dtype == jnp.bool_:
    return x != 0
  return x


def pack_state(state: Any) -> Any:
  """Packs every array of a state tree into floating point (bit-casts only).

  Args:
    state: any pytree of arrays (no leading batch axis: pack per slice with
      ``jax.vmap`` otherwise, because 8-bit arrays are packed along their
      last axis).

  Returns:
    The same tree with floating-point leaves.
  """
  return jax.tree.map(_pack_array, state)


def unpack_state(packed: Any, spec: Any) -> Any:
  """Inverse of ``pack_state``.

  Args:
    packed: a tree from ``pack_state``.
    spec: the unpacked tree's shapes and dtypes (e.g. from
      ``jax.eval_shape``), same structure.

  Returns:
    The original tree, bit for bit.
  """
  return jax.tree.map(_unpack_array, packed, spec)


# ---------------------------------------------------------------------------
# Clipping
# ---------------------------------------------------------------------------


def _clip_leaf(g: jax.Array, max_norm: float) -> jax.Array:
  """``optax.clip_by_global_norm(max_norm)`` applied to a single array."""
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
    return jax.tree.map(lambda g: _clip_leaf(g, max_norm), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


# ---------------------------------------------------------------------------
# scan_layers and its trace-time context
# ---------------------------------------------------------------------------

_ACTIVE = threading.local()


@contextlib.contextmanager
def _activate(ctx):
  stack = getattr(_ACTIVE, "stack", None)
  if stack is None:
    stack = _ACTIVE.stack = []
  stack.append(ctx)
  try:
    yield ctx
  finally:
    stack.pop()


def _current():
  stack = getattr(_ACTIVE, "stack", None)
  return stack[-1] if stack else None


def scan_layers(f: Callable[[Any, Any], Any], carry: Any, layers: Any) -> Any:
  """Applies ``f(carry, layer)`` to each slice of a stacked layer tree.

  ``layers`` is a tree whose arrays share a leading layer axis ``L``; the
  result is ``f(...f(f(carry, layers[0]), layers[1])..., layers[L-1])``.

  Outside a layer-wise step (or for leaves not named in ``per_layer``) this
  is ``jax.lax.scan``. Inside a step from ``make_layerwise_step`` whose
  ``per_layer`` names these leaves, the backward pass is a reverse loop over
  the layers that recomputes layer ``l`` from its saved input, takes its
  gradient and immediately updates layer ``l``'s slices of the parameters
  and optimizer states in place, so only one layer's gradient exists at a
  time. ``f`` may close over other arrays (rotary tables, masks, shared
  weights); their gradients are accumulated over the layers as usual.

  Args:
    f: ``(carry, layer) -> carry``, carry structure and shapes preserved.
    carry: the initial carry (e.g. the hidden states).
    layers: the stacked layer parameters (e.g. ``nnx.state`` of a stacked
      module or a dict of arrays with a leading layer axis).

  Returns:
    The final carry.
  """
  leaves, ldef = jax.tree.flatten(layers)
  ctx = _current()
  if ctx is None or all(ctx.per_layer_index(x) is None for x in leaves):
    out, _ = jax.lax.scan(lambda c, p: (f(c, p), None), carry, layers)
    return out
  return ctx.scan(f, carry, leaves, ldef)


def call_layer(f: Callable[..., Any], carry: Any, params: Any, *args: Any,
               remat: bool = False) -> Any:
  """Applies one (unrolled) layer, ``f(carry, params, *args)``.

  Outside a layer-wise step this is ``f(carry, params, *args)`` (under
  ``jax.checkpoint`` if ``remat``). Inside a step from
  ``make_layerwise_step`` the layer is always recomputed in the backward
  pass (activation checkpointing), when its output gradient arrives, and
  its weights are updated inside that backward pass in an order that lets
  XLA reuse memory:

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
    remat: outside a step, checkpoint ``f`` (inside one it is always
      recomputed).

  Returns:
    ``f(carry, params, *args)``.
  """
  ctx = _current()
  if ctx is None or ctx.inside_layer:
    # Inside another layer's recomputation the outer layer already orders
    # the updates; run the plain function.
    fn = jax.checkpoint(f) if remat and ctx is None else f
    return fn(carry, params, *args)
  if any(ctx.hooked_index(x) is not None for x in jax.tree.leaves(params)):
    return ctx.call_layer(f, carry, params, args)
  f_conv, consts = jax.closure_convert(f, carry, params, *args)
  return _ordered_layer(f_conv, carry, params, *args, *consts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ordered_layer(f, carry, params, *consts):
  return f(carry, params, *consts)


def _ordered_layer_fwd(f, carry, params, *consts):
  return f(carry, params, *consts), (carry, params, consts)


def _trace_state() -> Any:
  """A comparable token of the trace now running (``jax.extend.core``)."""
  get = getattr(jax.extend.core, "get_opaque_trace_state", None)
  if get is None:  # jax < 0.10 has it in jax.core only
    get = jax.core.get_opaque_trace_state
  return get(convention="galore_optax")


def _ordered_layer_bwd(f, res, ct):
  carry, params, consts = res
  # The recomputation starts from an input tied to the output cotangent: XLA
  # would otherwise schedule every layer's recomputation early (as soon as
  # its saved input exists) and keep all of them live at once.
  carry = ordering.after(carry, ct)
  _, vjp = jax.vjp(f, carry, params, *consts)
  ct_carry, ct_params, *ct_consts = vjp(ct)
  ct_params = ordering.after(ct_params, ct_carry)
  return (ct_carry, ct_params, *ct_consts)


_ordered_layer.defvjp(_ordered_layer_fwd, _ordered_layer_bwd)


def embedding_lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
  """Rows ``table[ids]`` (``jnp.take(table, ids, axis=0)``).

  Outside a layer-wise step this is ``jnp.take``. Inside one, the gradient
  (a scatter-add into a zero table) creates its zero table only when the
  output's gradient exists: the zero table of ``jnp.take``'s gradient is a
  constant, which XLA may allocate at the start of the step and keep live
  through the whole backward pass (a full table of extra memory at peak).

  Args:
    table: ``(num_rows, ...)`` embedding table (a parameter leaf).
    ids: integer indices of any shape.

  Returns:
    ``table[ids]``, of shape ``ids.shape + table.shape[1:]``.
  """
  ctx = _current()
  if ctx is None:
    return jnp.take(table, ids, axis=0)
  out = ctx.embedding_lookup(table, ids)
  if out is not None:
    return out
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

  Args:
    x: ``(..., d_in)`` inputs.
    kernel: ``(d_in, d_out)`` weight (a parameter leaf).
    dtype: computation dtype of the product, or None (operands as they are).

  Returns:
    ``(..., d_out)``.
  """
  if kernel.ndim != 2:
    raise ValueError(f"dense needs a 2-D kernel, got shape {kernel.shape}.")
  ctx = _current()
  if ctx is not None:
    out = ctx.dense(x, kernel, dtype)
    if out is not None:
      return out
  return _matmul(x, kernel, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _late_take(shape_dtype, table, ids):
  del shape_dtype
  return jnp.take(table, ids, axis=0)


def _late_take_fwd(shape_dtype, table, ids):
  del shape_dtype
  return jnp.take(table, ids, axis=0), ids


def _late_take_bwd(shape_dtype, ids, ct):
  shape, dtype = shape_dtype
  zeros = ordering.after(jnp.zeros(shape, dtype), ct)
  return zeros.at[ids].add(ct.astype(dtype)), _float0_like(ids)


_late_take.defvjp(_late_take_fwd, _late_take_bwd)


def _float0_like(x: Any) -> np.ndarray:
  return np.zeros(np.shape(x), dtype=jax.dtypes.float0)


def _split(xs: list, mask: list[bool]) -> list:
  return [x for x, m in zip(xs, mask) if m]


def _merge(xs: list, mask: list[bool], new: list) -> list:
  it = iter(new)
  return [next(it) if m else x for x, m in zip(xs, mask)]


def _interleave(mask: Sequence[bool], yes: Sequence[Any],
                no: Sequence[Any]) -> list:
  """Items of ``yes`` where ``mask`` is true and of ``no`` elsewhere."""
  it_yes, it_no = iter(yes), iter(no)
  return [next(it_yes) if m else next(it_no) for m in mask]


def _float0_tree(tree: Any) -> Any:
  return jax.tree.map(_float0_like, tree)


# int8 codes travel through the backward pass (as cotangents, which must be
# floating point) bit-cast to float8: same width, so XLA emits no copy.
_CARRIER_DTYPE = jnp.float8_e4m3fn

# int8 leaves are re-quantised this many values at a time (same bits as at
# once): the float32 intermediates and rounding noise of a LLaMA-7B MLP
# weight (45M values) are otherwise several 172 MiB buffers.
_ROUND_BLOCK_ELEMENTS = 1 << 22


def _to_carrier(q: weight_quantization.QuantizedWeight) -> Any:
  return q._replace(codes=jax.lax.bitcast_convert_type(q.codes,
                                                       _CARRIER_DTYPE))


def _from_carrier(q: Any) -> weight_quantization.QuantizedWeight:
  return q._replace(codes=jax.lax.bitcast_convert_type(q.codes, jnp.int8))


def _matmul(x: jax.Array, kernel: jax.Array, dtype: Any) -> jax.Array:
  """``x @ kernel`` over x's last axis, both cast to ``dtype`` (default:
  their promoted dtype), as ``nnx.Linear`` computes it."""
  if dtype is None:
    dtype = jnp.result_type(x, kernel)
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


# ---------------------------------------------------------------------------
# Static layout of a parameter tree
# ---------------------------------------------------------------------------


def _find_galore_states(opt_state: Any) -> list[GaLoreState]:
  is_galore = lambda x: isinstance(x, GaLoreState)
  return [x for x in jax.tree.leaves(opt_state, is_leaf=is_galore)
          if is_galore(x)]


def _with_projectors(old: Any, new: Any) -> Any:
  """``old`` with every GaLoreState's projectors taken from ``new``."""
  is_galore = lambda x: isinstance(x, GaLoreState)
  return jax.tree.map(
      lambda a, b: a._replace(projectors=b.projectors) if is_galore(a) else a,
      old, new, is_leaf=is_galore)


@dataclasses.dataclass
class _Layout:
  """Static facts about one parameter tree (shapes, names, per-leaf specs)."""

  treedef: Any
  names: list[str]
  per_layer: list[bool]
  chunks: list[int]  # row chunks of each leaf (1: updated whole)
  unit_avals: list[jax.ShapeDtypeStruct]  # a leaf, a layer slice or a chunk
  anchor: list[Any]  # per leaf: None or (index, ShapeDtypeStruct)
  specs: list[Any]  # abstract unpacked LeafState per unit
  lowrank: list[Any]  # projection.LeafPlan for low-rank accumulation, or None
  quantized: list[bool]  # stored as a weight_quantization.QuantizedWeight
  qindex: list[Any]  # position among the quantised leaves (their key), or None


# ---------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerwiseStep:
  """What ``make_layerwise_step`` returns; unpacks as ``(init, step)``.

  Attributes:
    init: ``params -> LayerwiseState`` (eager; wrap it in ``jax.jit`` with
      ``out_shardings`` to place sharded states).
    step: ``(params, opt_state, batch, key=None) -> (params, opt_state,
      loss)``, or ``(params, opt_state, loss, aux)`` with ``has_aux``;
      jit-compiled with ``params`` and ``opt_state`` donated unless asked
      otherwise. ``key`` (a PRNG key, e.g. ``fold_in(base, step)``) is the
      stochastic-rounding key of int8 leaves; without it they round to
      nearest. Float-only parameters ignore it.
    unpack_state: ``(opt_state, params) -> {name: LeafState}``, the ordinary
      (unpacked) optax states, e.g. to read counts or save checkpoints in
      optax form; ``params`` may be abstract.
  """

  init: Callable[[Any], LayerwiseState]
  step: Callable[..., Any]
  unpack_state: Callable[[LayerwiseState, Any], dict[str, LeafState]]

  def __iter__(self):
    return iter((self.init, self.step))


def make_layerwise_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    *,
    clip_norm: float | None = None,
    accumulate_steps: int = 1,
    accumulate_dtype: Any = jnp.float32,
    per_layer: PerLayerSpec = None,
    row_chunks: Mapping[str, int] | None = None,
    weight_dtype: Any = jnp.float32,
    has_aux: bool = False,
    donate: bool = True,
    jit: bool = True,
) -> LayerwiseStep:
  """Builds a train step whose updates happen inside the backward pass.

  See the module docstring for the mechanism, what is supported and the
  exact semantics of clipping and accumulation. Without clipping and
  accumulation the new parameters equal those of the ordinary step
  ``g = grad(loss)(params); u, s = tx.update(g, s, params);
  params = optax.apply_updates(params, u)`` to float32 rounding.

  Example::

    graphdef, params = nnx.split(model, nnx.Param)
    def loss_fn(params, batch):
      return llama.loss_fn(nnx.merge(graphdef, params), batch)

    init, step = make_layerwise_step(loss_fn, galore_adamw_8bit(1e-2))
    opt_state = init(params)
    for batch in batches:
      params, opt_state, loss = step(params, opt_state, batch)

  Args:
    loss_fn: ``(params, batch) -> loss`` (or ``(loss, aux)`` with
      ``has_aux``); a scalar floating loss.
    tx: the optimizer, any ``optax.GradientTransformation`` whose update of
      one leaf depends on that leaf only.
    clip_norm: if set, each leaf's (each layer slice's, for ``per_layer``
      leaves) gradient is scaled to Frobenius norm at most ``clip_norm``.
    accumulate_steps: micro-batches per update (``k``).
    accumulate_dtype: dtype of the accumulators.
    per_layer: stacked leaves (leading layer axis) to update one layer at a
      time inside ``scan_layers``: a regex that must match the whole leaf
      name, a list of names/substrings/regexes (as ``target_modules``), or
      a predicate on names. Their states are built per layer slice.
    row_chunks: ``{name: k}`` (names matched as one ``target_modules``
      entry: equal, substring or regex): update these leaves ``k`` blocks of
      rows at a time, in a loop, so the optimizer's temporaries (e.g. 8-bit
      Adam's dequantised moments) exist for one block at a time. Each block
      has its own state (a leading axis of size ``k``). Only for leaves whose
      update is element-wise (Adam, AdamW, 8-bit Adam with blocks of
      ``block_size`` values that do not straddle row blocks, SGD, Lion; not
      GaLore-projected or Adafactor-factored leaves, which raise or change
      meaning): then the result is the same as updating the leaf whole.
    weight_dtype: dtype that int8 leaves (``weight_quantization.
      QuantizedWeight`` nodes of ``params``) are dequantised to, for the
      model and the optimizer (the model's parameter dtype).
    has_aux: ``loss_fn`` returns ``(loss, aux)``.
    donate: donate ``params`` and ``opt_state`` to the step, so the new
      ones reuse their buffers.
    jit: return the step jit-compiled (else a traceable function).

  Returns:
    A ``LayerwiseStep`` (unpacks as ``(init, step)``).

  Raises:
    ValueError: for invalid arguments; at trace time if a ``per_layer``
      leaf does not go through ``scan_layers``.
  """
  k = check_positive_int("accumulate_steps", accumulate_steps)
  if clip_norm is not None and not (np.isscalar(clip_norm) and clip_norm > 0):
    raise ValueError(f"clip_norm must be a positive number or None, got "
                     f"{clip_norm!r}.")
  chunk_rules = []
  for key, value in (row_chunks or {}).items():
    chunk_rules.append((targets.make_matcher([key]),
                        check_positive_int(f"row_chunks[{key!r}]", value)))
  if per_layer is None:
    per_layer_match = lambda name: False
  elif callable(per_layer):
    per_layer_match = per_layer
  else:
    per_layer_match = targets.make_matcher(per_layer)
  accumulate_dtype = jnp.dtype(accumulate_dtype)
  weight_dtype = jnp.dtype(weight_dtype)
  if not jnp.issubdtype(weight_dtype, jnp.floating):
    raise ValueError(f"weight_dtype must be a floating dtype, got "
                     f"{weight_dtype}.")
  cache: dict[Any, _Layout] = {}

  # -- layout ---------------------------------------------------------------

  def single(layout: _Layout, i: int, x: Any, anchor_value: Any) -> Any:
    vals = [optax.MaskedNode()] * len(layout.names)
    vals[i] = x
    if layout.anchor[i] is not None:
      vals[layout.anchor[i][0]] = anchor_value
    return layout.treedef.unflatten(vals)

  def anchor_zeros(layout: _Layout, i: int) -> Any:
    if layout.anchor[i] is None:
      return None
    aval = layout.anchor[i][1]
    return jnp.zeros(aval.shape, aval.dtype)

  def get_layout(params: Any) -> _Layout:
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=weight_quantization.is_quantized)
    key = (treedef, tuple((tuple(a.shape), jnp.dtype(a.dtype).name)
                          for _, x in paths_leaves
                          for a in jax.tree.leaves(x)))
    if key in cache:
      return cache[key]
    names = [targets.path_to_name(p) for p, _ in paths_leaves]
    if len(set(names)) != len(names):
      dupes = sorted({n for n in names if names.count(n) > 1})
      raise ValueError(f"Leaf path names must be unique, got {dupes[:5]}.")
    per = []
    chunks = []
    units = []
    quantized = []
    qindex = []
    for name, (_, x) in zip(names, paths_leaves):
      is_q = weight_quantization.is_quantized(x)
      quantized.append(is_q)
      qindex.append(sum(quantized) - 1 if is_q else None)
      if is_q:
        # The optimizer sees the dequantised weight.
        x = jax.ShapeDtypeStruct(x.codes.shape, weight_dtype)
      elif not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"Parameter {name!r} has dtype {x.dtype}; layer-wise "
                         "updates need floating-point parameters.")
      is_per = bool(per_layer_match(name))
      if is_per and len(x.shape) < 1:
        raise ValueError(f"per_layer leaf {name!r} has no leading layer axis.")
      if is_per and is_q:
        raise ValueError(
            f"per_layer leaf {name!r} is stored in int8; int8 weights are "
            "supported for unrolled layers (call_layer), dense and "
            "embedding_lookup, not for per_layer stacks.")
      nk = next((c for match, c in chunk_rules if match(name)), 1)
      if nk > 1 and (is_per or len(x.shape) < 1 or x.shape[0] % nk):
        raise ValueError(
            f"row_chunks: leaf {name!r} of shape {tuple(x.shape)} cannot be "
            f"split into {nk} blocks of rows (per_layer leaves cannot be "
            "chunked; the first axis must be divisible).")
      per.append(is_per)
      chunks.append(nk)
      if is_per:
        shape = tuple(x.shape[1:])
      elif nk > 1:
        shape = (x.shape[0] // nk, *x.shape[1:])
      else:
        shape = tuple(x.shape)
      units.append(jax.ShapeDtypeStruct(shape, x.dtype))
    if per_layer is not None and not any(per):
      raise ValueError(
          f"per_layer={per_layer!r} matches no parameter. A string is a regex "
          "that must match the whole name (use a list for substrings); some "
          f"names: {names[:10]}.")
    layout = _Layout(treedef, names, per, chunks, units, [None] * len(names),
                     [None] * len(names), [None] * len(names), quantized,
                     qindex)
    opt_specs: list[Any] = [None] * len(names)
    errors = {}
    for i, u in enumerate(units):
      try:
        opt_specs[i] = jax.eval_shape(tx.init, single(layout, i, u, None))
      except ValueError as e:  # e.g. labels that need a target in the tree
        errors[i] = e
    if errors:
      # Label functions such as ``galore_labels`` refuse a tree without any
      # GaLore target. Give such leaves a 1x..x1 placeholder of a leaf that
      # initialises alone (so it is a target): its state is a few floats.
      candidates = [i for i, u in enumerate(units)
                    if i not in errors and len(u.shape) >= 2]
      if not candidates:
        raise next(iter(errors.values()))
      a = candidates[0]
      anchor = (a, jax.ShapeDtypeStruct((1,) * len(units[a].shape),
                                        units[a].dtype))
      for i, err in errors.items():
        layout.anchor[i] = anchor
        try:
          opt_specs[i] = jax.eval_shape(
              lambda u, z, i=i: tx.init(single(layout, i, u, z)), units[i],
              anchor[1])
        except ValueError:
          raise err from None
    for i, name in enumerate(names):
      if chunks[i] > 1 and any(name in s.projectors for s in
                               _find_galore_states(opt_specs[i])):
        raise ValueError(
            f"row_chunks: {name!r} is projected by galore_project, whose "
            "update is not element-wise; it cannot be updated in row blocks.")
      plan = None
      if k > 1:
        found = [s for s in _find_galore_states(opt_specs[i])
                 if name in s.projectors]
        if len(found) == 1:
          proj = found[0].projectors[name]
          use_left = not isinstance(proj.left, optax.MaskedNode)
          use_right = not isinstance(proj.right, optax.MaskedNode)
          rank = (projector_storage.factor_shape(proj.left)[-1] if use_left else
                  projector_storage.factor_shape(proj.right)[-2])
          plan = projection.LeafPlan(tuple(units[i].shape), use_left,
                                     use_right, rank)
        acc_shape = plan.lowrank_shape if plan else units[i].shape
        acc = jax.ShapeDtypeStruct(acc_shape, accumulate_dtype)
        mini = jax.ShapeDtypeStruct((), jnp.int32)
      else:
        acc = mini = optax.MaskedNode()
      layout.lowrank[i] = plan
      layout.specs[i] = LeafState(opt_specs[i], acc, mini)
    cache[key] = layout
    return layout

  # -- per-unit init and update (unpacked) ------------------------------------

  def leaf_value(layout: _Layout, i: int, p: Any) -> jax.Array:
    """The float value of a stored leaf (int8 leaves dequantised)."""
    if layout.quantized[i]:
      return weight_quantization.dequantize_weight(p, weight_dtype)
    return p

  def init_unit(layout: _Layout, i: int, p: jax.Array) -> LeafState:
    opt_state = tx.init(single(layout, i, p, anchor_zeros(layout, i)))
    spec = layout.specs[i]
    if k > 1:
      acc = jnp.zeros(spec.acc.shape, spec.acc.dtype)
      mini = jnp.zeros([], jnp.int32)
    else:
      acc = mini = optax.MaskedNode()
    return LeafState(opt_state, acc, mini)

  def tx_update(layout, i, g, opt_state, p, key):
    z = anchor_zeros(layout, i)
    value = leaf_value(layout, i, p)
    updates, new_state = tx.update(single(layout, i, g, z), opt_state,
                                   single(layout, i, value, z))
    u = layout.treedef.flatten_up_to(updates)[i]
    # Keep the state's dtypes fixed (lax.cond and donation need it).
    new_state = jax.tree.map(lambda a, b: jnp.asarray(b).astype(a.dtype),
                             opt_state, new_state)
    if layout.quantized[i]:
      key, row_offset = key if key is not None else (None, 0)
      return (weight_quantization.apply_update(
          p, u, key=key, row_offset=row_offset,
          block_elements=_ROUND_BLOCK_ELEMENTS), new_state)
    return optax.apply_updates(p, u), new_state

  def update_unit(layout: _Layout, i: int, g: jax.Array, p: Any,
                  st: LeafState, key: Any) -> tuple[Any, LeafState]:
    if clip_norm is not None:
      g = _clip_leaf(g, clip_norm)
    if k == 1:
      new_p, opt_state = tx_update(layout, i, g, st.opt_state, p, key)
      return new_p, st._replace(opt_state=opt_state)

    plan = layout.lowrank[i]
    name = layout.names[i]
    j = st.mini_step
    opt_state = st.opt_state
    factors = None
    if plan is not None:
      # Let the optimizer refresh its projector from this micro-batch at the
      # start of a window; only the projectors of that trial update are kept
      # (XLA drops the rest of it).
      def probe(s):
        z = anchor_zeros(layout, i)
        _, trial = tx.update(single(layout, i, g, z), s,
                             single(layout, i, leaf_value(layout, i, p), z))
        return _with_projectors(s, trial)

      opt_state = jax.lax.cond(j == 0, probe, lambda s: s, opt_state)
      (gs,) = [s for s in _find_galore_states(opt_state)
               if name in s.projectors]
      factors = projection.Projector(
          *(projector_storage.load_factor(f) for f in gs.projectors[name]))
      x = projection.project(g, factors, plan)
    else:
      x = g
    acc = (st.acc + (x - st.acc) / (j + 1)).astype(st.acc.dtype)

    def emit(opt_state, acc):
      full = acc if plan is None else projection.project_back(acc, factors,
                                                               plan)
      new_p, new_opt = tx_update(layout, i, full.astype(g.dtype), opt_state, p,
                                 key)
      return new_p, new_opt, jnp.zeros_like(acc)

    def hold(opt_state, acc):
      return p, opt_state, acc

    new_p, opt_state, acc = jax.lax.cond(j == k - 1, emit, hold, opt_state,
                                         acc)
    mini = (optax.safe_increment(j) % k).astype(jnp.int32)
    return new_p, LeafState(opt_state, acc, mini)

  def update_packed(layout, i, g, p, packed, key=None):
    zero = ordering.zero_after(g)
    st = jax.tree.map(lambda y, spec: _unpack_array(y, spec, zero), packed,
                      layout.specs[i])
    new_p, new_st = update_unit(layout, i, g, p, st, key)
    return new_p, pack_state(new_st)

  def update_leaf(layout, i, g, p, packed, key=None):
    """A whole leaf's update (per layer slice or row block where stacked).

    ``g`` is the leaf's gradient, or a function ``(start, rows) -> rows
    start:start+rows of the gradient`` (``dense``, ``embedding_lookup``),
    so a row-chunked leaf's gradient is made one block at a time. ``key``
    (int8 leaves) is the leaf's rounding key; a row block passes its first
    row along with it, so blocks draw the whole leaf's rounding bits.
    """
    if layout.per_layer[i]:
      return jax.vmap(lambda *a: update_packed(layout, i, *a))(g, p, packed)
    nk = layout.chunks[i]
    unit_shape = layout.unit_avals[i].shape
    rows_total = unit_shape[0] * nk if unit_shape else 0
    if nk == 1:
      if callable(g):
        g = g(0, rows_total)
      return update_packed(layout, i, g, p, packed,
                           None if key is None else (key, 0))
    rows = rows_total // nk
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
      new_p, new_s = update_packed(
          layout, i, g_c, jax.tree.map(lambda x: take(x, c), pk),
          jax.tree.map(lambda x: take(x, c), sk),
          None if key is None else (key, c * rows))
      return (jax.tree.map(lambda x, v: put(x, v, c), pk, new_p),
              jax.tree.map(lambda x, v: put(x, v, c), sk, new_s))

    pk, packed = jax.lax.fori_loop(0, nk, body,
                                   (jax.tree.map(blocks, p), packed))
    return jax.tree.map(lambda x, y: x.reshape(y.shape), pk, p), packed

  # -- public init ------------------------------------------------------------

  def init(params: Any) -> LayerwiseState:
    layout = get_layout(params)
    leaves = layout.treedef.flatten_up_to(params)
    out = {}
    for i, (name, p) in enumerate(zip(layout.names, leaves)):
      p = leaf_value(layout, i, p)
      fn = lambda x, i=i: pack_state(init_unit(layout, i, x))
      if layout.per_layer[i]:
        out[name] = jax.vmap(fn)(p)
      elif layout.chunks[i] > 1:
        nk = layout.chunks[i]
        out[name] = jax.vmap(fn)(p.reshape(nk, p.shape[0] // nk,
                                           *p.shape[1:]))
      else:
        out[name] = fn(p)
    return LayerwiseState(out)

  def unpack(state: LayerwiseState, params: Any) -> dict[str, LeafState]:
    layout = get_layout(params)
    out = {}
    for i, name in enumerate(layout.names):
      spec = layout.specs[i]
      if layout.per_layer[i] or layout.chunks[i] > 1:
        out[name] = jax.vmap(lambda s, spec=spec: unpack_state(s, spec))(
            state.leaves[name])
      else:
        out[name] = unpack_state(state.leaves[name], spec)
    return out

  # -- the hooks ---------------------------------------------------------------

  def make_hook(i, ctx):
    """Identity on leaf ``i`` (an int8 leaf comes out dequantised); its
    backward rule updates the leaf with the gradient it receives."""

    @jax.custom_vjp
    def hook(stored, s, key_data):
      del s, key_data
      return ctx.values([i], [stored])[0]

    def fwd(stored, s, key_data):
      return hook(stored, s, key_data), (stored, s, key_data)

    def bwd(res, g):
      ctx.reach_directly(i)
      return ctx.update(i, g, *res)

    hook.defvjp(fwd, bwd)
    return hook

  class _Context:
    """Trace-time registry of the step's leaves for the layer-aware calls.

    ``call_layer``, ``dense``, ``embedding_lookup`` and ``scan_layers`` look
    their arguments up here (by identity) to reach the leaf's stored value,
    its packed state and its rounding key.
    """

    def __init__(self, layout, leaves, packed, key_data, reached, key_impl):
      self.layout = layout
      self.reached = reached
      self.leaves = leaves
      self.packed = packed
      self.key_data = key_data
      self.key_impl = key_impl
      self.consumed: set[int] = set()
      # What the loss function received for each leaf (a hook's output, or
      # the leaf itself for per_layer leaves), found again by identity.
      self.hooked: list[Any] = []
      self.taken: set[int] = set()  # leaves consumed by dense & co.
      # Inside a call_layer's layer: (weight seen by the layer, leaf index,
      # its (stored, packed, key data) inputs) for each of its leaves, the
      # trace the layer runs in, and the leaves that a dense product has
      # updated.
      self.local: list[tuple[Any, int, Any]] | None = None
      self.local_trace: Any = None
      self.local_dense: set[int] = set()
      # In a layer's backward pass, what the next dense product's backward
      # rule waits for (the layer's output gradient, then the last kernel
      # update), so the layer's weight gradients exist one at a time.
      self.wait_for: Any = None

    @property
    def inside_layer(self) -> bool:
      return self.local is not None

    @contextlib.contextmanager
    def layer_scope(self, weights, ids, inputs):
      """Registers a layer's weights for ``dense`` while ``f`` is traced;
      yields the set of leaves that ``dense`` consumed."""
      saved = self.local, self.local_trace, self.local_dense
      self.local = list(zip(weights, ids, inputs))
      self.local_trace = _trace_state()
      self.local_dense = set()
      try:
        # The recomputation runs in the backward pass, after the loss's
        # trace has left the step's context: enter it again.
        with _activate(self):
          yield self.local_dense
      finally:
        self.local, self.local_trace, self.local_dense = saved

    def per_layer_index(self, x) -> int | None:
      """The index of the per_layer leaf ``x`` is, or None."""
      return next((i for i, leaf in enumerate(self.leaves)
                   if self.layout.per_layer[i] and leaf is x), None)

    def scan(self, f, carry, leaves, ldef):
      return _scan_layerwise(self, f, carry, leaves, ldef)

    def hooked_index(self, x) -> int | None:
      return next((i for i, h in enumerate(self.hooked) if h is x), None)

    def is_quantized(self, x) -> bool:
      i = self.hooked_index(x)
      return i is not None and self.layout.quantized[i]

    def take(self, i: int):
      """Leaf ``i``'s (stored value, packed state, key data), consumed once."""
      if i in self.taken:
        raise ValueError(
            f"Parameter {self.layout.names[i]!r} is used by more than one "
            "layerwise.call_layer/dense/embedding_lookup call; each must "
            "be the only use of its int8 weight or dense kernel.")
      self.taken.add(i)
      return self.leaves[i], self.packed[i], self.key_data[i]

    def reach_directly(self, i: int) -> None:
      if i in self.taken:
        raise ValueError(
            f"Parameter {self.layout.names[i]!r} is used by "
            "layerwise.call_layer/dense/embedding_lookup and also elsewhere "
            "in the loss (e.g. tied embeddings); its update would be split. "
            "Use it in one place, or keep it in floating point.")
      self.reached.add(i)

    def leaf_key(self, key_data):
      if key_data is None:
        return None
      return jax.random.wrap_key_data(key_data, impl=self.key_impl)

    def values(self, ids, stored, after=None):
      """The float values of leaves ``ids`` from their stored values; int8
      leaves are dequantised only once ``after`` exists (if given)."""
      qs = [_from_carrier(x) if self.layout.quantized[i] else x
            for i, x in zip(ids, stored)]
      q_pos = [j for j, i in enumerate(ids) if self.layout.quantized[i]]
      if after is not None and q_pos:
        scales = ordering.after([qs[j].scale for j in q_pos], after)
        for j, scale in zip(q_pos, scales):
          qs[j] = qs[j]._replace(scale=scale)
      return [leaf_value(self.layout, i, q) for i, q in zip(ids, qs)]

    def update(self, i, g, stored, packed, key_data):
      """Cotangents (new stored value, new packed state, key) of leaf i."""
      self.reached.add(i)
      if self.layout.quantized[i]:
        new_q, new_s = update_leaf(self.layout, i, g, _from_carrier(stored),
                                   packed, self.leaf_key(key_data))
        return _to_carrier(new_q), new_s, _float0_tree(key_data)
      new_p, new_s = update_leaf(self.layout, i, g, stored, packed)
      return new_p, new_s, _float0_tree(key_data)

    def call_layer(self, f, carry, params, args):
      return _call_layer(self, f, carry, params, args)

    def dense(self, x, kernel, dtype):
      if self.inside_layer:
        found = [(i, inp) for w, i, inp in self.local if w is kernel]
        if not found or _trace_state() != self.local_trace:
          # Not a weight of this layer, or a product inside an inner
          # transformation of the layer (scan, cond): a plain product whose
          # gradient goes to the weight's update at the layer's end.
          return None
        ((i, inputs),) = found
        if i in self.local_dense:
          raise ValueError(
              f"Parameter {self.layout.names[i]!r} is multiplied by more "
              "than one layerwise.dense call in its layer; each kernel must "
              "be used by one dense product only.")
        self.local_dense.add(i)
        return _dense_update(self, i, x, dtype, inputs)
      i = self.hooked_index(kernel)
      if i is None or self.layout.per_layer[i]:
        return None
      return _dense_update(self, i, x, dtype, self.take(i))

    def embedding_lookup(self, table, ids):
      i = self.hooked_index(table)
      if i is None or not (self.layout.quantized[i] or
                           self.layout.chunks[i] > 1):
        return None
      return _lookup_rows(self, i, ids)

  def _call_layer(ctx, f, carry, params, args):
    """``call_layer`` inside a step (see its docstring).

    The layer receives each of its leaves' (stored value, packed state, key
    data) and makes the value the layer sees itself (an int8 leaf is
    dequantised, in the forward pass and again in the recomputation), so no
    dequantised weight is kept from the forward to the backward pass. A
    kernel used through ``dense`` is updated by that product's backward
    rule (its cotangents are the new stored value and state); the other
    leaves get their gradients at the end and are updated here.
    """
    p_leaves, pdef = jax.tree.flatten(params)
    ids = [ctx.hooked_index(x) for x in p_leaves]
    is_h = [i is not None for i in ids]
    h_ids = [i for i in ids if i is not None]
    h_inputs = [ctx.take(i) for i in h_ids]
    f_conv, consts = jax.closure_convert(f, carry, params, *args)
    # ``f`` itself (not its traced copy) must run for ``dense`` to find the
    # layer's weights; it can when it closes over no traced value.
    layer_fn = f_conv if consts else f

    def apply(c, others, weights, h_in, cs, by_dense=None):
      with ctx.layer_scope(weights, h_ids, h_in) as used:
        p = pdef.unflatten(_interleave(is_h, weights, others))
        out = layer_fn(c, p, *cs)
      if by_dense is not None:
        by_dense.update(used)
      return out

    def weights_of(h_in, c):
      return ctx.values(h_ids, [stored for stored, _, _ in h_in], after=c)

    def check(c, others, h_in, cs):
      """Raises if a leaf updated by ``dense`` is also used directly by the
      layer (its update would miss that gradient)."""
      by_dense = set()
      weights = weights_of(h_in, c)
      jaxpr = jax.make_jaxpr(functools.partial(apply, by_dense=by_dense))(
          c, others, weights, h_in, cs).jaxpr
      n_c, n_o = len(jax.tree.leaves(c)), len(jax.tree.leaves(others))
      w_vars = jaxpr.invars[n_c + n_o:n_c + n_o + len(weights)]
      read = {v for eqn in jaxpr.eqns for v in eqn.invars
              if isinstance(v, jax.extend.core.Var)} | set(jaxpr.outvars)
      for i, v in zip(h_ids, w_vars):
        if i in by_dense and v in read:
          raise ValueError(
              f"Parameter {ctx.layout.names[i]!r} is multiplied by "
              "layerwise.dense and also used otherwise in its layer; its "
              "update would miss part of its gradient. Use it in one place.")

    @jax.custom_vjp
    def run(c, others, h_in, cs):
      return apply(c, others, weights_of(h_in, c), h_in, cs)

    def run_fwd(c, others, h_in, cs):
      check(c, others, h_in, cs)
      return run(c, others, h_in, cs), (c, others, h_in, cs)

    def run_bwd(res, ct):
      c, others, h_in, cs = res
      # Recompute from an input tied to the output cotangent (see
      # _ordered_layer_bwd); the weights are made from it.
      c = ordering.after(c, ct)
      weights = weights_of(h_in, c)
      by_dense = set()
      _, vjp = jax.vjp(functools.partial(apply, by_dense=by_dense), c, others,
                       weights, h_in, cs)
      ctx.wait_for = ct
      ct_c, ct_others, ct_w, ct_h, ct_cs = vjp(ct)
      ctx.wait_for = None
      direct = [j for j, i in enumerate(h_ids) if i not in by_dense]
      ct_others, grads = ordering.after(
          (ct_others, [ct_w[j] for j in direct]), ct_c)
      new_h = list(ct_h)
      for j, g in zip(direct, grads):
        new_h[j] = ctx.update(h_ids[j], g, *h_in[j])
      return ct_c, ct_others, new_h, ct_cs

    run.defvjp(run_fwd, run_bwd)
    others = [x for x, h in zip(p_leaves, is_h) if not h]
    return run(carry, others, h_inputs, [*args, *consts])

  def _dense_update(ctx, i, x, dtype, inputs):
    """``x @ kernel`` whose backward updates the kernel (leaf ``i``).

    The kernel's gradient ``x^T dy`` is made one row block at a time inside
    the update's loop (``row_chunks``), so the whole gradient never exists;
    the input gradient ``dy kernel^T`` is computed first, from the old
    kernel, and the in-place update is ordered after it.
    """
    stored, packed, key_data = inputs

    @jax.custom_vjp
    def run(x, stored, packed, key_data):
      del packed, key_data
      return _matmul(x, ctx.values([i], [stored], after=x)[0], dtype)

    def run_fwd(x, stored, packed, key_data):
      return run(x, stored, packed, key_data), (x, stored, packed, key_data)

    def run_bwd(res, dy):
      x, stored, packed, key_data = res
      if ctx.wait_for is not None:
        dy = ordering.after(dy, ctx.wait_for)
      w = ctx.values([i], [stored], after=dy)[0]
      (dx,) = jax.vjp(lambda x_: _matmul(x_, w, dtype), x)[1](dy)
      dy = ordering.after(dy, dx)
      w_aval = ctx.layout.unit_avals[i]

      def grad_rows(start, rows):
        # x_rows^T dy written as the (rows, d_out) product itself (the
        # transpose rule of the product makes XLA:CPU compute its transpose
        # in float32 and copy it back: two more weight-sized buffers).
        x_rows = jax.lax.dynamic_slice_in_dim(x, start, rows, axis=x.ndim - 1)
        lead = tuple(range(x.ndim - 1))
        cd = dtype or jnp.result_type(x, w)
        g = jax.lax.dot_general(x_rows.astype(cd), dy.astype(cd),
                                ((lead, lead), ((), ())))
        return g.astype(w.dtype)

      new = ctx.update(i, grad_rows, stored, packed, key_data)
      # What comes next waits for the update (so only this kernel's
      # gradient and update buffers are live): the input gradient, and in a
      # layer's backward pass the next dense product.
      done = ordering.zero_after(new[0])
      if ctx.wait_for is not None:
        ctx.wait_for = done
      return (ordering.after(dx, done), *new)

    run.defvjp(run_fwd, run_bwd)
    return run(x, stored, packed, key_data)

  def _lookup_rows(ctx, i, ids):
    """``table[ids]`` of an int8 or row-chunked table: only the looked-up
    rows are read (an int8 table's dequantised); the gradient is scattered
    one row block at a time inside the update, never as a whole table."""
    stored, packed, key_data = ctx.take(i)
    dtype = ctx.layout.unit_avals[i].dtype

    @jax.custom_vjp
    def run(stored, packed, key_data, ids):
      del packed, key_data
      if not ctx.layout.quantized[i]:
        return jnp.take(stored, ids, axis=0)
      q = _from_carrier(stored)
      rows = weight_quantization.QuantizedWeight(
          jnp.take(q.codes, ids, axis=0), jnp.take(q.scale, ids, axis=0))
      return weight_quantization.dequantize_weight(rows, dtype)

    def run_fwd(stored, packed, key_data, ids):
      return run(stored, packed, key_data, ids), (stored, packed, key_data,
                                                  ids)

    def run_bwd(res, ct):
      stored, packed, key_data, ids = res
      ct = ct.astype(dtype)
      width = ctx.layout.unit_avals[i].shape[1:]
      zero = ordering.zero_after(ct)

      def grad_rows(start, rows):
        inside = (ids >= start) & (ids < start + rows)
        local = jnp.where(inside, ids - start, rows)  # row `rows` is dropped
        zeros = ordering.after(jnp.zeros((rows, *width), dtype), zero)
        return zeros.at[local].add(ct, mode="drop")

      new = ctx.update(i, grad_rows, stored, packed, key_data)
      return (*new, _float0_like(ids))

    run.defvjp(run_fwd, run_bwd)
    return run(stored, packed, key_data, ids)

  def _scan_layerwise(ctx, f, carry, leaves, ldef):
    layout = ctx.layout
    sizes = {x.shape[0] if x.ndim else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
      raise ValueError("scan_layers: every leaf of `layers` needs the same "
                       f"leading layer axis, got sizes {sizes}.")
    (num_layers,) = sizes
    found = [ctx.per_layer_index(x) for x in leaves]
    is_reg = [i is not None for i in found]
    reg_ids = []
    for i in found:
      if i is not None:
        if i in ctx.consumed:
          raise ValueError(f"per_layer leaf {layout.names[i]!r} goes through "
                           "scan_layers twice.")
        ctx.consumed.add(i)
        reg_ids.append(i)
    reg_states = [ctx.packed[i] for i in reg_ids]
    example = ldef.unflatten([x[0] for x in leaves])
    f_conv, consts = jax.closure_convert(f, carry, example)
    if any(ctx.per_layer_index(c) is not None for c in consts):
      raise ValueError("scan_layers: `f` closes over a per_layer stacked leaf; "
                       "it must only see its layer slice.")

    def apply_layer(c, sl, cs):
      return f_conv(c, ldef.unflatten(sl), *cs)

    def _interleave(reg_p, oth_p):
      it_r, it_o = iter(reg_p), iter(oth_p)
      return [next(it_r) if r else next(it_o) for r in is_reg]

    def forward(reg_p, oth_p, carry, cs, save):
      def body(c, sl):
        return apply_layer(c, sl, cs), (c if save else None)
      return jax.lax.scan(body, carry, _interleave(reg_p, oth_p))

    @jax.custom_vjp
    def run(reg_p, reg_s, oth_p, carry, cs):
      del reg_s
      return forward(reg_p, oth_p, carry, cs, False)[0]

    def run_fwd(reg_p, reg_s, oth_p, carry, cs):
      out, saved = forward(reg_p, oth_p, carry, cs, True)
      return out, (reg_p, reg_s, oth_p, saved, cs)

    def run_bwd(res, ct_out):
      reg_p, reg_s, oth_p, saved, cs = res
      for i in reg_ids:
        ctx.reached.add(i)
      c_leaves0, cdef = jax.tree.flatten(saved)
      c_float = [_is_float(x) for x in c_leaves0]
      k_float = [_is_float(jnp.asarray(x)) for x in cs]
      o_float = [_is_float(x) for x in oth_p]
      ct_c = _split(jax.tree.leaves(ct_out), c_float)

      def body(step, loop):
        reg_p, reg_s, ct_oth, ct_c, ct_k = loop
        l = num_layers - 1 - step
        take = lambda x: jax.lax.dynamic_index_in_dim(x, l, 0, keepdims=False)
        put = lambda x, v: jax.lax.dynamic_update_index_in_dim(x, v, l, 0)
        c_l = [take(x) for x in c_leaves0]
        sl = [take(x) for x in _interleave(reg_p, oth_p)]
        sl_float = [_is_float(x) for x in sl]

        def layer(cf, sf, kf):
          c = cdef.unflatten(_merge(c_l, c_float, cf))
          out = apply_layer(c, _merge(sl, sl_float, sf),
                            _merge(list(cs), k_float, kf))
          return _split(jax.tree.leaves(out), c_float)

        _, vjp = jax.vjp(layer, _split(c_l, c_float), _split(sl, sl_float),
                         _split(list(cs), k_float))
        ct_c, g_sl, g_k = vjp(ct_c)
        g_all = _merge([None] * len(sl), sl_float, g_sl)
        new_reg_p, new_reg_s = [], []
        reg_slices = _split(sl, is_reg)
        reg_grads = _split(g_all, is_reg)
        for i, p_l, g_l, s in zip(reg_ids, reg_slices, reg_grads, reg_s):
          s_l = jax.tree.map(take, s)
          new_p_l, new_s_l = update_packed(layout, i, g_l, p_l, s_l)
          new_reg_p.append(put(reg_p[len(new_reg_p)], new_p_l))
          new_reg_s.append(jax.tree.map(put, s, new_s_l))
        oth_grads = _split(_split(g_all, [not r for r in is_reg]), o_float)
        ct_oth = [put(a, g.astype(a.dtype)) for a, g in zip(ct_oth, oth_grads)]
        ct_k = [a + g for a, g in zip(ct_k, g_k)]
        return new_reg_p, new_reg_s, ct_oth, ct_c, ct_k

      loop = (list(reg_p), list(reg_s),
              [jnp.zeros_like(x) for x in _split(oth_p, o_float)], ct_c,
              [jnp.zeros_like(x) for x in _split(list(cs), k_float)])
      reg_p, reg_s, ct_oth, ct_c, ct_k = jax.lax.fori_loop(
          0, num_layers, body, loop)
      ct_oth_all = _merge([_float0_like(x) for x in oth_p], o_float, ct_oth)
      ct_carry = cdef.unflatten(
          _merge([_float0_like(x[0]) for x in c_leaves0], c_float, ct_c))
      ct_cs = _merge([_float0_like(x) for x in cs], k_float, ct_k)
      return reg_p, reg_s, ct_oth_all, ct_carry, ct_cs

    run.defvjp(run_fwd, run_bwd)
    return run(_split(list(leaves), is_reg), reg_states,
               _split(list(leaves), [not r for r in is_reg]), carry,
               list(consts))

  # -- the step ----------------------------------------------------------------

  def step(params, state: LayerwiseState, batch, key=None):
    layout = get_layout(params)
    stored = layout.treedef.flatten_up_to(params)
    missing = [n for n in layout.names if n not in state.leaves]
    if missing:
      raise ValueError(f"opt_state has no state for {missing[:5]}; was it "
                       "made by this step's init for these parameters?")
    packed = [state.leaves[n] for n in layout.names]
    reached: set[int] = set()
    # int8 leaves: the i-th one rounds with fold_in(key, i), as
    # weight_quantization.apply_updates does; key data (not typed keys)
    # cross the custom_vjp boundaries.
    key_impl = None
    leaf_keys = [None] * len(stored)
    if key is not None and any(layout.quantized):
      if not jax.dtypes.issubdtype(jnp.asarray(key).dtype,
                                   jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
      key_impl = jax.random.key_impl(key)
      leaf_keys = [None if j is None else jax.random.fold_in(key, j)
                   for j in layout.qindex]
    key_data = [None if kk is None else jax.random.key_data(kk)
                for kk in leaf_keys]
    leaves = [_to_carrier(x) if q else x
              for x, q in zip(stored, layout.quantized)]

    def hooked_loss(leaves, packed):
      ctx = _Context(layout, leaves, packed, key_data, reached, key_impl)
      hooked = []
      for i, x in enumerate(leaves):
        if layout.per_layer[i]:
          h = x
        else:
          h = make_hook(i, ctx)(x, packed[i], key_data[i])
        ctx.hooked.append(h)
        hooked.append(h)
      with _activate(ctx):
        out = loss_fn(layout.treedef.unflatten(hooked), batch)
      lost = [layout.names[i] for i in range(len(leaves))
              if layout.per_layer[i] and i not in ctx.consumed]
      if lost:
        raise ValueError(
            f"per_layer leaves {lost[:5]} did not go through scan_layers (as "
            "the very arrays passed to the loss): their gradients would be "
            "taken as new parameters. Run the stack with "
            "galore_optax.layerwise.scan_layers or drop them from per_layer.")
      if has_aux:
        loss, aux = out
      else:
        loss, aux = out, None
      return loss, aux

    (loss, aux), (new_leaves, new_packed) = jax.value_and_grad(
        hooked_loss, argnums=(0, 1), has_aux=True)(leaves, packed)
    new_leaves, new_packed = list(new_leaves), list(new_packed)
    for i in range(len(leaves)):
      if layout.quantized[i]:
        new_leaves[i] = _from_carrier(new_leaves[i])
      if i in reached:
        continue
      # The loss does not use this leaf: its hook never ran. Update it with a
      # zero gradient, as an ordinary step would.
      full = stored[i].codes if layout.quantized[i] else stored[i]
      zeros = jnp.zeros(full.shape, layout.unit_avals[i].dtype)
      new_leaves[i], new_packed[i] = update_leaf(
          layout, i, zeros, stored[i], packed[i], leaf_keys[i])
    new_params = layout.treedef.unflatten(new_leaves)
    new_state = LayerwiseState(dict(zip(layout.names, new_packed)))
    if has_aux:
      return new_params, new_state, loss, aux
    return new_params, new_state, loss

  if jit:
    step = jax.jit(step, donate_argnums=(0, 1) if donate else ())
  return LayerwiseStep(init, step, unpack)
