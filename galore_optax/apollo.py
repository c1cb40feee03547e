"""APOLLO and APOLLO-Mini: a low-rank Adam that only sets the step sizes.

``galore_project(..., output="apollo_channel")`` (APOLLO) or
``output="apollo_tensor"`` (APOLLO-Mini) runs the inner optimizer on the
low-rank gradient ``R`` as GaLore does, but never projects its update ``N``
back. It only yields a scaling factor ``||N|| / ||R||``, per channel (norms
over the projected axis: one factor per row or column of the matrix) or per
matrix, which multiplies the raw full-size gradient ``G``; the result passes
through the norm-growth limiter and is multiplied by ``sqrt(scale)``, as in
the reference (APOLLO-Mini's ``scale=128`` is a factor ``sqrt(128)``).

The projection may be random (``projector_method="random"``, see
``random_projection``: no SVD) or GaLore's (``"svd"``, the reference's
``proj="svd"``).

References:
  Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance",
  arXiv 2412.05270; the package ``apollo-torch`` 1.0.3
  (``apollo_torch.APOLLOAdamW``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from galore_optax import norm_scaling
from galore_optax import projection

SCALE_TYPES = ("channel", "tensor")


def apollo_update(grad: jax.Array, lowrank_grad: jax.Array,
                  lowrank_update: jax.Array, plan: projection.LeafPlan,
                  scale: float | jax.Array, previous_norm: jax.Array,
                  scale_type: str) -> tuple[jax.Array, jax.Array]:
  """One leaf's APOLLO update and new limiter state.

  Args:
    grad: the full ``(*batch, m, n)`` gradient ``G``.
    lowrank_grad: its projection ``R``.
    lowrank_update: the inner optimizer's update ``N`` of ``R``.
    plan: the leaf's plan.
    scale: the update is multiplied by ``sqrt(scale)`` (a float or scalar).
    previous_norm: the limiter's state, ``(*batch)``.
    scale_type: ``"channel"`` (APOLLO) or ``"tensor"`` (APOLLO-Mini).

  Returns:
    The float32 full-size update and the limiter's new state.
  """
  axis = ((norm_scaling.channel_axis(plan),) if scale_type == "channel"
          else (-2, -1))
  ratio = norm_scaling.norm_ratio(lowrank_update, lowrank_grad, axis)
  scaled, norm = norm_scaling.limit_norm_growth(
      grad.astype(jnp.float32) * ratio, previous_norm)
  # After the limiter, as the reference (scale_front=False) does; an opaque
  # scalar, so that XLA never makes a full-size constant of it.
  root = jax.lax.optimization_barrier(
      jnp.sqrt(jnp.asarray(scale, jnp.float32)))
  return scaled * root, norm
