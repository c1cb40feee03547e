"""Flat lists of leaves split by a mask, and ``float0`` cotangents.

The per-layer step's custom_vjp rules take a layer's leaves apart (the
step's own leaves from the others, floating leaves from integer ones) and put
them back in their original order; integer inputs get ``float0`` cotangents.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_float(x: Any) -> bool:
  """Whether ``x`` has a floating (or complex) dtype.

  Args:
    x: an array.

  Returns:
    True for inexact dtypes (float0 is not one).
  """
  return jnp.issubdtype(x.dtype, jnp.inexact)


def select(xs: Sequence[Any], mask: Sequence[bool]) -> list[Any]:
  """The items of ``xs`` where ``mask`` is true.

  Args:
    xs: a sequence.
    mask: one bool per item.

  Returns:
    A list of the selected items, in order.
  """
  return [x for x, m in zip(xs, mask) if m]


def interleave(mask: Sequence[bool], yes: Sequence[Any],
               no: Sequence[Any]) -> list[Any]:
  """Items of ``yes`` where ``mask`` is true and of ``no`` elsewhere.

  Args:
    mask: one bool per output item.
    yes: as many items as ``mask`` has true entries.
    no: as many items as ``mask`` has false entries.

  Returns:
    The merged list (the inverse of ``select`` by ``mask`` and by its
    negation).
  """
  it_yes, it_no = iter(yes), iter(no)
  return [next(it_yes) if m else next(it_no) for m in mask]


def merge(xs: Sequence[Any], mask: Sequence[bool],
          new: Sequence[Any]) -> list[Any]:
  """``xs`` with the items where ``mask`` is true replaced by ``new``.

  Args:
    xs: a sequence.
    mask: one bool per item of ``xs``.
    new: the replacements, in order.

  Returns:
    A list as long as ``xs``.
  """
  return interleave(mask, new, select(xs, [not m for m in mask]))


def float0_like(x: Any) -> np.ndarray:
  """The ``float0`` cotangent of an integer (or other non-float) input.

  Args:
    x: an array or array-like.

  Returns:
    A NumPy ``float0`` array of ``x``'s shape.
  """
  return np.zeros(np.shape(x), dtype=jax.dtypes.float0)


def float0_tree(tree: Any) -> Any:
  """``float0_like`` of every leaf of ``tree``.

  Args:
    tree: a pytree of arrays (e.g. PRNG key data).

  Returns:
    The same structure with ``float0`` leaves.
  """
  return jax.tree.map(float0_like, tree)
