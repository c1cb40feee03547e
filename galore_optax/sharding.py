"""Sharding queries: is an array sharded over ``Explicit`` mesh axes?

Under ``Explicit`` mesh axes the sharding is part of an array's type, and
some operations need to be told about it: decompositions refuse matrices
sharded on their matrix dimensions, products over a sharded axis need an
output sharding, reshapes that split a sharded axis need one too, and the
branches of a ``cond`` (and the carry of a loop) must agree on it
(``with_sharding_of``).
``Auto`` axes are handled by the compiler and do not show in the type, so
an array sharded only over them counts as not explicitly sharded.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding


def explicit_sharding(x: jax.Array) -> NamedSharding | None:
  """``x``'s sharding if it is sharded over ``Explicit`` mesh axes.

  Args:
    x: an array or tracer.

  Returns:
    The ``NamedSharding`` of ``x``'s type when at least one of its axes is
    sharded over an ``Explicit`` mesh axis; None otherwise (no mesh, or
    only ``Auto`` axes, or replicated).
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  if (not isinstance(sharding, NamedSharding) or sharding.mesh.empty or
      all(entry is None for entry in sharding.spec)):
    return None
  return sharding


def is_explicitly_sharded(x: jax.Array) -> bool:
  """Whether ``x`` is sharded over an ``Explicit`` mesh axis.

  Args:
    x: an array or tracer.

  Returns:
    ``explicit_sharding(x) is not None``.
  """
  return explicit_sharding(x) is not None


def with_sharding_of(x: jax.Array, like: jax.Array) -> jax.Array:
  """``x`` resharded to ``like``'s sharding where ``Explicit`` axes make it
  part of the type.

  ``x`` must have ``like``'s shape. A value that takes the place of a state
  (a ``cond`` branch, a loop's carry) must have the state's type, but an
  element-wise operation takes the sharding of whichever operand is sharded:
  e.g. a per-layer mask computed from a gradient sharded over its layer axis
  shards a projector the state holds replicated.

  Args:
    x: an array or tracer.
    like: an array or tracer of the same shape whose type ``x`` must have.

  Returns:
    ``x`` itself if neither is sharded over ``Explicit`` axes (``Auto``
    shardings are not part of the type); otherwise ``x`` resharded to
    ``like``'s partition spec (replicated if ``like`` is).
  """
  if not (is_explicitly_sharded(x) or is_explicitly_sharded(like)):
    return x
  return jax.sharding.reshard(x, jax.typeof(like).sharding.spec)
