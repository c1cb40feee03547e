"""Ordering work in XLA's schedule without changing any value.

XLA schedules an operation as soon as its operands exist. Where that is too
early (it would keep many large buffers alive at once, or copy a donated
weight before its last read), the only portable way to make an operation wait
is a data dependency: ``after(x, *deps)`` returns ``x`` unchanged in value,
but computed from an exact zero that XLA cannot fold away and that depends on
every ``dep``. Everything that consumes the result then runs after the deps
exist.

The zero is ``0 * s`` for a float32 sum ``s`` of the deps whose non-finite
values are replaced by zero first (a float times zero is NaN for NaN or
infinite floats, so XLA may not fold it, and zeroing those makes the product
exactly zero). Reading a large dep in full costs a pass over it; to wait for
an array made by an operation that XLA does not fuse (a product, a loop, a
decomposition) pass ``first_element(y)``, which XLA can only compute once ``y``
exists.

This is the library's one ordering trick: every site that needs XLA to order
work uses it (``galore_project``'s back-projections, the per-layer step's
backward rules, int8 weights' rounding noise).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def first_element(x: jax.Array) -> jax.Array:
  """The first element of ``x`` as a ``(1,)`` array (empty if ``x`` is).

  Args:
    x: any array.

  Returns:
    A one-element (or, for an empty ``x``, zero-element) view of ``x``, a
    cheap dependency on ``x`` for ``after`` when ``x`` is made by an
    operation XLA does not fuse into its consumers.
  """
  if not x.size:
    return jnp.zeros((0,), x.dtype)
  return jax.lax.slice(x, (0,) * x.ndim, (1,) * x.ndim).reshape(1)


def zero_after(*deps: Any) -> jax.Array:
  """A float32 scalar zero that data-depends on every array leaf of ``deps``.

  Args:
    *deps: arrays or pytrees of arrays (non-array leaves are ignored).

  Returns:
    An exact float32 ``0`` (for any values of ``deps``, NaN and infinities
    included) that XLA computes only once every dep exists.
  """
  sums = [jnp.sum(x, dtype=jnp.float32).reshape(1)
          for x in jax.tree.leaves(deps)
          if isinstance(x, jax.Array) and x.size]
  if not sums:
    return jnp.zeros([], jnp.float32)
  # One array and one reduction: a chain of scalar adds takes XLA's
  # simplifier many more rounds to compile.
  s = jnp.concatenate(sums) if len(sums) > 1 else sums[0]
  finite = jax.lax.select(jax.lax.is_finite(s), s, jnp.zeros_like(s))
  return jnp.max(finite * 0)


def after(x: Any, *deps: Any) -> Any:
  """``x`` unchanged, computed only once every array of ``deps`` exists.

  Args:
    x: an array, a Python number or a pytree of them; each numeric leaf gets
      an exact zero added (cast to its dtype), so values and dtypes are
      unchanged, except that a float ``-0.0`` comes back as ``0.0`` and
      XLA:CPU flushes subnormal floats to zero: pass integers as integers,
      not bit-cast to floats. (Adding an integer zero to a float's bits
      would keep them, but XLA:CPU then no longer fuses the tie into the
      products that read it: 8% slower fused per-layer steps.)
    *deps: arrays or pytrees of arrays to wait for.

  Returns:
    ``x``, with every leaf data-dependent on ``deps``.

  References:
    XLA schedules by data dependencies only; ``jax.lax.optimization_barrier``
    also orders work but keeps ``x`` from fusing into its consumers.
  """
  zero = zero_after(*deps)

  def tie(leaf: Any) -> Any:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.number):
      return leaf  # e.g. float0 cotangents
    return leaf + zero.astype(dtype)

  return jax.tree.map(tie, x)
