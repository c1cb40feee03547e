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
import optax

from galore_optax import adafactor
from galore_optax import quantization
from galore_optax._checks import check_positive_int

KeyPath = jax.tree_util.KeyPath  # as given by jax.tree_util.*_with_path

# State fields holding non-negative second moments. ``nu`` is the second
# moment of every optax state that has one (Adam and its variants, RMS, SM3,
# Yogi, Novograd, ...); the ``v*`` names are only claimed for the Adafactor
# states (optax's and ours) because other states use ``v`` for signed
# quantities.
SECOND_MOMENT_FIELDS = frozenset({"nu", "nu_max"})
FACTORED_SECOND_MOMENT_FIELDS = frozenset({"v_row", "v_col", "v"})
FACTORED_STATE_TYPES = (optax.FactoredState,
                        adafactor.ScaleByFactoredRmsHfState)


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

  A distinct type so that ``QuantizedArray``s the inner transformation keeps
  itself (e.g. 8-bit projectors) are passed through untouched.
  """

  __slots__ = ()


def _is_ours(x: Any) -> bool:
  return isinstance(x, _QuantizedLeaf)


def _is_namedtuple(x: Any) -> bool:
  return isinstance(x, tuple) and hasattr(type(x), "_fields")


def is_second_moment(state: optax.OptState, path: KeyPath) -> bool:
  """The default rule of ``quantize_state_8bit`` for the unsigned map.

  Walks ``path`` from the root of ``state`` and returns True if it passes
  through a NamedTuple field named ``nu`` or ``nu_max`` (optax's second
  moments) or through ``v_row``, ``v_col`` or ``v`` of
  ``optax.FactoredState``. Only NamedTuple fields count, so parameter names
  below a state field (dict keys, dataclass attributes) never decide.

  Args:
    state: the inner transformation's state (or its quantised version).
    path: a key path into ``state``.

  Returns:
    Whether the leaf at ``path`` is a non-negative second moment.
  """
  node = state
  for key in path:
    name = getattr(key, "name", None)
    if _is_namedtuple(node) and name is not None:
      if name in SECOND_MOMENT_FIELDS:
        return True
      if (isinstance(node, FACTORED_STATE_TYPES) and
          name in FACTORED_SECOND_MOMENT_FIELDS):
        return True
    try:
      if isinstance(key, jax.tree_util.GetAttrKey):
        node = getattr(node, key.name)
      elif isinstance(key, jax.tree_util.DictKey):
        node = node[key.key]
      elif isinstance(key, jax.tree_util.SequenceKey):
        node = node[key.idx]
      else:  # a custom node without named children: below any state field
        return False
    except (AttributeError, KeyError, IndexError, TypeError):
      return False
  return False


def quantize_state_8bit(
    inner: optax.GradientTransformation,
    *,
    block_size: int = 256,
    min_size: int = 4096,
    unsigned: Callable[[KeyPath], bool] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Stores the large floating-point leaves of ``inner``'s state in 8 bits.

  Every floating-point leaf of ``inner``'s state with at least ``min_size``
  elements is kept as a ``quantization.QuantizedArray``: uint8 codes of the
  dynamic map and one float32 absmax per ``block_size`` values. Smaller
  leaves and non-float leaves (step counts) are kept as they are, and so are
  ``QuantizedArray``s that ``inner`` stores itself. Non-negative second
  moments use the unsigned map (twice the resolution), all others the signed
  one.

  Each update dequantises the state (to float32) with its stored absmax,
  runs ``inner.update`` (forwarding extra arguments), and quantises the new
  state with new absmax values. The returned update is ``inner``'s, computed
  from its unquantised new state, as bitsandbytes' 8-bit optimizers do. The
  state's shapes and dtypes never change, so steps jit once.

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
    block_size: values per absmax block (bitsandbytes' optimizers use 256).
    min_size: leaves with fewer elements keep their dtype (bitsandbytes'
      ``min_8bit_size``, 4096): for them the absmax overhead and the
      quantisation error are not worth the saving.
    unsigned: ``unsigned(path) -> bool`` says whether the leaf at ``path``
      (a ``jax.tree_util`` key path into ``inner``'s state) is non-negative
      and should use the unsigned map. Negative values of such a leaf are
      stored as 0. Defaults to ``is_second_moment``: the ``nu`` fields of
      optax's states and ``v_row``/``v_col``/``v`` of the Adafactor states.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    ``QuantizedState``.

  Raises:
    ValueError: if ``block_size`` or ``min_size`` is not a positive integer.

  References:
    Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization",
    arXiv 2110.02861.
  """
  block_size = check_positive_int(
      "block_size", block_size,
      hint="It is the number of values sharing one float32 absmax; "
      "bitsandbytes' 8-bit optimizers use 256.")
  min_size = check_positive_int(
      "min_size", min_size,
      hint="Smaller state leaves stay unquantised; bitsandbytes uses 4096.")
  if unsigned is not None and not callable(unsigned):
    raise ValueError(
        f"unsigned must be None or a callable path -> bool, got {unsigned!r}.")
  inner = optax.with_extra_args_support(inner)

  def signed_map(state: optax.OptState, path: KeyPath) -> bool:
    if unsigned is not None:
      return not unsigned(path)
    return not is_second_moment(state, path)

  def init_fn(params: optax.Params) -> QuantizedState:
    inner_state = inner.init(params)

    def maybe_quantize(path, leaf):
      if (isinstance(leaf, quantization.QuantizedArray) or
          not hasattr(leaf, "dtype") or
          not jnp.issubdtype(leaf.dtype, jnp.floating) or
          leaf.size < min_size):
        return leaf
      return _QuantizedLeaf(*quantization.quantize(
          leaf, signed_map(inner_state, path), block_size))

    return QuantizedState(jax.tree.map_with_path(
        maybe_quantize, inner_state,
        is_leaf=lambda x: isinstance(x, quantization.QuantizedArray)))

  def update_fn(updates, state, params=None, **extra_args):
    stored = state.inner_state

    def dequantize(path, leaf):
      if not _is_ours(leaf):
        return leaf
      return quantization.dequantize(leaf, signed_map(stored, path),
                                     block_size)

    inner_state = jax.tree.map_with_path(dequantize, stored, is_leaf=_is_ours)
    updates, new_inner_state = inner.update(updates, inner_state, params,
                                            **extra_args)

    # Quantise exactly the leaves that were quantised before, so the state's
    # structure, shapes and dtypes stay fixed.
    def requantize(path, old, new):
      if not _is_ours(old):
        return new
      return _QuantizedLeaf(*quantization.quantize(
          new, signed_map(stored, path), block_size))

    new_stored = jax.tree.map_with_path(requantize, stored, new_inner_state,
                                        is_leaf=_is_ours)
    return updates, QuantizedState(new_stored)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
