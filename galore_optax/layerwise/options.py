"""The per-layer step's options, checked once when the step is built."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import numpy as np

from galore_optax import targets
from galore_optax._checks import check_bool
from galore_optax._checks import check_float_dtype
from galore_optax._checks import check_number_in_range
from galore_optax._checks import check_positive_int
from galore_optax._checks import check_step_count

PerLayerSpec = Union[None, str, Sequence[str], Callable[[str], bool]]


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What ``make_layerwise_step``'s keyword arguments ask for.

  Attributes:
    clip_norm: the largest Frobenius norm of a leaf's gradient, or None.
    accumulate_steps: micro-batches per update (1: none).
    accumulate_dtype: dtype of the gradient accumulators.
    weight_dtype: dtype that int8 leaves are dequantised to.
    per_layer: the ``per_layer`` argument as given (for messages).
    is_per_layer: whether a leaf name is a ``per_layer`` stacked leaf.
    chunk_rules: ``(matcher, k)`` pairs from ``row_chunks``, in order.
    fused: make projected kernels' low-rank gradients in ``dense`` from the
      product's inputs between refreshes.
    recompute: True: recompute each ``call_layer`` layer in its backward
      pass; False: keep its forward pass's residuals; a ``jax.checkpoint``
      policy: keep what the policy saves, recompute the rest.
  """

  clip_norm: float | None
  accumulate_steps: int
  accumulate_dtype: np.dtype
  weight_dtype: np.dtype
  per_layer: PerLayerSpec
  is_per_layer: Callable[[str], bool]
  chunk_rules: tuple[tuple[Callable[[str], bool], int], ...]
  fused: bool = False
  recompute: bool | Callable[..., bool] = True

  @property
  def checkpoint_policy(self) -> Callable[..., bool] | None:
    """``recompute``'s ``jax.checkpoint`` policy, or None for a bool."""
    return None if isinstance(self.recompute, bool) else self.recompute

  def row_chunks(self, name: str) -> int:
    """How many blocks of rows leaf ``name`` is updated in (1: whole).

    Args:
      name: a leaf's dotted name.

    Returns:
      The ``k`` of the first ``row_chunks`` entry that matches, else 1.
    """
    return next((k for match, k in self.chunk_rules if match(name)), 1)


def make_options(
    *,
    clip_norm: float | None,
    accumulate_steps: int,
    accumulate_dtype: Any,
    per_layer: PerLayerSpec,
    row_chunks: Mapping[str, int] | None,
    weight_dtype: Any,
    fused: bool = False,
    recompute: bool | Callable[..., bool] = True,
) -> StepOptions:
  """Checks ``make_layerwise_step``'s options (see its docstring).

  Args:
    clip_norm: a positive number or None.
    accumulate_steps: a positive int.
    accumulate_dtype: any dtype.
    per_layer: None, a regex, a list of names/substrings/regexes, or a
      predicate on names.
    row_chunks: ``{name: k}`` with positive ints ``k``, or None.
    weight_dtype: a floating dtype.
    fused: a bool.
    recompute: a bool or a ``jax.checkpoint`` policy (a callable).

  Returns:
    The options.

  Raises:
    ValueError: for invalid values.
  """
  k = check_step_count("accumulate_steps", accumulate_steps)
  if clip_norm is not None:
    check_number_in_range("clip_norm", clip_norm, low=0.0,
                          low_inclusive=False)
  chunk_rules = []
  for key, value in (row_chunks or {}).items():
    chunk_rules.append((targets.make_matcher([key]),
                        check_positive_int(f"row_chunks[{key!r}]", value)))
  if per_layer is None:
    is_per_layer = lambda name: False
  elif callable(per_layer):
    is_per_layer = per_layer
  else:
    is_per_layer = targets.make_matcher(per_layer)
  accumulate_dtype = check_float_dtype("accumulate_dtype", accumulate_dtype)
  weight_dtype = check_float_dtype("weight_dtype", weight_dtype)
  check_bool("fused", fused)
  if isinstance(recompute, (bool, np.bool_)):
    recompute = bool(recompute)
  elif not callable(recompute):
    raise ValueError("recompute must be True, False or a jax.checkpoint "
                     f"policy (e.g. jax.checkpoint_policies.dots_saveable), "
                     f"got {recompute!r}.")
  return StepOptions(clip_norm, k, accumulate_dtype, weight_dtype,
                     per_layer, is_per_layer, tuple(chunk_rules), fused,
                     recompute)
