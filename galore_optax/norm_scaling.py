"""Norm-based gradient scaling shared by Fira and APOLLO.

Both successors of GaLore turn the low-rank optimizer's result into a
*scaling factor* for a full-size gradient: the ratio of the norms of the
low-rank update ``N`` (the inner optimizer's output) and the low-rank
gradient ``R`` it was computed from, per channel (a row or column of the
matrix) or per matrix. Both then pass the scaled gradient through Fira's
norm-growth limiter, which keeps a full-size step from growing by more than
a factor ``GROWTH_LIMIT`` per update; its state is one float32 per matrix,
the norm of the previous (limited) scaled gradient.

References:
  Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under
  Low-rank Constraint?", arXiv 2410.01623 (the package ``fira`` 1.0.2);
  Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance",
  arXiv 2412.05270 (the package ``apollo-torch`` 1.0.3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from galore_optax import projection

# Largest growth of the scaled gradient's norm from one update to the next.
GROWTH_LIMIT = 1.01
# Added to denominators of norm ratios, as both references do.
RATIO_EPS = 1e-8
# The limiter's state before its first update: no previous norm yet.
NO_PREVIOUS_NORM = -1.0


def channel_axis(plan: projection.LeafPlan) -> int:
  """The matrix axis that the projection reduces (summed over by a channel
  norm), so that each channel is a row or column of the full matrix.

  Left projection (``R = P^T G``, ``r x n``): -2, one factor per column.
  Right projection (``R = G Q^T``, ``m x r``): -1, one factor per row. This
  is the references' choice for ``proj_type="std"`` (where they define one).

  Args:
    plan: the leaf's plan (one side projected).

  Returns:
    -2 or -1.

  Raises:
    ValueError: for a plan projecting both sides (``proj_type="full"``),
      whose low-rank result has no channel of the full matrix.
  """
  if plan.use_left and plan.use_right:
    raise ValueError("Channel-wise scaling needs a one-sided projection, "
                     "not proj_type='full'.")
  return -2 if plan.use_left else -1


def _norm(x: jax.Array, axis: tuple[int, ...]) -> jax.Array:
  x = x.astype(jnp.float32)
  return jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))


def norm_ratio(lowrank_update: jax.Array, lowrank_grad: jax.Array,
               axis: tuple[int, ...]) -> jax.Array:
  """``||N|| / (||R|| + 1e-8)`` over ``axis``, kept as size-1 axes.

  Args:
    lowrank_update: the inner optimizer's low-rank update ``N``.
    lowrank_grad: the low-rank gradient ``R`` it was computed from.
    axis: the axes the norms run over: ``(channel_axis(plan),)`` per
      channel, ``(-2, -1)`` per matrix.

  Returns:
    The float32 ratio, broadcastable against the full matrix.
  """
  return _norm(lowrank_update, axis) / (_norm(lowrank_grad, axis) + RATIO_EPS)


def initial_norms(plan: projection.LeafPlan) -> jax.Array:
  """The limiter state of a leaf before its first update (one per matrix).

  Args:
    plan: the leaf's plan.

  Returns:
    A float32 array of shape ``plan.batch_shape`` of ``NO_PREVIOUS_NORM``.
  """
  return jnp.full(plan.batch_shape, NO_PREVIOUS_NORM, jnp.float32)


def limit_norm_growth(x: jax.Array, previous_norm: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
  """Fira's norm-growth limiter, per matrix of a batch.

  With ``g = ||x|| / (previous + 1e-8)``, ``x`` is divided by
  ``max(g, GROWTH_LIMIT) / GROWTH_LIMIT``: its norm grows by at most
  ``GROWTH_LIMIT`` over the previous (limited) norm, which becomes the new
  state. On the first update (``previous < 0``) nothing is limited.

  Args:
    x: ``(*batch, m, n)`` float32 scaled gradients.
    previous_norm: ``(*batch)`` the limiter's state.

  Returns:
    The limited ``x`` and its norms (the new state).
  """
  norm = _norm(x, (-2, -1))[..., 0, 0]
  ratio = norm / (previous_norm + RATIO_EPS)
  limiter = jnp.where(previous_norm < 0, 1.0,
                      jnp.maximum(ratio, GROWTH_LIMIT) / GROWTH_LIMIT)
  return x / limiter[..., None, None], norm / limiter
