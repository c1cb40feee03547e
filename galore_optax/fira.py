"""Fira: GaLore's update plus the scaled part of the gradient it discards.

``galore_project(..., output="fira")`` uses the low-rank result twice. As in
GaLore, the inner update ``N`` is projected back and scaled by ``alpha``.
Added to it is the residual ``G - alpha * back(R)`` of the gradient (with
``R`` the low-rank gradient; for ``alpha = 1`` the part outside the
subspace), multiplied per channel by ``||N|| / ||R||`` (norms over the
projected axis: Adam's per-channel step size, measured in the subspace and
lent to the rest of the gradient), then passed through the norm-growth
limiter (``norm_scaling``). The residual keeps the reference's ``alpha``
(``project_back`` there returns ``alpha`` times the product).

References:
  Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under
  Low-rank Constraint?", arXiv 2410.01623; the package ``fira`` 1.0.2
  (``fira.FiraAdamW``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from galore_optax import norm_scaling
from galore_optax import projection


def fira_update(grad: jax.Array, lowrank_grad: jax.Array,
                lowrank_update: jax.Array, factors: projection.Projector,
                plan: projection.LeafPlan, alpha: jax.Array,
                previous_norm: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One leaf's Fira update and new limiter state.

  Args:
    grad: the full ``(*batch, m, n)`` gradient ``G``.
    lowrank_grad: its projection ``R``.
    lowrank_update: the inner optimizer's update ``N`` of ``R``.
    factors: the float32 projector.
    plan: the leaf's plan (one side projected).
    alpha: ``scale``, a float32 scalar.
    previous_norm: the limiter's state, ``(*batch)``.

  Returns:
    The float32 full-size update and the limiter's new state.
  """
  back = lambda x: projection.project_back(
      x.astype(jnp.float32) * alpha, factors, plan)
  residual = grad.astype(jnp.float32) - back(lowrank_grad)
  ratio = norm_scaling.norm_ratio(lowrank_update, lowrank_grad,
                                  (norm_scaling.channel_axis(plan),))
  scaled, norm = norm_scaling.limit_norm_growth(residual * ratio,
                                                previous_norm)
  return back(lowrank_update) + scaled, norm
