"""Block-wise 8-bit quantisation with the dynamic (exponent) code map.

An array is flattened row-major and cut into blocks of ``block_size``
consecutive values (blocks run across rows; the last block may be partial;
an array smaller than one block is one block of its own size, which decodes
the same values without padding it to ``block_size``). Each block is divided
by its largest magnitude (``absmax``, kept in float32) and every normalised
value is stored as the uint8 index of the nearest of 256 code values. The
dynamic map spends its codes on a logarithmic grid (7 decades below 1), so
small values keep a relative, not absolute, precision; that is what keeps
Adam's second moment and ``m / sqrt(v)`` usable in 8 bits.

This follows bitsandbytes' block-wise scheme: the code maps are identical to
``bitsandbytes.functional.create_dynamic_map`` bit for bit, the block
``absmax`` values are identical, and dequantisation is the same product. The
code chosen for a value is always the nearest one. bitsandbytes' CPU kernel
(0.50) searches coarsely below ~1% of the block maximum (it stores an exact 0
as 2.1e-5 * absmax with the signed map, for instance), so some codes differ
there, ours being the nearer ones.

Leading (batch) dimensions are part of the flattened array: a ``(k, m, n)``
array is quantised exactly like its ``(k * m * n,)`` flattening.

Non-finite values, per entry (blocks without one are coded as above, bit for
bit as bitsandbytes does):

* NaN, +inf and -inf are stored exactly and decode to themselves, whatever
  the map (the unsigned map, which stores finite negative values as 0, keeps
  -inf too). A value that overflowed before it got here (Adam's ``g**2`` for
  a float32 gradient beyond ~1.8e19, or a float64 value beyond the float32
  range, which becomes +-inf when cast) is such an infinity.
* They do not count in their block's ``absmax``: it is the largest *finite*
  magnitude of the block (0 if there is none), so the block's finite values
  are scaled as they would be without the non-finite ones. The block's stored
  ``absmax`` has its sign bit set (``-absmax``; ``-0.0`` when 0) to mark it.
* In a marked block the three codes just above the code of 0 (the map's
  smallest non-negative value) stand for +inf, -inf and NaN. Finite values
  whose nearest code is one of them take the nearer of the codes around the
  three instead: on the dynamic maps that moves values below about 2e-5 of
  the block maximum by at most that much. Every other finite value gets the
  code it would get without the non-finite values in the block.
* Finite values never overflow: normalised values lie in [-1, 1] and decode
  to at most the block maximum. A huge finite value is the block maximum and
  the small values of its block lose their relative precision (values below
  ~1e-7 of it decode to 0), as in any block-wise format.

Neighbouring blocks never depend on each other.

References:
  Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022,
  arXiv 2110.02861.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
import numpy as np

from galore_optax import reductions
from galore_optax._checks import check_positive_int

_BLOCK_SIZE_HINT = (
    "It is the number of consecutive values sharing one float32 absmax; "
    "bitsandbytes uses 64..4096 (256 for optimizer states).")


class QuantizedArray(NamedTuple):
  """An array stored as 8-bit codes and one float32 scale per block.

  The code map (signed or unsigned) and the block size are static settings
  of whoever owns the array, so only arrays are stored (jit, sharding and
  checkpoint friendly).

  Attributes:
    codes: uint8 array with the original array's shape.
    absmax: float32 array of shape ``(ceil(size / block_size),)``, the largest
      finite magnitude in each block, negated (sign bit set) for a block that
      holds NaN or an infinity (see the module docstring).
  """

  codes: jax.Array
  absmax: jax.Array


@functools.lru_cache(maxsize=None)
def _dynamic_map_np(signed: bool) -> np.ndarray:
  """The map as a read-only NumPy constant (built once per signedness)."""
  values = []
  for i in range(7):  # decades 1e-6 .. 1 (7 exponent "bits" of the format)
    n = 2**i + 1 if signed else 2**(i + 1) + 1
    # bitsandbytes builds the grid with float32 ``torch.linspace``, which
    # computes ``start + step * k`` (``end - step * (n - 1 - k)`` in the
    # upper half) with a fused multiply-add. That product and sum are exact
    # in float64, so one rounding to float32 reproduces it bit for bit.
    start, end = np.float32(0.1), np.float32(1.0)
    step = (end - start) / np.float32(n - 1)
    k = np.arange(n, dtype=np.float64)
    grid = np.where(k < n // 2,
                    np.float64(start) + np.float64(step) * k,
                    np.float64(end) - np.float64(step) * (n - 1 - k))
    grid = grid.astype(np.float32)
    means = (grid[:-1] + grid[1:]) / np.float32(2)
    # float32 scalar times float32 vector, as torch does for a Python scalar.
    scaled = np.float32(10.0**(i - 6)) * means
    values.append(scaled)
    if signed:
      values.append(-scaled)
  values.append(np.array([0.0, 1.0], np.float32))
  out = np.sort(np.concatenate(values).astype(np.float32))
  assert out.shape == (256,), out.shape
  out.setflags(write=False)
  return out


def create_dynamic_map(signed: bool = True) -> jax.Array:
  """Returns the 256-value dynamic quantisation map, sorted ascending.

  Equal bit for bit to ``bitsandbytes.functional.create_dynamic_map(signed)``.
  The signed map covers ``[-0.99296875, 1]`` with 0 at index 127; the
  unsigned one covers ``[0, 1]`` with twice the resolution, for non-negative
  data such as Adam's second moment.

  Args:
    signed: whether the map includes negative values.

  Returns:
    A float32 array of shape ``(256,)``.

  References:
    Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization".
  """
  return jnp.asarray(_dynamic_map_np(bool(signed)))


# Bits of float32 mantissa in the lookup key of ``_nearest_code``. With 8,
# every key bucket of the dynamic maps holds at most one code midpoint.
_KEY_MANTISSA_BITS = 8
_KEY_SHIFT = 23 - _KEY_MANTISSA_BITS
_KEY_MAX = 0x3F800000 >> _KEY_SHIFT  # bucket of 1.0; inputs lie in [-1, 1]


def _ordered_key(bits):
  """Maps float32 bit patterns (as int32) to integers in the floats' order."""
  return jnp.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


@functools.lru_cache(maxsize=16)
def _bucket_table(code_bytes: bytes) -> tuple[np.ndarray, np.ndarray, int]:
  """Lookup tables that turn nearest-code search into 1 + k gathers."""
  code = np.frombuffer(code_bytes, np.float32)
  midpoints = (code[:-1] + code[1:]) / np.float32(2)
  bits = midpoints.view(np.int32).astype(np.int64)
  keys = np.where(bits >= 0, bits, -(bits & 0x7FFFFFFF)) >> _KEY_SHIFT
  buckets = np.arange(-_KEY_MAX, _KEY_MAX + 1)
  first = np.searchsorted(keys, buckets, side="left")
  per_bucket = np.searchsorted(keys, buckets, side="right") - first
  k = max(int(per_bucket.max()), 1)
  # Padding with +inf makes the k comparisons safe past the last midpoint.
  padded = np.concatenate([midpoints, np.full(k, np.inf, np.float32)])
  # following[t, b]: the t-th midpoint from bucket b's first one on. Indexed
  # by the bucket like ``first``, so the lookups do not depend on each other.
  following = np.stack([padded[first + t] for t in range(k)])
  return first.astype(np.int16), following, k  # first <= 255


def _concrete_code(code: Any) -> np.ndarray | None:
  """The map as NumPy if it is concrete (validated), None if traced."""
  try:
    code_np = np.asarray(code, np.float32)
  except jax.errors.TracerArrayConversionError:
    code = jnp.asarray(code)
    if code.ndim != 1 or not 2 <= code.size <= 256:
      raise ValueError(f"code must be a 1-D map of 2 to 256 values, got shape"
                       f" {code.shape}.") from None
    return None
  if code_np.ndim != 1 or not 2 <= code_np.size <= 256:
    raise ValueError(f"code must be a 1-D map of 2 to 256 values, got shape"
                     f" {code_np.shape}.")
  if np.any(np.diff(code_np) < 0):
    raise ValueError("code must be sorted in ascending order.")
  if _zero_code(code_np) + _NON_FINITE_CODES + 1 >= code_np.size:
    raise ValueError(
        f"code must have at least {_NON_FINITE_CODES + 1} values above its"
        " smallest non-negative one: in a block holding NaN or an infinity,"
        f" the {_NON_FINITE_CODES} just above it code those values.")
  return code_np


def _code_map(code: Any) -> Any:
  """The validated map: NumPy float32 if concrete, else a float32 jax array."""
  code_np = _concrete_code(code)
  return code_np if code_np is not None else jnp.asarray(code, jnp.float32)


# In a block holding a non-finite value (marked by the sign bit of its
# absmax), the codes this far above the code of 0 stand for +inf, -inf, NaN.
# On both dynamic maps they are the codes of values below 1e-5 (relative).
_POS_INF_CODE, _NEG_INF_CODE, _NAN_CODE = 1, 2, 3
_NON_FINITE_CODES = 3


def _zero_code(code: Any) -> Any:
  """Index of the map's smallest non-negative value (of 0 in both dynamic
  maps): an int for a NumPy map, a traced scalar otherwise."""
  if isinstance(code, np.ndarray):
    return int(np.searchsorted(code, np.float32(0.0), side="left"))
  return jnp.searchsorted(code, jnp.float32(0.0), side="left")


def _code_non_finite(idx: jax.Array, scaled: jax.Array, marked: jax.Array,
                     code: Any) -> jax.Array:
  """Nearest-code indices with a marked block's non-finite values coded.

  Args:
    idx: ``(blocks, block)`` nearest-code indices of the scaled values.
    scaled: the values divided by their block's finite maximum (before
      clipping: NaN and the infinities stay what they were).
    marked: ``(blocks, 1)``: whether the block holds a non-finite value.
    code: the map (NumPy if concrete, else a float32 jax array).

  Returns:
    ``idx`` where every value is finite; elsewhere the special codes, and
    finite values of marked blocks kept off them (see the module docstring).
  """
  zero = _zero_code(code)
  below, above = zero, zero + _NON_FINITE_CODES + 1
  # The same float32 midpoint as the nearest-code search's, ties going down.
  midpoint = (code[below] + code[above]) / np.float32(2)
  on_special = marked & (idx > below) & (idx < above)
  idx = jnp.where(on_special, jnp.where(scaled <= midpoint, below, above),
                  idx)
  special = jnp.where(jnp.isnan(scaled), zero + _NAN_CODE,
                      jnp.where(scaled > 0, zero + _POS_INF_CODE,
                                zero + _NEG_INF_CODE))
  return jnp.where(jnp.isfinite(scaled), idx, special)


def _decode_non_finite(values: jax.Array, codes: jax.Array,
                       marked: jax.Array, code: Any) -> jax.Array:
  """``values`` with the special codes of marked blocks decoded.

  Args:
    values: ``(blocks, block)`` decoded values (``map[code] * absmax``).
    codes: the ``(blocks, block)`` uint8 codes.
    marked: ``(blocks, 1)``: whether the block holds a non-finite value.
    code: the map (NumPy if concrete, else a float32 jax array).

  Returns:
    ``values`` with NaN and the infinities restored.
  """
  # Compared as uint8: an int32 copy of the codes, shared with the lookup,
  # would be written out.
  zero = _zero_code(code)
  is_code = lambda offset: marked & (codes == jnp.asarray(zero + offset,
                                                          jnp.uint8))
  values = jnp.where(is_code(_POS_INF_CODE), jnp.inf, values)
  values = jnp.where(is_code(_NEG_INF_CODE), -jnp.inf, values)
  return jnp.where(is_code(_NAN_CODE), jnp.nan, values)


def _nearest_code(normed: jax.Array, code: jax.Array) -> jax.Array:
  """Index of the nearest code value: #midpoints strictly below each value.

  This is ``searchsorted(midpoints, normed, side="left")``. A binary search
  costs 8 dependent gathers per value (slow on CPU), so for a concrete code
  map we bucket values by their float32 exponent and top mantissa bits: all
  midpoints in lower buckets are smaller, those in higher ones larger, so
  only the few midpoints sharing the value's bucket need a comparison.
  """
  code_np = _concrete_code(code)
  if code_np is None:  # a traced map: binary search
    code = jnp.asarray(code, jnp.float32)
    midpoints = (code[:-1] + code[1:]) / 2
    return jnp.searchsorted(midpoints, normed, side="left")
  first, following, k = _bucket_table(code_np.tobytes())
  key = _ordered_key(jax.lax.bitcast_convert_type(normed, jnp.int32))
  bucket = jnp.clip(key >> _KEY_SHIFT, -_KEY_MAX, _KEY_MAX) + _KEY_MAX
  idx = jnp.asarray(first)[bucket].astype(jnp.int32)
  for t in range(k):  # k == 1 for the dynamic maps
    idx = idx + (jnp.asarray(following[t])[bucket] < normed).astype(idx.dtype)
  return idx


def _num_blocks(size: int, block_size: int) -> int:
  return -(-size // block_size)


def _blocked(flat: jax.Array, block_size: int) -> jax.Array:
  """Zero-pads a flat array to whole blocks and reshapes it to them.

  An array smaller than one block is one block of its own size: its values
  are the same, and the work scales with the data, not with ``block_size``.
  """
  block_size = max(min(block_size, flat.size), 1)
  nb = _num_blocks(flat.size, block_size)
  pad = nb * block_size - flat.size
  if pad:
    flat = jnp.pad(flat, (0, pad))
  return flat.reshape(nb, block_size)


def _block_scales(blocks: jax.Array) -> jax.Array:
  """Each block's largest finite magnitude, negated if it holds NaN or inf."""
  largest, marked = reductions.finite_abs_max(blocks, axis=1)
  return jnp.where(marked, -largest, largest)


def block_abs_max(x: jax.Array, block_size: int = 256) -> jax.Array:
  """The float32 largest finite magnitude of each block of ``x`` (see the
  module docstring for the blocks), negated (sign bit set) for a block that
  holds NaN or an infinity: the ``absmax`` that ``quantize_blockwise`` stores.

  Args:
    x: a floating-point array of any shape (computed in float32).
    block_size: number of consecutive (row-major) values per block.

  Returns:
    A float32 array of shape ``(ceil(x.size / block_size),)``.

  Raises:
    ValueError: if ``block_size`` is not a positive int.

  References:
    Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization".
  """
  block_size = check_positive_int("block_size", block_size,
                                  hint=_BLOCK_SIZE_HINT)
  x = jnp.asarray(x)
  if x.size == 0:
    return jnp.zeros((0,), jnp.float32)
  return _block_scales(_float_blocks(x, block_size))


def _float_blocks(x: jax.Array, block_size: int) -> jax.Array:
  """``x`` in float32, zero-padded and reshaped to whole blocks."""
  # Optimizer states start as constants (zeros) under jit, and XLA would
  # constant-fold the quantisation: minutes for large arrays on CPU, and the
  # result embedded in the executable. Multiplying by an opaque 1 (exact)
  # makes the input non-constant without materialising it.
  one = jax.lax.optimization_barrier(jnp.ones((), jnp.float32))
  return _blocked(x.astype(jnp.float32).reshape(-1) * one, block_size)


def quantize_blockwise(
    x: jax.Array,
    code: jax.Array,
    block_size: int = 256,
    absmax: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Quantises ``x`` block-wise to uint8 indices into ``code``.

  Args:
    x: a floating-point array of any shape (computed in float32).
    code: the code map, at most 256 float32 values sorted ascending (e.g.
      ``create_dynamic_map(signed)``). A concrete map (a NumPy array, or a
      jax array created outside ``jit``) takes a fast table lookup; a traced
      one falls back to a binary search with the same result.
    block_size: number of consecutive (row-major) values per block.
    absmax: ``block_abs_max(x, block_size)`` if the caller has it already
      (e.g. computed from a recomputation of ``x``, so that ``x`` need not be
      kept in memory between the two passes); computed here if None. Its
      sign bits say which blocks hold NaN or an infinity.

  Returns:
    ``(codes, absmax)``: uint8 codes with ``x``'s shape and the float32
    per-block finite maxima of ``|x|`` (negated for blocks holding NaN or an
    infinity, see the module docstring), of shape
    ``(ceil(x.size / block_size),)``. An all-zero block gets ``absmax == 0``
    and the code of 0.

  Raises:
    ValueError: if ``block_size`` is not a positive int, ``code`` is not a
      1-D map of 2 to 256 values sorted ascending with at least four values
      above its smallest non-negative one, or ``absmax`` does not have one
      entry per block.

  References:
    Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization".
  """
  block_size = check_positive_int("block_size", block_size,
                                  hint=_BLOCK_SIZE_HINT)
  code = _code_map(code)  # fails early on a malformed map
  x = jnp.asarray(x)
  shape = x.shape
  nb = _num_blocks(x.size, block_size)
  if absmax is not None and tuple(absmax.shape) != (nb,):
    raise ValueError(
        f"absmax must have shape ({nb},), one entry per block of {block_size}"
        f" values of x with shape {shape}; got {absmax.shape}.")
  if x.size == 0:
    return jnp.zeros(shape, jnp.uint8), jnp.zeros((0,), jnp.float32)
  blocks = _float_blocks(x, block_size)
  if absmax is None:
    absmax = _block_scales(blocks)
  absmax = absmax.astype(jnp.float32)
  scale = jnp.abs(absmax)
  # A zero block would divide 0 by 0; any divisor gives its values the code
  # of 0, and the stored absmax stays 0 so it dequantises to exact zeros.
  safe = jnp.where(scale > 0, scale, jnp.ones_like(scale))
  scaled = blocks / safe[:, None]
  normed = jnp.clip(scaled, -1.0, 1.0)
  idx = _nearest_code(normed.reshape(-1), code).reshape(blocks.shape)
  idx = _code_non_finite(idx, scaled, jnp.signbit(absmax)[:, None], code)
  codes = idx.reshape(-1)[:x.size].astype(jnp.uint8).reshape(shape)
  return codes, absmax


def dequantize_blockwise(
    codes: jax.Array,
    absmax: jax.Array,
    code: jax.Array,
    block_size: int = 256,
    dtype: DTypeLike = jnp.float32,
) -> jax.Array:
  """Inverse of ``quantize_blockwise``: ``code[codes] * absmax[block]``
  (and NaN or an infinity where ``quantize_blockwise`` coded one).

  Args:
    codes: uint8 codes, any shape.
    absmax: float32 per-block maxima, ``(ceil(codes.size / block_size),)``.
    code: the code map the codes index.
    block_size: the block size used to quantise.
    dtype: dtype of the result (the product is computed in float32).

  Returns:
    An array of ``codes``' shape and ``dtype``.

  Raises:
    ValueError: if ``block_size`` is not a positive int or ``absmax`` does
      not have one entry per block.

  References:
    Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization".
  """
  block_size = check_positive_int("block_size", block_size,
                                  hint=_BLOCK_SIZE_HINT)
  codes = jnp.asarray(codes)
  nb = _num_blocks(codes.size, block_size)
  if tuple(absmax.shape) != (nb,):
    raise ValueError(
        f"absmax must have shape ({nb},), one entry per block of {block_size}"
        f" values of codes with shape {codes.shape}; got {absmax.shape}."
        " Was it quantised with another block_size?")
  if codes.size == 0:
    return jnp.zeros(codes.shape, dtype)
  code = _code_map(code)
  flat_codes = codes.reshape(-1)
  absmax = absmax.astype(jnp.float32)[:, None]
  values = jnp.asarray(code)[flat_codes.astype(jnp.int32)]
  blocks = _blocked(values, block_size) * jnp.abs(absmax)
  blocks = _decode_non_finite(blocks, _blocked(flat_codes, block_size),
                              jnp.signbit(absmax), code)
  return blocks.reshape(-1)[:codes.size].reshape(codes.shape).astype(dtype)


def quantize(
    x: jax.Array,
    signed: bool = True,
    block_size: int = 256,
    absmax: jax.Array | None = None,
) -> QuantizedArray:
  """Quantises ``x`` with the dynamic map.

  Args:
    x: a floating-point array.
    signed: use the signed map; ``False`` for non-negative data (negative
      values would be stored as 0).
    block_size: values per float32 scale.
    absmax: ``block_abs_max(x, block_size)`` if already known (see
      ``quantize_blockwise``).

  Returns:
    A ``QuantizedArray``.

  References:
    Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization".
  """
  # The NumPy map stays a constant under jit (a jnp array would be traced),
  # which enables the fast lookup in ``_nearest_code``.
  codes, absmax = quantize_blockwise(x, _dynamic_map_np(bool(signed)),
                                     block_size, absmax)
  return QuantizedArray(codes=codes, absmax=absmax)


def dequantize(
    q: QuantizedArray,
    signed: bool = True,
    block_size: int = 256,
    dtype: DTypeLike = jnp.float32,
) -> jax.Array:
  """Reconstructs the array stored in ``q`` (see ``quantize``).

  Args:
    q: the quantised array.
    signed: the map ``q`` was quantised with.
    block_size: the block size ``q`` was quantised with.
    dtype: dtype of the result.

  Returns:
    An array of ``q.codes``' shape and ``dtype``.

  References:
    Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization".
  """
  return dequantize_blockwise(q.codes, q.absmax,
                              _dynamic_map_np(bool(signed)), block_size, dtype)
