"""How projectors are stored between refreshes: float32, bfloat16, int8, int4.

Projector factors are computed and used in float32; between refreshes they
are kept in the storage dtype chosen by ``projector_dtype``. ``int8`` keeps
each factor as a ``quantization.QuantizedArray`` (8-bit codes on the signed
dynamic map plus one float32 scale per block of ``BLOCK_SIZE`` values, as
bitsandbytes stores first moments: orthonormal factors are dense and
sign-balanced). ``int4`` is Q-GaLore's projector quantisation
(``Int4Array``): each matrix of the factor, flattened row-major, is cut into
groups of ``BLOCK_SIZE`` values, each quantised asymmetrically to 16 levels
by round-to-nearest (``q = clip(round(x / s) + z, 0, 15)`` with
``s = max(hi - lo, 1e-5) / 15`` and zero point ``z = clip(-round(lo / s), 0,
15)``), two codes to a byte. ``galore_project`` and the per-layer step both
go through ``store`` and ``load``, so a stored projector is read the same way
everywhere.

References:
  Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022,
  arXiv 2110.02861.
  Zhang et al., "Q-GaLore: Quantized GaLore with INT4 Projection and
  Layer-Adaptive Low-Rank Gradients", 2024, arXiv 2407.08296
  (``q_galore_torch.GaLoreProjector._quantize``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galore_optax import projection
from galore_optax import quantization

PROJECTOR_DTYPES = ("float32", "bfloat16", "int8", "int4")
# Values per float32 scale of an int8 factor (and per group of an int4 one).
BLOCK_SIZE = 256
# Largest int4 code (16 levels).
_INT4_MAX = 15


class Int4Array(NamedTuple):
  """A float32 factor of shape ``(*batch, rows, cols)`` stored in 4 bits.

  Attributes:
    codes: uint8 ``(*batch, rows, ceil(cols / 2))``, two 4-bit codes per
      byte (column ``2j`` in the low nibble, ``2j + 1`` in the high one).
    scales: float32 ``(*batch, groups)``, one step size per group of
      ``BLOCK_SIZE`` consecutive values of each matrix (row-major).
    zeros: uint8 ``(*batch, groups)``, each group's zero point (0..15).
  """

  codes: jax.Array
  scales: jax.Array
  zeros: jax.Array


class Int4ArrayOddColumns(Int4Array):
  """An ``Int4Array`` whose factor has an odd number of columns (the last
  byte of each row holds one code): the type keeps the shape static."""


def _int4_groups(x: jax.Array) -> jax.Array:
  """Each matrix of ``x`` flattened, padded with its last value to whole
  groups (which leaves every group's min and max unchanged), as
  ``(*batch, groups, BLOCK_SIZE)``."""
  *batch, rows, cols = x.shape
  size = rows * cols
  groups = -(-size // BLOCK_SIZE)
  flat = x.reshape(*batch, size)
  flat = jnp.pad(flat, [(0, 0)] * len(batch) + [(0, groups * BLOCK_SIZE
                                                  - size)], mode="edge")
  return flat.reshape(*batch, groups, BLOCK_SIZE)


def quantize_int4(x: jax.Array) -> Int4Array:
  """Q-GaLore's group-wise asymmetric int4 quantisation of a factor.

  Args:
    x: ``(*batch, rows, cols)`` float32 factor.

  Returns:
    Its ``Int4Array`` (``Int4ArrayOddColumns`` for odd ``cols``).
  """
  *batch, rows, cols = x.shape
  groups = _int4_groups(x.astype(jnp.float32))
  hi = jnp.max(groups, axis=-1, keepdims=True)
  lo = jnp.min(groups, axis=-1, keepdims=True)
  scales = jnp.maximum(hi - lo, 1e-5) / _INT4_MAX
  zeros = jnp.clip(-jnp.round(lo / scales), 0, _INT4_MAX)
  q = jnp.clip(jnp.round(groups / scales) + zeros, 0, _INT4_MAX)
  q = q.astype(jnp.uint8).reshape(*batch, -1)[..., :rows * cols]
  q = q.reshape(*batch, rows, cols)
  if cols % 2:
    q = jnp.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, 1)])
  kind = Int4ArrayOddColumns if cols % 2 else Int4Array
  return kind(codes=q[..., 0::2] | (q[..., 1::2] << 4),
              scales=scales[..., 0], zeros=zeros[..., 0].astype(jnp.uint8))


def dequantize_int4(q: Int4Array) -> jax.Array:
  """``scales * (code - zero)`` per group, in float32, as the reference.

  Args:
    q: an ``Int4Array``.

  Returns:
    The ``(*batch, rows, cols)`` float32 factor.
  """
  *batch, rows, cols = int4_shape(q)
  codes = jnp.stack([q.codes & 0xF, q.codes >> 4], axis=-1)
  codes = codes.reshape(*batch, rows, -1)[..., :cols]
  groups = _int4_groups(codes)
  values = q.scales[..., None] * (groups.astype(jnp.float32) -
                                  q.zeros[..., None].astype(jnp.float32))
  return values.reshape(*batch, -1)[..., :rows * cols].reshape(
      *batch, rows, cols)


def int4_shape(q: Int4Array) -> tuple[int, ...]:
  """The shape of the float32 factor that ``q`` stores.

  Args:
    q: an ``Int4Array``.

  Returns:
    ``(*batch, rows, cols)``.
  """
  *batch, rows, half = q.codes.shape
  return (*batch, rows, 2 * half - isinstance(q, Int4ArrayOddColumns))


def store(projector: projection.Projector,
          dtype: str) -> projection.Projector:
  """Float32 factors -> their storage.

  Args:
    projector: float32 factors (an unused side is ``optax.MaskedNode``).
    dtype: one of ``PROJECTOR_DTYPES``.

  Returns:
    The projector with each factor cast to ``dtype``, or, for ``"int8"``,
    quantised to a ``quantization.QuantizedArray`` (``"int4"``: an
    ``Int4Array``).
  """
  if dtype == "int8":
    return jax.tree.map(
        lambda x: quantization.quantize(x, True, BLOCK_SIZE), projector)
  if dtype == "int4":
    return jax.tree.map(quantize_int4, projector)
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
  if isinstance(factor, Int4Array):
    return dequantize_int4(factor)
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
  if isinstance(factor, Int4Array):
    return int4_shape(factor)
  return tuple(factor.shape)


def matrices_selectable(dtype: str, batch_shape: tuple[int, ...]) -> bool:
  """Whether ``select_matrices`` works on a leaf's stored projectors.

  Args:
    dtype: the storage dtype.
    batch_shape: the leaf's batch shape (stacked matrices).

  Returns:
    False for int8 factors of a stacked leaf (their blocks of
    ``BLOCK_SIZE`` values may span matrices), True otherwise.
  """
  return dtype != "int8" or math.prod(batch_shape) <= 1


def select_matrices(take_new: jax.Array, new: projection.Projector,
                    old: projection.Projector) -> projection.Projector:
  """Per matrix of a (stacked) leaf, ``new`` where ``take_new`` else ``old``.

  Selects stored values, so a matrix that keeps its projector keeps its
  stored bits (it is not re-quantised).

  Args:
    take_new: boolean of the leaf's batch shape.
    new: a stored projector.
    old: a stored projector of the same storage (see
      ``matrices_selectable``).

  Returns:
    The stored projector.
  """
  if take_new.size == 1:
    return jax.tree.map(lambda a, b: jnp.where(take_new.reshape(()), a, b),
                        new, old)

  def pick(a: jax.Array, b: jax.Array) -> jax.Array:
    mask = take_new.reshape(take_new.shape + (1,) * (a.ndim - take_new.ndim))
    return jnp.where(mask, a, b)

  return jax.tree.map(pick, new, old)


def store_refreshed(new: projection.Projector, old: projection.Projector,
                    dtype: str) -> projection.Projector:
  """Stores a refreshed float32 projector; a matrix whose projector did not
  change (a skipped refresh keeps the previous one) keeps its stored bits.

  Storing a loaded projector again gives the same storage for float32,
  bfloat16 and int8, but not for int4: the reference's asymmetric rounding
  moves a dequantised group's minimum and maximum, so each re-quantisation
  would drift. Only int4 is selected; the others are stored as they are.

  Args:
    new: the refreshed float32 projector.
    old: the stored projector it replaces.
    dtype: one of ``PROJECTOR_DTYPES``.

  Returns:
    The stored projector.
  """
  stored = store(new, dtype)
  if dtype != "int4":
    return stored
  changed = None
  for a, b in zip(new, load(old)):
    if not isinstance(a, optax.MaskedNode):
      differs = jnp.any(a != b, axis=(-2, -1))
      changed = differs if changed is None else changed | differs
  return select_matrices(changed, stored, old)
