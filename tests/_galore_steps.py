"""Steps shared by the galore_project test modules."""

import jax
import jax.numpy as jnp
import optax

from galore_optax import galore_project


def random_grads(step, params):
  """Standard-normal gradients for ``params``, drawn from the step."""
  key = jax.random.fold_in(jax.random.key(0), step)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten(
      [jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])


def tanh_chain_step(params, stagger_refresh, projector_method="svd"):
  """A donated-style train step of a chain of ``tanh(h @ W)`` layers under
  ``galore_project(scale_by_adam)``, and its optimizer."""
  x = jnp.ones((4, next(iter(params.values())).shape[0]))

  def loss(p):
    h = x
    for i in range(len(p)):
      h = jnp.tanh(h @ p[f"layer{i}"])
    return jnp.sum(h)

  tx = galore_project(optax.scale_by_adam(), rank=8, update_proj_gap=200,
                      stagger_refresh=stagger_refresh,
                      projector_method=projector_method)

  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s)
    return optax.apply_updates(p, u), s

  return step, tx
