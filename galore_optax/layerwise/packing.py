"""The per-layer step's state, packed into floating point by bit-casts.

In the per-layer step each leaf's optimizer state travels through the
backward pass as a cotangent, and cotangents must be floating point. So each
state is stored *packed*: floating arrays as they are, 32-bit integers
bit-cast to float32, 16-bit ones to float16, 64-bit ones to pairs of
float32, 8-bit codes (8-bit moments and projectors) four to a float32 along
the last axis. Packing is a bit-cast, never arithmetic, so every bit pattern
survives (NaN payloads included).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galore_optax import ordering


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
      ``galore_optax.path_to_name``) to its packed ``LeafState`` as a flat
      tuple of arrays (``pack_leaves``: every array floating point;
      ``per_layer`` leaves carry a leading layer axis on every array). Use
      ``LayerwiseStep.unpack_state`` to read it.
  """

  leaves: dict[str, Any]


def pack_array(x: jax.Array) -> jax.Array:
  """One state array -> a floating array holding the same bits.

  Args:
    x: an array of any numeric or bool dtype.

  Returns:
    ``x`` itself if floating, else its bits as float32 (float16 for 16-bit
    dtypes; a trailing axis of 2 for 64-bit ones; four 8-bit values per
    float32 along the last axis, zero-padded to a multiple of four).

  Raises:
    TypeError: for extended dtypes (typed PRNG keys) and other widths.
  """
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


def unpack_array(y: jax.Array, spec: Any, after: Any = None) -> jax.Array:
  """Inverse of ``pack_array`` given the original shape and dtype.

  Args:
    y: a packed array.
    spec: the original array's shape and dtype (e.g. a
      ``jax.ShapeDtypeStruct``).
    after: arrays to wait for, or None: an integer array is then unpacked
      only once they exist (``ordering.after``). XLA:CPU materialises the
      bit-cast of 8-bit codes, and would otherwise do it for every leaf at
      the start of the step and keep them. Pass one small array (e.g. an
      ``ordering.zero_after`` scalar) when many arrays wait for the same
      large one.

  Returns:
    The original array, bit for bit.
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
  if after is not None:
    x = ordering.after(x, after)  # before a bool is made of it
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
  return jax.tree.map(pack_array, state)


def pack_leaves(state: Any) -> tuple[jax.Array, ...]:
  """``pack_state``'s arrays as a flat tuple, in ``jax.tree.leaves`` order.

  A unit's optimizer state is ``tx``'s state of a tree holding that unit
  only: every other parameter is a masked node inside it, so a state tree
  per leaf has as many nodes as the whole parameter tree (LLaMA-60M: 300
  per leaf, 22,575 for the step's state, unflattened in Python after every
  step). Its structure is known (``Layout.specs``), so only its arrays are
  stored.

  Args:
    state: as for ``pack_state``.

  Returns:
    The packed arrays.
  """
  return tuple(jax.tree.leaves(pack_state(state)))


def unpack_leaves(packed: Any, spec: Any, after: Any = None) -> Any:
  """Inverse of ``pack_leaves``.

  Args:
    packed: ``pack_leaves``' arrays.
    spec: the unpacked tree's shapes and dtypes.
    after: as for ``unpack_array``.

  Returns:
    The original tree, bit for bit.
  """
  specs, treedef = jax.tree.flatten(spec)
  return treedef.unflatten([unpack_array(y, s, after)
                            for y, s in zip(packed, specs, strict=True)])


def unpack_state(packed: Any, spec: Any) -> Any:
  """Inverse of ``pack_state``.

  Args:
    packed: a tree from ``pack_state``.
    spec: the unpacked tree's shapes and dtypes (e.g. from
      ``jax.eval_shape``), same structure.

  Returns:
    The original tree, bit for bit.
  """
  return jax.tree.map(unpack_array, packed, spec)
