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


def check_real_leaf(name: str, leaf: Any, reason: str) -> None:
  """Raises a ValueError naming a complex parameter leaf.

  Args:
    name: the leaf's dotted path name.
    leaf: the leaf (an array or abstract value).
    reason: what cannot handle it and what to do instead, for the message.
  """
  if jnp.issubdtype(getattr(leaf, "dtype", np.float32), jnp.complexfloating):
    raise ValueError(f"Parameter {name!r} has dtype {leaf.dtype}: {reason}")


# The step counters are int32: a count-like argument beyond it overflows
# where it meets them.
INT32_MAX = 2**31 - 1


def check_step_count(name: str, value: Any, *, hint: str = "") -> int:
  """``check_positive_int``, at most ``INT32_MAX`` (it meets int32 counts).

  Args:
    name: the argument's name, for the message.
    value: the value given.
    hint: an extra sentence appended to the message.

  Returns:
    The value as a Python ``int``.
  """
  value = check_positive_int(name, value, hint=hint)
  if value > INT32_MAX:
    raise ValueError(
        f"{name} must be at most 2**31 - 1 = {INT32_MAX} (it is compared "
        f"with an int32 step count), got {value}. {hint}".rstrip())
  return value


def check_seed(name: str, value: Any) -> int | jax.Array:
  """Returns ``value`` as a Python int if it is a valid PRNG seed.

  Args:
    name: the argument's name, for the message.
    value: the value given.

  Returns:
    The seed, an int in ``[-2**63, 2**63)`` (what ``jax.random.key`` takes),
    or an integer scalar array as given (``optax.inject_hyperparams`` turns
    numeric arguments into arrays; ``jax.random.key`` takes those too).
  """
  if (isinstance(value, (jax.Array, np.ndarray)) and value.ndim == 0
      and jnp.issubdtype(value.dtype, jnp.integer)):
    return value
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or
      not -2**63 <= value < 2**63):
    raise ValueError(
        f"{name} must be an integer in [-2**63, 2**63), got {value!r}.")
  return int(value)


def check_bool(name: str, value: Any) -> bool:
  """Returns ``value`` if it is a bool, else raises a ValueError."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be True or False, got {value!r}.")
  return bool(value)


def check_learning_rate(value: Any) -> Any:
  """A schedule (callable), an array, or a finite number >= 0.

  Args:
    value: the learning rate given.

  Returns:
    ``value`` unchanged.
  """
  if callable(value):
    return value
  return check_number_in_range("learning_rate", value, low=0.0)


def check_float_dtype(name: str, value: Any, *,
                      allow_none: bool = False) -> Any:
  """Returns ``value`` as a floating ``np.dtype`` (or None if allowed).

  Args:
    name: the argument's name, for the message.
    value: the value given.
    allow_none: whether None is accepted (and returned).

  Returns:
    The dtype, or None.
  """
  if value is None and allow_none:
    return None
  try:
    dtype = None if value is None else jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating dtype"
                     f"{' or None' if allow_none else ''}, got {value!r}.")
  return dtype
