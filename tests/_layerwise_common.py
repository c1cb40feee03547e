"""Helpers shared by the per-layer step's tests (test_layerwise*.py)."""

import jax
import numpy as np
import optax

FAST = {"xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True}
LR = 1e-2


def ordinary_step(loss_fn, tx):

  def step(params, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return jax.jit(step, compiler_options=FAST)


def jit_init(init, params):
  """One compiled init instead of many small eager ops (faster here)."""
  return jax.jit(init)(params)


def run(step, params, state, batches):
  losses = []
  for batch in batches:
    params, state, loss = step(params, state, batch)
    losses.append(float(loss))
  return params, state, losses


def assert_close(a, b, eight_bit=False):
  """Float32 rounding; 8-bit states may move one code at a rounding tie."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape
    if eight_bit:
      diff = np.abs(x - y)
      assert np.mean(diff > 1e-6) < 1e-3 and diff.max() < 0.02 * LR
    else:
      np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
