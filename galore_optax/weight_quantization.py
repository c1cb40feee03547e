"""8-bit weights: int8 codes with group-wise scales, stochastic rounding.

Once GaLore has made the optimizer state low-rank and 8-bit, the weights are
the largest item left (LLaMA-7B: 12.6 GiB in bfloat16). Q-GaLore stores them
as int8 and keeps training stable by applying each update to the
dequantised weight and rounding the result back *stochastically*: an update
smaller than half a quantisation step survives in expectation instead of
being rounded away every step.

Format. A weight ``w`` of shape ``(..., n)`` is cut along its last axis into
groups of ``group_size`` consecutive values (one group per row when
``group_size`` does not divide ``n``). Each group has one float32 scale
``s = max|w| / 127`` and its values are stored as int8 codes ``c`` in
``[-127, 127]`` with ``w ~= c * s``. Groups run along the last axis only, so
a row-sharded (or column-sharded, in whole groups) weight shards its codes
and scales the same way, and a Flax kernel ``(in, out)`` gets one scale per
``group_size`` outputs of each input row. Linear (not the dynamic map of the
8-bit states): weights are roughly Gaussian and zero-centred, and an update
is added in the linear domain.

Updates. ``apply_updates(params, updates, key=...)`` adds each update to the
dequantised weight, recomputes the group scales from the sum, and rounds
``w / s`` to codes: stochastically (``floor(w / s + u)``, ``u`` uniform in
``[0, 1)``, unbiased) when given a key, to nearest otherwise. The key of
each leaf is ``fold_in(key, leaf index)`` and row ``r`` of a leaf draws its
noise from ``fold_in(leaf key, r)`` (so updating a weight in blocks of rows,
as the per-layer step does, draws the same bits); derive ``key`` from the step
(``jax.random.fold_in(base_key, step)``) and a resumed run draws the same
bits. A group whose update is all zero (``optax.MultiSteps``' in-between
steps, a frozen leaf) keeps its codes and scale exactly.

References:
  Zhang et al., "Q-GaLore: Quantized GaLore with INT4 Projection and
  Layer-Adaptive Low-Rank Gradients", 2024, arXiv 2407.08296.
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
  Projection", ICML 2024, arXiv 2403.03507.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.typing import DTypeLike

from galore_optax import ordering
from galore_optax import reductions
from galore_optax import sharding
from galore_optax import targets
from galore_optax._checks import check_positive_int

_QMAX = 127  # symmetric: -128 is never used, so negation is exact


class QuantizedWeight(NamedTuple):
  """A weight stored as int8 codes and one float32 scale per group.

  The group size is implied by the shapes: ``codes.shape[-1] //
  scale.shape[-1]`` consecutive values of the last axis share one scale.

  Attributes:
    codes: int8 array with the weight's shape, values in ``[-127, 127]``.
    scale: float32 array of shape ``codes.shape[:-1] + (num_groups,)``.
  """

  codes: jax.Array
  scale: jax.Array


def is_quantized(x: Any) -> bool:
  """Whether ``x`` is a ``QuantizedWeight`` (a leaf for the tree helpers).

  Args:
    x: any pytree node.

  Returns:
    True for a ``QuantizedWeight``.
  """
  return isinstance(x, QuantizedWeight)


def _group_size(n: int, group_size: int | None) -> int:
  """The group actually used: ``group_size`` if it divides ``n``, else n."""
  if group_size is None or n % group_size:
    return n
  return group_size


def _grouped(x: jax.Array, group: int) -> jax.Array:
  """``(..., n) -> (..., n // group, group)``.

  With Explicit sharding the group axis keeps the last axis' sharding when
  every shard holds whole groups; otherwise the groups are gathered.
  """
  shape = (*x.shape[:-1], x.shape[-1] // group, group)
  explicit = sharding.explicit_sharding(x)
  if explicit is None:
    return x.reshape(shape)
  spec = tuple(explicit.spec) + (None,) * (x.ndim - len(explicit.spec))
  last = spec[-1]
  if last is not None:
    names = last if isinstance(last, tuple) else (last,)
    shards = math.prod(explicit.mesh.shape[name] for name in names)
    if (x.shape[-1] // shards) % group:
      last = None
  return jax.lax.reshape(
      x, shape, out_sharding=NamedSharding(explicit.mesh,
                                           P(*spec[:-1], last, None)))


def _ungrouped(y: jax.Array, like: jax.Array) -> jax.Array:
  """Inverse of ``_grouped``, sharded like ``like`` again."""
  out = y.reshape(like.shape)
  explicit = sharding.explicit_sharding(like)
  if explicit is not None:
    out = jax.sharding.reshard(out, explicit)
  return out


def _round(t: jax.Array, key: jax.Array | None,
           row_offset: int | jax.Array = 0) -> jax.Array:
  """Nearest (key None) or stochastic rounding of grouped ``t`` to codes.

  ``t`` is ``(*rows, groups, group)``. The noise of row ``r`` (rows counted
  over all leading axes, row-major) is drawn from ``fold_in(key,
  row_offset + r)``, so a weight updated in blocks of rows gets the same
  bits as when updated whole.
  """
  if key is None:
    r = jnp.round(t)
  else:
    lead = t.shape[:-2]
    rows = row_offset + jnp.arange(math.prod(lead), dtype=jnp.int32)
    draw = lambda i: jax.random.uniform(jax.random.fold_in(key, i),
                                        t.shape[-2:], jnp.float32)
    for _ in lead:
      draw = jax.vmap(draw)
    r = jnp.floor(t + draw(rows.reshape(lead)))
  return jnp.clip(r, -_QMAX, _QMAX).astype(jnp.int8)


def _safe(scale: jax.Array) -> jax.Array:
  # An all-zero group has scale 0; any divisor gives it codes 0.
  return jnp.where(scale > 0, scale, jnp.ones_like(scale))


def quantize_weight(
    w: jax.Array,
    *,
    group_size: int | None = 256,
    key: jax.Array | None = None,
) -> QuantizedWeight:
  """Quantises ``w`` to int8 codes with one scale per group of its last axis.

  Args:
    w: a floating-point array with at least one dimension.
    group_size: values of the last axis per scale; ``None`` (or a size that
      does not divide the last dimension) gives one scale per row.
    key: a PRNG key for stochastic rounding; ``None`` rounds to nearest.

  Returns:
    A ``QuantizedWeight``.

  Raises:
    ValueError: if ``w`` is a scalar or ``group_size`` is not positive.

  References:
    Zhang et al., 2024, arXiv 2407.08296 (Q-GaLore).
  """
  if group_size is not None:
    group_size = check_positive_int(
        "group_size", group_size,
        hint="It is the number of values of the last axis sharing a scale.")
  w = jnp.asarray(w)
  if w.ndim == 0:
    raise ValueError("quantize_weight needs an array with at least one "
                     "dimension, got a scalar.")
  group = _group_size(w.shape[-1], group_size)
  x = _grouped(w.astype(jnp.float32), group)
  scale = reductions.abs_max(x, -1) / _QMAX
  codes = _round(x / _safe(scale)[..., None], key)
  return QuantizedWeight(_ungrouped(codes, w), scale)


def dequantize_weight(q: QuantizedWeight,
                      dtype: DTypeLike = jnp.float32) -> jax.Array:
  """``codes * scale`` in ``dtype`` (the product is computed in float32).

  Args:
    q: the quantised weight.
    dtype: dtype of the result.

  Returns:
    An array of ``q.codes``' shape.

  References:
    Zhang et al., 2024, arXiv 2407.08296 (Q-GaLore).
  """
  group = q.codes.shape[-1] // q.scale.shape[-1]
  x = _grouped(q.codes, group).astype(jnp.float32) * q.scale[..., None]
  return _ungrouped(x, q.codes).astype(dtype)


def _row_blocks(rows: int, width: int, block_elements: int | None) -> int:
  """The fewest blocks of equal row count with at most ``block_elements``
  values each (1 when unlimited or one row is already larger)."""
  if block_elements is None or rows * width <= block_elements:
    return 1
  for k in range(2, rows + 1):
    if rows % k == 0 and (rows // k) * width <= block_elements:
      return k
  return 1


def apply_update(q: QuantizedWeight, update: jax.Array, *,
                 key: jax.Array | None = None,
                 row_offset: int | jax.Array = 0,
                 block_elements: int | None = None) -> QuantizedWeight:
  """Adds ``update`` to the weight stored in ``q`` and re-quantises it.

  The new scales come from the sum; ``w / s'`` is computed as
  ``c * (s / s') + update / s'``, which is exactly ``c`` where the update is
  zero and the scale unchanged. Groups whose update is all zero keep
  their scale, hence their codes, bit for bit.

  Args:
    q: the quantised weight.
    update: the additive update (any float dtype), ``q.codes``' shape.
    key: PRNG key for stochastic rounding; ``None`` rounds to nearest.
      Row ``r`` (leading axes flattened) rounds with noise drawn from
      ``fold_in(key, row_offset + r)``.
    row_offset: index of ``q``'s first row in the whole weight, when ``q``
      is a block of rows of it (row-blocked updates then draw the bits of
      the whole-weight update).
    block_elements: if set, re-quantise at most this many values at a time,
      in a loop over blocks of rows (the float32 intermediates and rounding
      noise then exist for one block; the result is the same bits). The
      loop slices rows, so a row-sharded weight would be gathered: meant
      for single-device memory savings (the per-layer step uses it).

  Returns:
    The new ``QuantizedWeight`` (same shapes and dtypes).

  References:
    Zhang et al., 2024, arXiv 2407.08296 (Q-GaLore).
  """
  if update.shape != q.codes.shape:
    raise ValueError(f"update shape {update.shape} does not match the "
                     f"quantised weight's {q.codes.shape}.")
  width = q.codes.shape[-1] if q.codes.ndim else 1
  rows = q.codes.size // width
  k = _row_blocks(rows, width, block_elements)
  if k == 1:
    return _apply_update_rows(q, update, key, row_offset)
  b = rows // k
  flat = lambda x: x.reshape(rows, x.shape[-1])
  codes, scale, update = flat(q.codes), flat(q.scale), flat(update)

  def body(j, carry):
    codes, scale = carry
    start = j * b
    cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, b)
    new = _apply_update_rows(QuantizedWeight(cut(codes), cut(scale)),
                             cut(update), key, row_offset + start)
    put = jax.lax.dynamic_update_slice_in_dim
    return put(codes, new.codes, start, 0), put(scale, new.scale, start, 0)

  codes, scale = jax.lax.fori_loop(0, k, body, (codes, scale))
  return QuantizedWeight(codes.reshape(q.codes.shape),
                         scale.reshape(q.scale.shape))


def _apply_update_rows(q: QuantizedWeight, update: jax.Array,
                       key: jax.Array | None,
                       row_offset: int | jax.Array) -> QuantizedWeight:
  group = q.codes.shape[-1] // q.scale.shape[-1]
  c = _grouped(q.codes, group).astype(jnp.float32)
  u = _grouped(update.astype(jnp.float32), group)
  s = q.scale[..., None]
  changed = jnp.any(u != 0, axis=-1)
  new_scale = jnp.where(changed, reductions.abs_max(c * s + u, -1) / _QMAX,
                        q.scale)
  divisor = _safe(new_scale)[..., None]
  # s / s is exactly 1, so unchanged codes come back exactly.
  if key is not None:
    # A zero that depends on the update: the noise is then drawn when the
    # update exists. Drawn from the key alone, XLA schedules every leaf's
    # noise at the start of the step and keeps it all live (measured: tens
    # of GiB on a LLaMA-7B per-layer step).
    row_offset = ordering.after(row_offset, new_scale)
  codes = _round(c * (s / divisor) + u / divisor, key, row_offset)
  return QuantizedWeight(_ungrouped(codes, q.codes), new_scale)


def quantize_params(
    params: optax.Params,
    target_modules: targets.TargetModules = "all-linear",
    *,
    any_matrix: bool = True,
    group_size: int | None = 256,
    min_size: int = 4096,
) -> optax.Params:
  """Stores the selected large matrices of ``params`` as ``QuantizedWeight``.

  Selection is GaLore's (``galore_optax.targets``): leaves with two or more
  dimensions whose module name matches ``target_modules``, embedding tables
  included unless ``any_matrix=False`` (int8 storage suits any matrix, while
  GaLore projects only linear weights by default); of those, leaves with
  fewer than ``min_size`` elements stay as they are, and so do norms, biases
  and every other leaf. Rounds to nearest.

  Args:
    params: a parameter tree.
    target_modules: the selection (``"all-linear"``: every dense kernel;
      add ``"embed"`` in a list to include embedding tables).
    any_matrix: let ``target_modules`` select matrices that are not linear
      weights (``targets.target_mask``); ``"all-linear"`` ignores it.
    group_size: values of the last axis per scale.
    min_size: smaller selected leaves stay in floating point.

  Returns:
    The tree with ``QuantizedWeight`` nodes in place of the selected leaves.

  Raises:
    ValueError: if the selection matches no matrix (see
      ``targets.target_mask``) or ``min_size`` is not positive.

  References:
    Zhang et al., 2024, arXiv 2407.08296 (Q-GaLore).
  """
  min_size = check_positive_int(
      "min_size", min_size,
      hint="Selected leaves with fewer elements stay in floating point.")
  mask = targets.target_mask(params, target_modules, any_matrix=any_matrix)

  def maybe_quantize(leaf, selected):
    if (selected and jnp.issubdtype(leaf.dtype, jnp.floating) and
        leaf.size >= min_size):
      return quantize_weight(leaf, group_size=group_size)
    return leaf

  return jax.tree.map(maybe_quantize, params, mask)


def dequantize_params(params: optax.Params,
                      dtype: DTypeLike = jnp.float32) -> optax.Params:
  """Replaces every ``QuantizedWeight`` of ``params`` by its values.

  Under ``jit`` each leaf is dequantised where it is used; other leaves are
  returned as they are.

  Args:
    params: a tree that may hold ``QuantizedWeight`` nodes.
    dtype: dtype of the dequantised leaves (the model's compute dtype).

  Returns:
    A tree of arrays with the original structure.

  References:
    Zhang et al., 2024, arXiv 2407.08296 (Q-GaLore).
  """
  return jax.tree.map(
      lambda x: dequantize_weight(x, dtype) if is_quantized(x) else x,
      params, is_leaf=is_quantized)


def apply_updates(params: optax.Params, updates: optax.Updates, *,
                  key: jax.Array | None = None) -> optax.Params:
  """``optax.apply_updates`` for trees holding ``QuantizedWeight`` nodes.

  Quantised leaves go through ``apply_update`` (stochastic rounding with
  ``fold_in(key, i)`` for the i-th quantised leaf in tree order, or nearest
  rounding when ``key`` is None); other leaves get ``p + u`` in ``p``'s dtype
  as in ``optax.apply_updates``.

  Args:
    params: the (partly quantised) parameters.
    updates: float updates with the structure of ``dequantize_params(params)``.
    key: a PRNG key, e.g. ``jax.random.fold_in(base_key, step)``; ``None``
      for round-to-nearest.

  Returns:
    The new parameters, same structure, shapes and dtypes.

  References:
    Zhang et al., 2024, arXiv 2407.08296 (Q-GaLore).
  """
  leaves, treedef = jax.tree.flatten(params, is_leaf=is_quantized)
  update_leaves = treedef.flatten_up_to(updates)
  out, index = [], 0
  for p, u in zip(leaves, update_leaves):
    if is_quantized(p):
      leaf_key = None if key is None else jax.random.fold_in(key, index)
      out.append(apply_update(p, u, key=leaf_key))
      index += 1
    elif p is None or u is None:
      out.append(p)
    else:
      out.append(jnp.asarray(p + u).astype(jnp.asarray(p).dtype))
  return treedef.unflatten(out)
