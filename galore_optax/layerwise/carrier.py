"""int8 weights as cotangents: their codes bit-cast to an 8-bit float.

The per-layer step returns each leaf's new stored value as the cotangent of
that leaf, and cotangents must be floating point. An int8 leaf
(``weight_quantization.QuantizedWeight``) therefore crosses the backward
pass with its codes bit-cast to float8: same width, so XLA emits no copy.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from galore_optax import weight_quantization

CARRIER_DTYPE = jnp.float8_e4m3fn


def to_carrier(q: weight_quantization.QuantizedWeight) -> Any:
  """An int8 weight with its codes bit-cast to ``CARRIER_DTYPE``.

  Args:
    q: the stored weight.

  Returns:
    The same weight, codes in a floating dtype.
  """
  return q._replace(codes=jax.lax.bitcast_convert_type(q.codes,
                                                       CARRIER_DTYPE))


def from_carrier(q: Any) -> weight_quantization.QuantizedWeight:
  """Inverse of ``to_carrier``.

  Args:
    q: a weight from ``to_carrier``.

  Returns:
    The weight with int8 codes.
  """
  return q._replace(codes=jax.lax.bitcast_convert_type(q.codes, jnp.int8))
