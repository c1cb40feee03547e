"""What the fields of an optax state hold: which leaves are second moments.

Second moments (per-coordinate averages of squared gradients) are
non-negative, which matters twice: ``quantize_state_8bit`` stores them on
the unsigned map (twice the resolution), and ``galore_project``'s
``moments="project"`` carries them into a new basis through squared
overlaps. Both ask ``is_second_moment``.

``nu`` (and ``nu_max``) is the second moment of every optax state that has
one (Adam and its variants, RMS, SM3, Yogi, Novograd, ...). The ``v*`` names
are only claimed inside factored states -- NamedTuples with ``v_row`` and
``v_col`` fields, the layout of ``optax.FactoredState`` that
``galore_optax.adafactor.ScaleByFactoredRmsHfState`` follows -- because
other states use ``v`` for signed quantities (e.g. Adan's difference EMA).

References:
  Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022,
  arXiv 2110.02861 (the unsigned map for second moments).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

KeyPath = jax.tree_util.KeyPath  # as given by jax.tree_util.*_with_path

SECOND_MOMENT_FIELDS = frozenset({"nu", "nu_max"})
# The fields that make a NamedTuple a factored second-moment state, and the
# ones holding its (non-negative) statistics.
FACTORED_STATE_FIELDS = frozenset({"v_row", "v_col"})
FACTORED_SECOND_MOMENT_FIELDS = frozenset({"v_row", "v_col", "v"})


def is_namedtuple(x: Any) -> bool:
  """Whether ``x`` is a NamedTuple (e.g. an optax state), not a plain tuple.

  Args:
    x: any object.

  Returns:
    True for instances of ``typing.NamedTuple`` classes.
  """
  return isinstance(x, tuple) and hasattr(type(x), "_fields")


def is_factored_state(x: Any) -> bool:
  """Whether ``x`` is a factored second-moment state (``v_row``, ``v_col``).

  Args:
    x: any object.

  Returns:
    True for ``optax.FactoredState``,
    ``galore_optax.adafactor.ScaleByFactoredRmsHfState`` and any other
    NamedTuple with ``v_row`` and ``v_col`` fields.
  """
  return is_namedtuple(x) and FACTORED_STATE_FIELDS <= set(type(x)._fields)


def is_second_moment(state: optax.OptState, path: KeyPath) -> bool:
  """Whether the leaf at ``path`` of ``state`` is a non-negative second moment.

  Walks ``path`` from the root of ``state`` and returns True if it passes
  through a NamedTuple field named ``nu`` or ``nu_max`` (optax's second
  moments) or through ``v_row``, ``v_col`` or ``v`` of a factored state
  (see ``is_factored_state``). Only NamedTuple fields count, so parameter
  names below a state field (dict keys, dataclass attributes) never decide.

  Args:
    state: an optimizer state (or its quantised version, which keeps the
      NamedTuples).
    path: a key path into ``state``.

  Returns:
    Whether the leaf at ``path`` is a non-negative second moment.
  """
  node = state
  for key in path:
    name = getattr(key, "name", None)
    if is_namedtuple(node) and name is not None:
      if name in SECOND_MOMENT_FIELDS:
        return True
      if is_factored_state(node) and name in FACTORED_SECOND_MOMENT_FIELDS:
        return True
    try:
      if isinstance(key, jax.tree_util.GetAttrKey):
        # A flax Variable's ``.value`` is deprecated; ``get_value()`` reads
        # the same thing.
        node = (node.get_value() if key.name == "value" and
                hasattr(node, "get_value") else getattr(node, key.name))
      elif isinstance(key, jax.tree_util.DictKey):
        node = node[key.key]
      elif isinstance(key, jax.tree_util.SequenceKey):
        node = node[key.idx]
      else:  # a custom node without named children: below any state field
        return False
    except (AttributeError, KeyError, IndexError, TypeError):
      return False
  return False
