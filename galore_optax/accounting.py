"""Byte counts of optimizer states, parameters and gradients, from shapes.

``optimizer_state_bytes(tx, params)`` sizes the state that ``tx.init(params)``
would create, by abstract evaluation (``jax.eval_shape``), so ``params`` may
be a tree of ``jax.ShapeDtypeStruct`` objects for a model that does not fit here;
``step_bytes(params)`` sizes the parameters and the gradients that an
ordinary and a per-layer train step hold. ``python -m galore_optax.memory``
prints them for LLaMA shapes.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galore_optax import targets


class StateBytes(NamedTuple):
  """Bytes of an optimizer state.

  Attributes:
    total: bytes of every array in the state.
    per_leaf: bytes per state leaf, keyed by the leaf's dotted path (e.g.
      ``0.inner_states.galore.inner_state.projectors.w.right``).
  """

  total: int
  per_leaf: dict[str, int]


def _nbytes(leaf: Any) -> int:
  return math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize


def optimizer_state_bytes(tx: optax.GradientTransformation,
                          params: optax.Params) -> StateBytes:
  """Sizes ``tx.init(params)`` without allocating it.

  Args:
    tx: any optax transformation.
    params: arrays or ``jax.ShapeDtypeStruct`` objects.

  Returns:
    A ``StateBytes`` with the total and the per-leaf bytes.
  """
  abstract = jax.eval_shape(tx.init, params)
  per_leaf = {
      targets.path_to_name(path): _nbytes(leaf)
      for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
  }
  return StateBytes(sum(per_leaf.values()), per_leaf)


class StepBytes(NamedTuple):
  """Bytes of the parameters and of the gradients a train step holds.

  An estimate from shapes: what XLA really keeps (activations, temporaries,
  copies) is measured by ``benchmarks/memory.py``.

  Attributes:
    params: every parameter leaf.
    gradients: an ordinary step's gradient tree, held whole before the
      optimizer runs (the parameters' shapes and dtypes).
    layerwise_gradients: a per-layer step's (``galore_optax.layerwise``),
      which consumes each gradient inside the backward pass as soon as it
      exists: the largest single leaf's gradient.
  """

  params: int
  gradients: int
  layerwise_gradients: int


def step_bytes(params: optax.Params) -> StepBytes:
  """Sizes the parameters and the gradients of an ordinary and a per-layer step.

  Args:
    params: arrays or ``jax.ShapeDtypeStruct`` objects.

  Returns:
    A ``StepBytes``.
  """
  sizes = [_nbytes(leaf) for leaf in jax.tree.leaves(params)]
  return StepBytes(sum(sizes), sum(sizes), max(sizes, default=0))
