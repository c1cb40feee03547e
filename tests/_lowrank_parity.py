"""Shared by the Fira and APOLLO parity tests: run an optimizer on a
fixture's inputs (a matrix ``w`` and a vector ``vec``), optionally with the
reference's projection matrices put into the state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from galore_optax.transform import GaLoreState

GAP = 4  # the fixtures' update_proj_gap
# ``update_proj_gap`` of a run whose projectors come from the reference:
# no refresh of its own after the state's count is set past 0.
NEVER = 10**6


def galore_state(state):
  """The one ``GaLoreState`` inside an optimizer state."""
  is_galore = lambda x: isinstance(x, GaLoreState)
  (found,) = [x for x in jax.tree.leaves(state, is_leaf=is_galore)
              if is_galore(x)]
  return found


def _replace_galore_state(state, fn):
  is_galore = lambda x: isinstance(x, GaLoreState)
  return jax.tree.map(lambda x: fn(x) if is_galore(x) else x, state,
                      is_leaf=is_galore)


def inject(orthos, shape):
  """A hook that puts the reference's projector into the state at every
  refresh step (built with ``update_proj_gap=NEVER``: the count is set to 1
  so that the optimizer never refreshes by itself; the count only drives
  the refresh schedule, Adam has its own)."""

  def hook(t, state):
    if t % GAP:
      return state

    def put(gs):
      factors = gs.projectors["w"]
      factor = jnp.asarray(orthos[t // GAP])
      factors = (factors._replace(right=factor) if shape == "tall" else
                 factors._replace(left=factor))
      return gs._replace(count=jnp.maximum(gs.count, 1),
                         projectors={"w": factors})

    return _replace_galore_state(state, put)

  return hook


def run_trajectory(tx, ref, shape, hook=None):
  """Params after each step, limiter states and projectors at refreshes."""
  params = {"vec": jnp.asarray(ref["params0/vec"]),
            "w": jnp.asarray(ref[f"params0/{shape}"])}
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = {"params": [], "vec/params": [], "limiter": [], "ortho": []}
  for t in range(len(ref[f"grads/{shape}"])):
    if hook is not None:
      state = hook(t, state)
    grads = {"vec": jnp.asarray(ref["grads/vec"][t]),
             "w": jnp.asarray(ref[f"grads/{shape}"][t])}
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    gs = galore_state(state)
    out["params"].append(np.asarray(params["w"]))
    out["vec/params"].append(np.asarray(params["vec"]))
    out["limiter"].append(np.asarray(gs.limiter_norms["w"]))
    if t % GAP == 0:
      factors = gs.projectors["w"]
      side = factors.right if shape == "tall" else factors.left
      out["ortho"].append(np.asarray(side))
  return {k: np.stack(v) for k, v in out.items()}


def compare(ours, ref, case, rtol, atol):
  """Parameters (both) and limiter states against the reference's."""
  np.testing.assert_allclose(ours["params"], ref[f"{case}/params"],
                             rtol=rtol, atol=atol)
  np.testing.assert_allclose(ours["vec/params"], ref[f"{case}/vec/params"],
                             rtol=rtol, atol=atol)
  # A norm of a whole matrix, summed in another order.
  np.testing.assert_allclose(ours["limiter"], ref[f"{case}/limiter"],
                             rtol=1e-5)
