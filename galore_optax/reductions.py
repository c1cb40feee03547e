"""Largest and smallest values along an axis, by one fusible reduction.

On XLA:CPU a plain ``max``, ``min`` or ``max(|x|)`` goes to a library kernel
that cannot fuse its input, so the producer of ``x`` (an optimizer's moment
update, a dequantisation) is written out first. One variadic reduction that
computes both extremes fuses its producer and is one kernel to compile
instead of two. The 8-bit block maxima, the int8 weights' group scales and
the projectors' sign canonicalisation all reduce through here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def max_and_min(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """``(max(x), min(x))`` along ``axis``, by one variadic reduction.

  On 16.4M values (timed ad hoc under ``jit`` on CPU) this was 1.8x faster
  than a separate max and min alone and 1.3x faster with an elementwise
  producer. NaN propagates.

  Args:
    x: a floating-point array.
    axis: the axis to reduce (negative counts from the end).

  Returns:
    Two arrays of ``x``'s shape without ``axis``.
  """
  return jax.lax.reduce(
      (x, x), (np.array(-np.inf, x.dtype), np.array(np.inf, x.dtype)),
      _max_min, (axis % x.ndim,))


def abs_max(x: jax.Array, axis: int) -> jax.Array:
  """``max(|x|)`` along ``axis``, as ``max(max(x), -min(x))`` (same value;
  see ``max_and_min`` for why).

  Args:
    x: a floating-point array.
    axis: the axis to reduce (negative counts from the end).

  Returns:
    ``x``'s shape without ``axis``.
  """
  x_max, x_min = max_and_min(x, axis)
  return jnp.maximum(x_max, -x_min)


def finite_abs_max(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """The largest finite magnitude along ``axis``, and whether a value is not
  finite, by one fusible reduction.

  NaN and infinities do not count in the maximum, so one of them does not
  hide the scale of the finite values beside it.

  Args:
    x: a floating-point array.
    axis: the axis to reduce (negative counts from the end).

  Returns:
    ``(largest |x| among finite entries (+0 if none), any entry NaN or
    infinite)``, two arrays of ``x``'s shape without ``axis``.
  """
  finite = jnp.isfinite(x)
  magnitude = jnp.where(finite, jnp.abs(x), jnp.zeros((), x.dtype))
  non_finite = jnp.where(finite, jnp.zeros((), x.dtype),
                         jnp.ones((), x.dtype))
  zero = np.array(0, x.dtype)
  largest, flag = jax.lax.reduce((magnitude, non_finite), (zero, zero),
                                 _max_max, (axis % x.ndim,))
  return largest, flag > 0


def _max_max(a: tuple[jax.Array, jax.Array],
             b: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
  return jnp.maximum(a[0], b[0]), jnp.maximum(a[1], b[1])


def _max_min(a: tuple[jax.Array, jax.Array],
             b: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
  # Module level: one function object, so jax caches its traced reducer.
  return jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])
