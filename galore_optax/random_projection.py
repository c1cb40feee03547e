"""Random Gaussian projectors (APOLLO's): drawn from a key, never from an SVD.

``galore_project(..., projector_method="random")`` replaces each projected
leaf's factor, at the leaf's refreshes (updates ``0, T, 2T, ...``), by a
standard-normal matrix divided by ``sqrt(r)`` (so ``E[P^T P] = I``; the
columns are not orthonormal), of the factor's usual shape. Its key is
``fold_in(fold_in(key(seed), crc32(name)), refresh)`` with ``name`` the
leaf's dotted path name and ``refresh = count // T``: the matrices depend on
the seed, the leaf and the refresh only, so a run, a resumed run and a
per-layer step (which sees one leaf at a time, under its own name) draw the
same ones; every matrix of a stacked leaf gets its own. The gradient is not
read, so a refresh costs one random draw.

The factor is stored in the state between refreshes (``projector_dtype``
applies), rather than redrawn at every update: a draw of ``m x r`` normals
per matrix per update would cost more than keeping them (for rank 1, a
vector per matrix), and a stored projector can be replaced in the state
(e.g. by another implementation's matrices in a test).

References:
  Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance",
  arXiv 2412.05270 (its ``GradientProjector``; its seeds are per-parameter
  torch generator states, which this scheme replaces by JAX keys).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import optax

from galore_optax import projection
from galore_optax import projector_storage
from galore_optax import refresh

METHOD = "random"


def leaf_key(seed: int, name: str, refresh_index: jax.Array) -> jax.Array:
  """The key of a leaf's random projector at one refresh.

  Args:
    seed: ``galore_project``'s seed.
    name: the leaf's dotted path name.
    refresh_index: ``count // update_proj_gap``.

  Returns:
    A PRNG key.
  """
  leaf = zlib.crc32(name.encode()) & 0x7FFFFFFF
  return jax.random.fold_in(
      jax.random.fold_in(jax.random.key(seed), leaf), refresh_index)


def gaussian_projector(key: jax.Array,
                       plan: projection.LeafPlan) -> projection.Projector:
  """A random projector: standard normal factors divided by ``sqrt(r)``.

  Args:
    key: PRNG key.
    plan: the leaf's plan.

  Returns:
    A float32 ``Projector`` with the factors ``plan`` uses.
  """
  keys = jax.random.split(key)
  draw = lambda k, shape: (jax.random.normal(k, shape, jnp.float32) /
                           jnp.sqrt(jnp.float32(plan.rank)))
  return projection.Projector(
      draw(keys[0], plan.left_shape) if plan.use_left
      else optax.MaskedNode(),
      draw(keys[1], plan.right_shape) if plan.use_right
      else optax.MaskedNode())


def refresh_due(names: list[str],
                plans: dict[int, projection.LeafPlan],
                stored: dict[int, projection.Projector],
                inner_state: optax.OptState, count: jax.Array, gap: int,
                seed: int, projector_dtype: str) -> refresh.Refreshed:
  """``RefreshPolicy.refresh_due`` for random projectors.

  Args:
    names: every leaf's path name.
    plans: by leaf index, the projected leaves' plans.
    stored: by leaf index, their stored projectors.
    inner_state: the inner state (returned as it is).
    count: the update count.
    gap: ``update_proj_gap``.
    seed: ``galore_project``'s seed.
    projector_dtype: the projectors' storage.

  Returns:
    The projectors, redrawn where due, the inner state, and per projected
    leaf one array of its projector.
  """
  due = refresh.is_due(count, 0, gap)
  new = {}
  for i, plan in plans.items():
    draw = lambda i=i, plan=plan: projector_storage.store(gaussian_projector(
        leaf_key(seed, names[i], count // gap), plan), projector_dtype)
    new[i] = jax.lax.cond(due, draw, lambda i=i: stored[i])
  # No refresh reads a gradient, so nothing here stands for the gradients
  # (galore_project's back-projections then wait for the projectors only).
  return refresh.Refreshed(
      new, inner_state, [jax.tree.leaves(new[i])[0] for i in plans])
