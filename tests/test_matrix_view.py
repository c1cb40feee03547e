"""matrix_view: leaves seen as batches of matrices (``matrix_axes``)."""

import numpy as np
import pytest

from galore_optax import matrix_view


def test_views_transpose_and_reshape_and_invert():
  x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
  views = matrix_view.matrix_views({"w": ([2], [0, -1])}, ["w"], [x])
  (view,) = views
  # Batch axis 1, rows axis 2, columns axes 0 and 3.
  assert view == matrix_view.MatrixView((1, 2, 0, 3), (3, 4, 10))
  m = matrix_view.to_matrix(x, view)
  np.testing.assert_array_equal(m, x.transpose(1, 2, 0, 3).reshape(3, 4, 10))
  np.testing.assert_array_equal(matrix_view.from_matrix(m, view, x.shape), x)


def test_unmatched_leaves_have_no_view_and_the_first_rule_wins():
  leaves = [np.zeros((4, 6)), np.zeros((2, 3, 5)), np.zeros((3,)),
            np.zeros((2, 3, 5))]
  # "a" also matches "attn" (a substring), but "attn" comes first.
  views = matrix_view.matrix_views(
      {"attn": ([0], [1, 2]), "a": ([1], [0, 2])},
      ["mlp", "attn", "norm", "a_proj"], leaves)
  assert views[0] is None and views[2] is None
  assert views[1].shape == (2, 15)
  assert views[3].shape == (3, 10)
  x = leaves[0]
  assert matrix_view.to_matrix(x, None) is x
  assert matrix_view.from_matrix(x, None, x.shape) is x


@pytest.mark.parametrize("axes,match", [
    ({"w": ([0], [0])}, "disjoint"),
    ({"w": ([0], [])}, "non-empty"),
    ({"w": ([3], [1])}, "axes"),
    ({"w": (["a"], [1])}, "axes"),
    ({"nothing": ([0], [1])}, "match no leaf"),
])
def test_bad_rules_raise(axes, match):
  with pytest.raises(ValueError, match=match):
    matrix_view.matrix_views(axes, ["w"], [np.zeros((4, 3, 5))])


def test_is_matrix_axes():
  assert matrix_view.is_matrix_axes(None)
  assert matrix_view.is_matrix_axes({"q": ([0], [1, 2]), "o": [[0], [1]]})
  assert not matrix_view.is_matrix_axes(3)
  assert not matrix_view.is_matrix_axes({"q": [0]})
  assert not matrix_view.is_matrix_axes({0: ([0], [1])})
