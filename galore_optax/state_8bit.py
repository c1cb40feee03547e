"""``quantize_state_8bit``: keep any optax transformation's state in 8 bits.

The wrapped transformation keeps working in float32: each update dequantises
its state, runs it, and quantises the new state again (block-wise, dynamic
map, see ``galore_optax.quantization``). Large floating-point state leaves
cost 1 byte per value plus 4 bytes per block instead of 4 bytes per value.

References:
  Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022,
  arXiv 2110.02861.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
import optax

from galore_optax import quantization
from galore_optax import state_fields
from galore_optax._checks import check_float_dtype
from galore_optax._checks import check_positive_int

KeyPath = state_fields.KeyPath


class QuantizedState(NamedTuple):
  """State of ``quantize_state_8bit``.

  Attributes:
    inner_state: the inner transformation's state in which every quantised
      leaf is replaced by a ``quantization.QuantizedArray`` (uint8 ``codes``
      of the leaf's shape, float32 ``absmax`` per block); the other leaves
      are the inner state's own.
  """

  inner_state: optax.OptState


class _QuantizedLeaf(quantization.QuantizedArray):
  """A ``QuantizedArray`` that this wrapper made from an inner state leaf.

  A distinct type so that ``QuantizedArray`` leaves the inner transformation keeps
  itself (e.g. 8-bit projectors) are passed through untouched.
  """

  __slots__ = ()


def _is_ours(x: Any) -> bool:
  return isinstance(x, _QuantizedLeaf)


# Block sizes of the state: powers of two, so that a leaf's number of blocks
# determines its block size (a leaf smaller than a block is one block of its
# own size, the same values for every larger block_size), and a state saved
# with another block_size fails to restore or update instead of decoding
# wrong values. bitsandbytes uses 64..4096.
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 8, 2**24


def check_block_size(block_size: Any) -> int:
  """Returns ``block_size`` as an int, or raises a ValueError naming it.

  Args:
    block_size: values per float32 scale of an 8-bit state.

  Returns:
    The block size, a power of two from ``MIN_BLOCK_SIZE`` to
    ``MAX_BLOCK_SIZE``.

  Raises:
    ValueError: for anything else.
  """
  hint = ("It is the number of values sharing one float32 absmax; "
          "bitsandbytes' 8-bit optimizers use 256.")
  block_size = check_positive_int("block_size", block_size, hint=hint)
  if (block_size & (block_size - 1) or
      not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE):
    raise ValueError(
        f"block_size must be a power of two from {MIN_BLOCK_SIZE} to "
        f"{MAX_BLOCK_SIZE}, got {block_size}: then each state leaf's number of"
        " blocks determines its block size, so a state saved with another "
        f"block_size cannot be restored or updated by mistake. {hint}")
  return block_size


# Primitives whose work ``quantize_state_8bit`` will not repeat (see
# ``_repeatable``): products, decompositions, control flow and sorts.
_COSTLY_PRIMITIVES = frozenset({
    "dot_general", "conv_general_dilated", "cond", "while", "scan",
    "svd", "eigh", "qr", "geqrf", "householder_product", "lu", "cholesky",
    "triangular_solve", "fft", "sort", "custom_linear_solve",
})


def _subjaxprs(params: dict[str, Any]) -> list[Any]:
  """The jaxprs nested in an equation's parameters (calls, custom rules)."""
  found = []
  stack = list(params.values())
  while stack:
    value = stack.pop()
    if hasattr(value, "eqns"):
      found.append(value)
    elif hasattr(getattr(value, "jaxpr", None), "eqns"):
      found.append(value.jaxpr)
    elif isinstance(value, (tuple, list)):
      stack.extend(value)
  return found


def _repeatable(jaxpr: Any) -> bool:
  """Whether a computation is cheap to repeat: elementwise work,
  reductions, reshapes and gathers, but no ``_COSTLY_PRIMITIVES``."""
  stack = [jaxpr]
  while stack:
    for eqn in stack.pop().eqns:
      if eqn.primitive.name in _COSTLY_PRIMITIVES:
        return False
      stack.extend(_subjaxprs(eqn.params))
  return True


def _in_dtype(new_updates: optax.Updates, updates: optax.Updates,
              update_dtype: Any) -> optax.Updates:
  """Floating ``new_updates`` in ``update_dtype``, or if None, in the dtypes
  of the incoming ``updates``."""
  if update_dtype is None:
    return optax.tree_utils.tree_cast_like(new_updates, updates)
  return jax.tree.map(
      lambda u: u.astype(update_dtype)
      if jnp.issubdtype(u.dtype, jnp.floating) else u, new_updates)


def quantize_state_8bit(
    inner: optax.GradientTransformation,
    *,
    block_size: int = 256,
    min_size: int = 4096,
    unsigned: Callable[[KeyPath], bool] | None = None,
    update_dtype: DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Stores the large floating-point leaves of ``inner``'s state in 8 bits.

  Every floating-point leaf of ``inner``'s state with at least ``min_size``
  elements is kept as a ``quantization.QuantizedArray``: uint8 codes of the
  dynamic map and one float32 absmax per ``block_size`` values. Smaller
  leaves and non-float leaves (step counts) are kept as they are, and so are
  ``QuantizedArray`` leaves that ``inner`` stores itself. Non-negative second
  moments use the unsigned map (twice the resolution), all others the signed
  one.

  Each update dequantises the state (to float32) with its stored absmax,
  runs ``inner.update`` (forwarding extra arguments), and quantises the new
  state with new absmax values. The returned update is ``inner``'s, computed
  from its unquantised new state, as bitsandbytes' 8-bit optimizers do, in
  ``update_dtype`` (by default the incoming updates' dtype, as ``inner``
  with its own bfloat16 or float16 state would return; the float32 state
  would otherwise make them float32). The state's shapes and dtypes never
  change, so steps jit once. NaN and infinities in the state stay where they
  are, without spoiling the other values of their block (see
  ``galore_optax.quantization``).

  The state's shapes determine its block size: each quantised leaf keeps
  ``ceil(size / block_size)`` float32 scales (one of its own size if the
  leaf is smaller than a block), and since ``block_size`` is a power of two,
  no two block sizes give a leaf the same number of blocks unless they
  decode it identically. A state restored into an optimizer with another
  ``block_size`` (or ``min_size``, which changes which leaves are quantised)
  therefore fails: Orbax refuses the shapes or tree, and ``update`` raises
  a ValueError naming the leaf.

  The new state is needed three times (the update, the new block maxima, the
  new codes). Where ``inner.update`` is cheap to repeat -- no products,
  decompositions, loops or conditionals, as in Adam, RMSprop or Adafactor --
  it is traced once per use on its own dequantised copy of the state, and XLA
  fuses each use into one pass over the 8-bit codes instead of writing the
  float32 state out (the results are the same bits). ``inner.update`` is
  therefore traced up to four times; around costlier inners (e.g. a
  ``galore_project``) the state is dequantised and ``inner`` traced once.

  ``optax.chain(quantize_state_8bit(optax.scale_by_adam()),
  optax.add_decayed_weights(wd), optax.scale_by_learning_rate(lr))`` is an
  8-bit AdamW. It also works as the inner transformation of a projection
  wrapper such as ``galore_project``, whose inner state is small.

  Every large float leaf is quantised, whatever it holds: do not wrap
  transformations whose state keeps parameter copies or other values that
  need full precision (e.g. ``optax.lookahead``'s slow weights,
  schedule-free's ``z``).

  Args:
    inner: the transformation whose state is stored in 8 bits.
    block_size: values per absmax block (bitsandbytes' optimizers use 256),
      a power of two from 8 to 2**24; a leaf smaller than a block is one
      block of its own size, so cost follows the data.
    min_size: leaves with fewer elements stay unquantised, in float32 (or
      wider) whatever the parameters' dtype, as bitsandbytes' 32-bit state
      below its ``min_8bit_size`` (4096): for them the absmax overhead and the
      quantisation error are not worth the saving. A positive integer; one
      above every leaf's size quantises nothing.
    unsigned: ``unsigned(path) -> bool`` says whether the leaf at ``path``
      (a ``jax.tree_util`` key path into ``inner``'s state) is non-negative
      and should use the unsigned map. Negative values of such a leaf are
      stored as 0. Defaults to ``state_fields.is_second_moment``: the ``nu``
      fields of optax's states and ``v_row``/``v_col``/``v`` of the factored
      (Adafactor) states.
    update_dtype: dtype of the returned (floating) updates, or None for the
      incoming updates' dtype. The 8-bit aliases ask for float32 and cast
      after the learning rate: before it, 8-bit Adam's update exceeds
      float16's range where a small second moment decodes to 0 (``mu / eps``
      is ~1e5).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    ``QuantizedState``.

  Raises:
    ValueError: if ``block_size`` is not a power of two from 8 to 2**24,
      ``min_size`` is not a positive integer, ``unsigned`` is not callable
      or ``update_dtype`` is not None or a floating dtype;
      at ``update``, if the state was made with another ``block_size``.

  References:
    Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization",
    arXiv 2110.02861.
  """
  block_size = check_block_size(block_size)
  min_size = check_positive_int(
      "min_size", min_size,
      hint="Smaller state leaves stay unquantised; bitsandbytes uses 4096.")
  if unsigned is not None and not callable(unsigned):
    raise ValueError(
        f"unsigned must be None or a callable path -> bool, got {unsigned!r}.")
  update_dtype = check_float_dtype("update_dtype", update_dtype,
                                   allow_none=True)
  inner = optax.with_extra_args_support(inner)

  def signed_map(state: optax.OptState, path: KeyPath) -> bool:
    if unsigned is not None:
      return not unsigned(path)
    return not state_fields.is_second_moment(state, path)

  def init_fn(params: optax.Params) -> QuantizedState:
    inner_state = inner.init(params)

    def maybe_quantize(path, leaf):
      if (isinstance(leaf, quantization.QuantizedArray) or
          not hasattr(leaf, "dtype") or
          not jnp.issubdtype(leaf.dtype, jnp.floating)):
        return leaf
      if leaf.size < min_size:
        # As bitsandbytes: small leaves keep a 32-bit state, whatever the
        # parameters' dtype (a float16 Adam's g**2 underflows to 0).
        return leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))
      return _QuantizedLeaf(*quantization.quantize(
          leaf, signed_map(inner_state, path), block_size))

    return QuantizedState(jax.tree.map_with_path(
        maybe_quantize, inner_state,
        is_leaf=lambda x: isinstance(x, quantization.QuantizedArray)))

  def update_fn(updates, state, params=None, **extra_args):
    stored = state.inner_state
    # The inner update runs in float32 (its state is float32 once decoded):
    # in float16, Adam's (1 - b2) * g**2 underflows to 0 for |g| < ~2e-3.
    wide_updates = jax.tree.map(
        lambda u: (u.astype(jnp.promote_types(u.dtype, jnp.float32))
                   if jnp.issubdtype(u.dtype, jnp.floating) else u), updates)

    def dequantized(use: int | None) -> optax.OptState:
      """The float32 inner state; ``use`` numbers an independent copy."""
      maps = {signed: quantization.create_dynamic_map(signed)
              for signed in (True, False)}
      if use is not None:
        # An opaque copy of the maps per use: XLA cannot merge the lookups
        # of different uses, so each fuses into its one consumer.
        maps = jax.lax.optimization_barrier((maps, jnp.int32(use)))[0]

      def dequantize(path, leaf):
        if not _is_ours(leaf):
          return leaf
        try:
          return quantization.dequantize_blockwise(
              leaf.codes, leaf.absmax, maps[signed_map(stored, path)],
              block_size)
        except ValueError as e:  # e.g. a state saved with another block_size
          raise ValueError(
              f"quantize_state_8bit(block_size={block_size}) cannot read the"
              f" 8-bit state leaf {jax.tree_util.keystr(path)}: {e}") from e

      return jax.tree.map_with_path(dequantize, stored, is_leaf=_is_ours)

    def run(inner_state):
      return inner.update(wide_updates, inner_state, params, **extra_args)

    inner_state = dequantized(None)
    updates_out, new_inner_state = run(inner_state)
    # The new state has three uses: the update, the new block maxima and the
    # new codes. XLA:CPU would write each dequantised leaf out in float32 to
    # share it among them (a table lookup is too costly to duplicate), so
    # where ``inner`` is cheap to repeat we trace it once per use instead and
    # let XLA fuse each use into one pass over the 8-bit state.
    quantized = any(_is_ours(x) for x in jax.tree.leaves(stored,
                                                          is_leaf=_is_ours))
    if quantized and _repeatable(jax.make_jaxpr(run)(inner_state).jaxpr):
      _, for_max = run(dequantized(1))
      _, for_codes = run(dequantized(2))
    else:
      for_max = for_codes = new_inner_state

    # Quantise exactly the leaves that were quantised before, so the state's
    # structure, shapes and dtypes stay fixed.
    def requantize(path, old, new, new_for_max, new_for_codes):
      if not _is_ours(old):
        return new.astype(old.dtype) if hasattr(old, "dtype") else new
      return _QuantizedLeaf(*quantization.quantize(
          new_for_codes, signed_map(stored, path), block_size,
          absmax=quantization.block_abs_max(new_for_max, block_size)))

    new_stored = jax.tree.map_with_path(requantize, stored, new_inner_state,
                                        for_max, for_codes, is_leaf=_is_ours)
    return (_in_dtype(updates_out, updates, update_dtype),
            QuantizedState(new_stored))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
