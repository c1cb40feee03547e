"""What ``galore_project`` does with the low-rank result: its ``output`` rule.

* ``"galore"``: project the inner update back, times ``scale`` (GaLore).
* ``"fira"``: that plus the scaled, norm-limited residual of the gradient
  (``galore_optax.fira``).
* ``"apollo_channel"`` / ``"apollo_tensor"``: the raw gradient times a
  per-channel / per-matrix factor from the low-rank update, norm-limited,
  times ``sqrt(scale)`` (``galore_optax.apollo``; APOLLO / APOLLO-Mini).

The rules other than ``"galore"`` keep one float32 per matrix (the
norm-growth limiter's state, ``GaLoreState.limiter_norms``). ``"galore"``
itself stays in ``galore_project`` (its back-projections are ordered for
donated buffers, see ``transform``).

References:
  Zhao et al., 2024, arXiv 2403.03507 (GaLore); Chen et al., 2024,
  arXiv 2410.01623 (Fira); Zhu et al., 2024, arXiv 2412.05270 (APOLLO).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from galore_optax import apollo
from galore_optax import fira
from galore_optax import projection

OUTPUT_RULES = ("galore", "fira", "apollo_channel", "apollo_tensor")


def has_limiter(output: str) -> bool:
  """Whether rule ``output`` keeps a norm-growth limiter state.

  Args:
    output: one of ``OUTPUT_RULES``.

  Returns:
    True for every rule but ``"galore"``.
  """
  return output != "galore"


def check_output(output: str, proj_type: str) -> None:
  """Raises a ValueError if rule ``output`` cannot use ``proj_type``.

  Args:
    output: one of ``OUTPUT_RULES``.
    proj_type: ``galore_project``'s ``proj_type``.
  """
  if output in ("fira", "apollo_channel") and proj_type == "full":
    raise ValueError(
        f"output={output!r} scales the gradient per row or column, which "
        "needs a one-sided projection; proj_type='full' has none.")


def full_size_update(output: str, grad: jax.Array, lowrank_grad: jax.Array,
                     lowrank_update: jax.Array,
                     factors: projection.Projector,
                     plan: projection.LeafPlan, scale: float,
                     previous_norm: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
  """One projected leaf's full-size update under a rule with a limiter.

  Args:
    output: ``"fira"``, ``"apollo_channel"`` or ``"apollo_tensor"``.
    grad: the full gradient, as a (batch of) matrices.
    lowrank_grad: its projection.
    lowrank_update: the inner optimizer's update of it.
    factors: the float32 projector.
    plan: the leaf's plan.
    scale: ``galore_project``'s ``scale``.
    previous_norm: the limiter's state.

  Returns:
    The float32 update (the leaf's matrix shape) and the limiter's state.
  """
  if output == "fira":
    alpha = jax.lax.optimization_barrier(jnp.asarray(scale, jnp.float32))
    return fira.fira_update(grad, lowrank_grad, lowrank_update, factors,
                            plan, alpha, previous_norm)
  return apollo.apollo_update(grad, lowrank_grad, lowrank_update, plan,
                              scale, previous_norm,
                              output.removeprefix("apollo_"))
