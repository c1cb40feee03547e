"""Argument checks shared by the factories: fail at construction, not in jit."""

from __future__ import annotations

import numbers
from collections.abc import Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_positive_int(name: str, value: Any, *, hint: str = "") -> int:
  """Returns ``value`` as a Python int, or raises a ValueError naming it.

  Args:
    name: the argument's name, for the message.
    value: the value given.
    hint: an extra sentence appended to the message.

  Returns:
    The value as a Python ``int``.
  """
  if isinstance(value, (jax.Array, np.ndarray)) and not isinstance(
      value, np.generic
  ):
    raise ValueError(
        f"{name} must be a static Python int because it fixes array shapes or"
        f" the refresh schedule, got an array {value!r}. With"
        " optax.inject_hyperparams, list it in static_args, e.g."
        f" static_args=({name!r},). {hint}".rstrip()
    )
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(
        f"{name} must be a positive integer, got {value!r}"
        f" ({type(value).__name__}). {hint}".rstrip()
    )
  if value <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value}. {hint}"
                     .rstrip())
  return int(value)


def check_floating_dtype(name: str, dtype: Any) -> np.dtype:
  """Returns ``dtype`` as a NumPy dtype if floating, else raises ValueError.

  Args:
    name: the argument's name, for the message.
    dtype: the value given.

  Returns:
    The dtype.
  """
  try:
    canonical = jnp.dtype(dtype)
  except TypeError:
    canonical = None
  if canonical is None or not jnp.issubdtype(canonical, jnp.floating):
    raise ValueError(f"{name} must be a floating dtype such as jnp.float32, "
                     f"got {dtype!r}.")
  return canonical


def check_choice(name: str, value: Any, choices: Collection[str]) -> str:
  """Returns ``value`` if it is one of ``choices``, else raises a ValueError."""
  if not isinstance(value, str) or value not in choices:
    raise ValueError(
        f"{name} must be one of {sorted(choices)}, got {value!r}."
    )
  return value


def check_finite_number(name: str, value: Any) -> Any:
  """Rejects non-numeric or non-finite Python numbers; lets arrays through."""
  if isinstance(value, (jax.Array, np.ndarray)):
    return value  # may be a traced hyper-parameter (inject_hyperparams)
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"{name} must be a real number, got {value!r}.")
  if not np.isfinite(value):
    raise ValueError(f"{name} must be finite, got {value!r}.")
  return value


def check_number_in_range(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> Any:
  """Like ``check_finite_number``, and within ``[low, high]``.

  Arrays (possibly traced hyper-parameters) are let through unchecked.

  Args:
    name: the argument's name, for the message.
    value: the value given.
    low: the lower bound, or ``None`` for none.
    high: the upper bound, or ``None`` for none.
    low_inclusive: whether ``value == low`` is allowed.
    high_inclusive: whether ``value == high`` is allowed.

  Returns:
    ``value`` unchanged.
  """
  check_finite_number(name, value)
  if isinstance(value, (jax.Array, np.ndarray)):
    return value
  too_low = low is not None and (value < low or
                                 (not low_inclusive and value == low))
  too_high = high is not None and (value > high or
                                   (not high_inclusive and value == high))
  if too_low or too_high:
    left = ("(-inf" if low is None else
            ("[" if low_inclusive else "(") + f"{low}")
    right = ("inf)" if high is None else
             f"{high}" + ("]" if high_inclusive else ")"))
    raise ValueError(f"{name} must be in {left}, {right}, got {value!r}.")
  return value
