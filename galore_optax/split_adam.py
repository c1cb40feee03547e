"""Adam split in two: the uncorrected moment ratio, then the bias correction.

``optax.scale_by_adam`` returns ``m_hat / (sqrt(v_hat) + eps)`` with
bias-corrected moments. The Fira and APOLLO references (like
``transformers``' AdamW they derive from) compute ``m / (sqrt(v) + eps)``
from the raw moments and multiply the *final* update, after their
norm-growth limiter, by ``sqrt(1 - b2^t) / (1 - b1^t)``. The limiter
compares the norms of successive updates, so the two orders differ while
that factor changes (the first few hundred steps). Chaining
``scale_by_uncorrected_adam`` (inside the projection) with
``scale_by_adam_bias_correction`` (after it) is the references' order.

References:
  Kingma and Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015,
  arXiv 1412.6980; Loshchilov and Hutter, "Decoupled Weight Decay
  Regularization", ICLR 2019, arXiv 1711.05101.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax


def scale_by_uncorrected_adam(b1: float = 0.9, b2: float = 0.999,
                              eps: float = 1e-8,
                              mu_dtype: Any = None
                              ) -> optax.GradientTransformation:
  """Adam's ``m / (sqrt(v) + eps)`` with moments not bias-corrected.

  The state is ``optax.ScaleByAdamState`` (so ``quantize_state_8bit``,
  ``moments="project"`` and the memory accounting treat it as Adam's).

  Args:
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to ``sqrt(v)``.
    mu_dtype: optional dtype of the first moment.

  Returns:
    An ``optax.GradientTransformation``.
  """

  def init_fn(params):
    mu = optax.tree.zeros_like(params, dtype=mu_dtype)
    nu = optax.tree.zeros_like(params)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=mu,
                                  nu=nu)

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
    mu = optax.tree.cast(mu, mu_dtype)
    return updates, optax.ScaleByAdamState(
        count=optax.safe_increment(state.count), mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_adam_bias_correction(b1: float = 0.9, b2: float = 0.999
                                  ) -> optax.GradientTransformation:
  """Multiplies by Adam's ``sqrt(1 - b2^t) / (1 - b1^t)`` at update ``t``.

  Args:
    b1: first-moment decay.
    b2: second-moment decay.

  Returns:
    An ``optax.GradientTransformation`` (``optax.scale_by_schedule``).
  """

  def one_minus_power(b: Any, t: jax.Array) -> jax.Array:
    # 1 - b^t as -expm1(t log b), with log b from the Python float when
    # there is one: float32's 0.999 is off by 1.3e-5 relative in 1 - b,
    # which the reference (Python floats) is not.
    log_b = math.log(b) if isinstance(b, (int, float)) else jnp.log(b)
    return -jnp.expm1(t * jnp.asarray(log_b, jnp.float32))

  def factor(count: jax.Array) -> jax.Array:
    t = (count + 1).astype(jnp.float32)
    return jnp.sqrt(one_minus_power(b2, t)) / one_minus_power(b1, t)

  return optax.scale_by_schedule(factor)
