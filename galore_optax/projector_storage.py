"""How projectors are stored between refreshes: float32, bfloat16 or int8.

Projector factors are computed and used in float32; between refreshes they
are kept in the storage dtype chosen by ``projector_dtype``. ``int8`` keeps
each factor as a ``quantization.QuantizedArray`` (8-bit codes on the signed
dynamic map plus one float32 scale per block of ``BLOCK_SIZE`` values, as
bitsandbytes stores first moments: orthonormal factors are dense and
sign-balanced). ``galore_project`` and the per-layer step both go through
``store`` and ``load``, so a stored projector is read the same way everywhere.

References:
  Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022,
  arXiv 2110.02861.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from galore_optax import projection
from galore_optax import quantization

PROJECTOR_DTYPES = ("float32", "bfloat16", "int8")
# Values per float32 scale of an int8 factor.
BLOCK_SIZE = 256


def store(projector: projection.Projector,
          dtype: str) -> projection.Projector:
  """Float32 factors -> their storage.

  Args:
    projector: float32 factors (an unused side is ``optax.MaskedNode``).
    dtype: one of ``PROJECTOR_DTYPES``.

  Returns:
    The projector with each factor cast to ``dtype``, or, for ``"int8"``,
    quantised to a ``quantization.QuantizedArray``.
  """
  if dtype == "int8":
    return jax.tree.map(
        lambda x: quantization.quantize(x, True, BLOCK_SIZE), projector)
  return optax.tree.cast(projector, jnp.dtype(dtype))


def load_factor(factor: Any) -> Any:
  """One stored factor -> float32 (``optax.MaskedNode`` passes through).

  Args:
    factor: a stored factor, as ``store`` returns it.

  Returns:
    The factor as a float32 array.
  """
  if isinstance(factor, optax.MaskedNode):
    return factor
  if isinstance(factor, quantization.QuantizedArray):
    return quantization.dequantize(factor, True, BLOCK_SIZE)
  return factor.astype(jnp.float32)


def load(stored: projection.Projector) -> projection.Projector:
  """Stored factors -> float32 factors for the products and the refresh.

  Args:
    stored: a projector as ``store`` returns it, in any storage dtype.

  Returns:
    The float32 projector.
  """
  return projection.Projector(*(load_factor(f) for f in stored))


def factor_shape(factor: Any) -> tuple[int, ...]:
  """The shape of the float32 factor that ``factor`` stores.

  Args:
    factor: a stored factor (not a ``MaskedNode``).

  Returns:
    The factor's logical shape, whatever its storage.
  """
  if isinstance(factor, quantization.QuantizedArray):
    return tuple(factor.codes.shape)
  return tuple(factor.shape)
