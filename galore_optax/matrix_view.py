"""How ``galore_project`` sees a leaf as a batch of matrices.

By default a leaf of shape ``(*batch, m, n)`` is its own view. ``matrix_axes``
(``{name: (row_axes, col_axes)}``) names other axes for some leaves, e.g. an
attention kernel stored as ``(d_model, heads, head_dim)`` projected as the
``d_model x (heads * head_dim)`` matrix: the leaf is transposed to (batch
axes, row axes, column axes) and reshaped to ``(*batch, m, n)``, and its
update is reshaped and transposed back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax

from galore_optax import targets

# ``{name: (row_axes, col_axes)}``: which axes of a leaf form its matrix.
MatrixAxes = Mapping[str, tuple[Sequence[int], Sequence[int]]]


class MatrixView(NamedTuple):
  """How a leaf is seen as a batch of matrices: transpose, then reshape.

  Attributes:
    perm: the leaf's batch axes, then its row axes, then its column axes.
    shape: ``(*batch, m, n)``, the shape after the transpose and reshape.
  """

  perm: tuple[int, ...]
  shape: tuple[int, ...]


def is_matrix_axes(matrix_axes: Any) -> bool:
  """Whether ``matrix_axes`` is None or a ``{str: (rows, cols)}`` mapping.

  Args:
    matrix_axes: the argument given to ``galore_project``.

  Returns:
    True if it has the form of ``MatrixAxes`` (the axes themselves are
    checked against each leaf by ``matrix_views``).
  """
  return matrix_axes is None or (
      isinstance(matrix_axes, Mapping) and
      all(isinstance(k, str) and isinstance(v, (tuple, list)) and len(v) == 2
          for k, v in matrix_axes.items()))


def _view(key: str, axes: Any, name: str, shape: tuple[int, ...]) -> MatrixView:
  """The view of one leaf by the rule ``matrix_axes[key] = axes``."""
  ndim = len(shape)
  try:
    rows, cols = ([int(a) % ndim if -ndim <= int(a) < ndim else None
                   for a in group] for group in axes)
  except (TypeError, ValueError):
    rows = cols = [None]
  if (None in rows + cols or not rows or not cols or
      len(set(rows + cols)) != len(rows + cols)):
    raise ValueError(
        f"matrix_axes[{key!r}] = {axes!r} for leaf {name!r} of shape "
        f"{tuple(shape)}: expected (row_axes, col_axes), two non-empty "
        "disjoint lists of that leaf's axes.")
  batch = [a for a in range(ndim) if a not in rows + cols]
  view_shape = (*(shape[a] for a in batch),
                math.prod(shape[a] for a in rows),
                math.prod(shape[a] for a in cols))
  return MatrixView(tuple(batch + rows + cols), view_shape)


def matrix_views(matrix_axes: MatrixAxes | None, names: list[str],
                 leaves: list[Any]) -> list[MatrixView | None]:
  """Per leaf, its ``MatrixView`` from the first matching rule, or None.

  Args:
    matrix_axes: ``{name: (row_axes, col_axes)}``; module names match as
      one ``target_modules`` entry (equal, substring or full regex) and the
      first matching key wins.
    names: the leaves' dotted path names.
    leaves: the leaves (anything with a ``shape``).

  Returns:
    Per leaf, its view, or None where no rule matches (its last two axes
    are its matrix).

  Raises:
    ValueError: if a rule's axes do not fit a leaf it matches, or a key
      matches no leaf.
  """
  rules = [(key, targets.make_matcher([key]), axes)
           for key, axes in (matrix_axes or {}).items()]
  used = set()
  out = []
  for name, leaf in zip(names, leaves):
    rule = next((r for r in rules if r[1](name)), None)
    if rule is None:
      out.append(None)
      continue
    key, _, axes = rule
    used.add(key)
    out.append(_view(key, axes, name, tuple(leaf.shape)))
  unused = [key for key, _, _ in rules if key not in used]
  if unused:
    raise ValueError(f"matrix_axes keys {unused} match no leaf; some names: "
                     f"{names[:10]}.")
  return out


def to_matrix(x: jax.Array, view: MatrixView | None) -> jax.Array:
  """``x`` seen through ``view`` (``x`` itself for None).

  Args:
    x: a leaf.
    view: its view, or None.

  Returns:
    The ``(*batch, m, n)`` array.
  """
  return x if view is None else x.transpose(view.perm).reshape(view.shape)


def from_matrix(x: jax.Array, view: MatrixView | None,
                shape: tuple[int, ...]) -> jax.Array:
  """Inverse of ``to_matrix``.

  Args:
    x: a ``(*batch, m, n)`` array.
    view: the view it was made with, or None.
    shape: the leaf's own shape.

  Returns:
    ``x`` in the leaf's shape and axis order.
  """
  if view is None:
    return x
  permuted = x.reshape(tuple(shape[a] for a in view.perm))
  inverse = sorted(range(len(view.perm)), key=view.perm.__getitem__)
  return permuted.transpose(inverse)
