"""Supplied gradients: a projected kernel's gradient made only as needed.

Between refreshes ``galore_project`` uses only the projection of a kernel's
gradient, and for a product ``y = x W`` that projection can be made from
the product's inputs without the ``m x n`` gradient ``G = x^T dy``:
``P^T G = (x P)^T dy`` (left), ``G Q = x^T (dy Q)`` (right), in
``2 t r (m + n)`` flops instead of ``2 t m n + 2 m n r`` for ``t`` tokens.

A ``GradientSupply`` holds both ways of making the gradient, and
``supplying(placeholder, supply)`` hands it to every ``galore_project``
traced inside the ``with`` block: a ``galore_project`` whose incoming
gradient leaf *is* ``placeholder`` (the very array object, so a
transformation before it that changed the gradient breaks the link) takes
the supply instead. Inside its compiled step it calls ``supply.full()`` on
updates that refresh the leaf's projector (and for ``output`` rules,
projector layouts or moment policies that need the full gradient) and
``supply.lowrank(projector)`` on all others; ``consumed`` tells the supplier
afterwards which of the two it traced. The placeholder's values are never
read (XLA removes it); a transformation before ``galore_project`` must pass
the gradient on unchanged.

``layerwise.dense`` supplies the gradients of the kernels it updates
(``make_layerwise_step(fused=True)``).

References:
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
  Projection", ICML 2024, arXiv 2403.03507.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from galore_optax import projection

# The supplies of the traces now running, innermost last.
_ACTIVE: contextvars.ContextVar[tuple[tuple[Any, GradientSupply], ...]] = (
    contextvars.ContextVar("galore_optax_gradient_supply", default=()))


@dataclasses.dataclass(eq=False)
class GradientSupply:
  """Two ways of making one leaf's gradient, and which one was used.

  Attributes:
    full: ``() -> G``, the full ``(m, n)`` gradient in the leaf's dtype.
    lowrank: ``(float32 projector) -> projection.project(G, projector,
      plan)`` made without ``G``, float32.
    ready: an array that exists once the gradient's inputs do, for
      ordering work after them (``ordering.after``), or None.
    consumed: the ways ``galore_project`` traced (``"full"``,
      ``"lowrank"``); empty when no ``galore_project`` took the supply.
  """

  full: Callable[[], jax.Array]
  lowrank: Callable[[projection.Projector], jax.Array]
  ready: Any = None
  consumed: set[str] = dataclasses.field(default_factory=set)

  def make_full(self) -> jax.Array:
    """``full()``, recorded as consumed."""
    self.consumed.add("full")
    return self.full()

  def make_lowrank(self, projector: projection.Projector) -> jax.Array:
    """``lowrank(projector)``, recorded as consumed."""
    self.consumed.add("lowrank")
    return self.lowrank(projector)


def transformed(supply: GradientSupply,
                fn: Callable[[jax.Array], jax.Array]) -> GradientSupply:
  """A supply of ``fn`` of ``supply``'s gradients, each on its own.

  Args:
    supply: the supply.
    fn: applied to the full gradient and to the low-rank one (e.g. clipping
      each by its own norm).

  Returns:
    A new ``GradientSupply`` (nothing consumed yet).
  """
  return GradientSupply(full=lambda: fn(supply.full()),
                        lowrank=lambda projector: fn(supply.lowrank(projector)),
                        ready=supply.ready)


def placeholder(shape: tuple[int, ...], dtype: Any) -> jax.Array:
  """A gradient-shaped stand-in whose values no one reads (zeros).

  Args:
    shape: the leaf's shape.
    dtype: its dtype.

  Returns:
    A new array object to pass to ``supplying`` and the optimizer.
  """
  return jnp.zeros(shape, dtype)


@contextlib.contextmanager
def supplying(stand_in: jax.Array,
              supply: GradientSupply) -> Iterator[GradientSupply]:
  """Hands ``supply`` to a ``galore_project`` that receives ``stand_in``.

  Args:
    stand_in: the array passed as the leaf's gradient (``placeholder``).
    supply: how to make the gradient.

  Yields:
    ``supply``.
  """
  token = _ACTIVE.set(_ACTIVE.get() + ((stand_in, supply),))
  try:
    yield supply
  finally:
    _ACTIVE.reset(token)


def supplied(leaf: Any) -> GradientSupply | None:
  """The supply whose stand-in ``leaf`` is (by identity), or None.

  Args:
    leaf: an incoming gradient leaf.

  Returns:
    The innermost active ``GradientSupply`` for it, or None.
  """
  return next((s for x, s in reversed(_ACTIVE.get()) if x is leaf), None)


def project_product(x: jax.Array, dy: jax.Array,
                    projector: projection.Projector,
                    plan: projection.LeafPlan) -> jax.Array:
  """``projection.project(x^T dy, projector, plan)`` without ``x^T dy``.

  Args:
    x: ``(..., m)`` inputs of the product ``y = x W``.
    dy: ``(..., n)`` gradient of its output (same leading axes).
    projector: float32 factors (``projector_storage.load``).
    plan: the kernel's ``LeafPlan`` (a single ``m x n`` matrix).

  Returns:
    The float32 low-rank gradient, of shape ``plan.lowrank_shape``.
  """
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  dy = dy.reshape(-1, dy.shape[-1]).astype(jnp.float32)
  if plan.use_left:
    x = x @ projector.left.astype(jnp.float32)  # (t, r)
  if plan.use_right:
    dy = dy @ projector.right.astype(jnp.float32).T  # right is (r, n)
  return jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())))
