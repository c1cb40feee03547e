"""galore_adamw_8bit against galore_torch.GaLoreAdamW8bit (bitsandbytes 0.50).

Fixtures: ``tests/fixtures/generate_galore_torch.py`` ran the reference on
CPU (its ``torch.cuda.synchronize()`` neutralised) with canonical singular
vector signs, rank 32, gap 4, scale 0.25, lr 0.01, eps 1e-8, no decay, on
(130, 40) and (40, 130) gradients, so the projected moments (4160 values,
17 blocks of 256) are stored in 8 bits.

bitsandbytes' CPU kernel picks codes through a 65536-bin lookup table, not the
nearest code, so states differ in a few codes per step and the trajectories
drift apart slowly. The bound is bitsandbytes' own for its 8-bit Adam tests:
mean absolute parameter error below 6e-5.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from galore_optax import galore_adamw_8bit
from galore_optax import quantization

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def ref():
  with np.load(FIXTURES / "galore_torch_adamw8bit.npz") as f:
    return {k: f[k] for k in f.keys() if k != "__meta__"}


def _run(ref, shape, rank, **kwargs):
  tx = galore_adamw_8bit(0.01, rank=rank, update_proj_gap=4, scale=0.25,
                         eps=1e-8, target_modules=["w"], **kwargs)
  params = {"w": jnp.asarray(ref[f"params0/{shape}"])}
  state = tx.init(params)
  update = jax.jit(tx.update)
  out, states = [], []
  for g in ref[f"grads/{shape}"]:
    updates, state = update({"w": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
    out.append(np.asarray(params["w"]))
    adam = state[0].inner_states["galore"].inner_state.inner_state.inner_state
    states.append(adam)
  return np.stack(out), states


@pytest.mark.parametrize("shape", ["tall", "wide"])
def test_trajectory_within_bitsandbytes_bound(ref, shape):
  ours, states = _run(ref, shape, rank=32)
  expected = ref[f"canonical/std/{shape}/params"]
  err = np.abs(ours - expected).mean(axis=(1, 2))
  assert np.all(err < 6e-5), err
  # The states really are 8-bit, on the same maps and block layout.
  mu = states[-1].mu["w"]
  assert mu.codes.dtype == jnp.uint8 and mu.absmax.shape == (17,)
  np.testing.assert_array_equal(quantization.create_dynamic_map(True),
                                ref[f"canonical/std/{shape}/qmap1"])
  np.testing.assert_array_equal(quantization.create_dynamic_map(False),
                                ref[f"canonical/std/{shape}/qmap2"])


@pytest.mark.parametrize("shape", ["tall", "wide"])
def test_states_match_reference(ref, shape):
  """Step 0 quantises the same moments: >= 95% identical codes, as for
  ``quantize_blockwise``. Later steps start from slightly different states;
  their dequantised moments stay within 0.1% (mean relative), far below the
  ~1.5% error of the 8-bit map itself."""
  _, states = _run(ref, shape, rank=32)
  prefix = f"canonical/std/{shape}"
  for t, st in enumerate(states):
    for ours, key, signed in ((st.mu["w"], "1", True),
                              (st.nu["w"], "2", False)):
      codes, absmax = (ref[f"{prefix}/state{key}"][t],
                       ref[f"{prefix}/absmax{key}"][t])
      if t == 0:
        assert np.mean(np.asarray(ours.codes) == codes) >= 0.95
      theirs = quantization.dequantize_blockwise(
          codes, absmax, ref[f"{prefix}/qmap{key}"])
      mine = quantization.dequantize(ours, signed)
      rel = float(jnp.abs(mine - theirs).mean() / jnp.abs(theirs).mean())
      assert rel < 1e-3, (t, key, rel)


def test_wrong_scale_is_detected(ref):
  tx_scale = 0.5
  tx = galore_adamw_8bit(0.01, rank=32, update_proj_gap=4, scale=tx_scale,
                         target_modules=["w"])
  params = {"w": jnp.asarray(ref["params0/tall"])}
  state = tx.init(params)
  for g in ref["grads/tall"]:
    updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
  err = np.abs(np.asarray(params["w"]) - ref["canonical/std/tall/params"][-1])
  assert err.mean() > 6e-5


def test_small_projected_tensors_use_float32_adam(ref):
  """Under 4096 projected values the state stays float32 (plain Adam).

  The reference's ``small`` case never moves (bitsandbytes 0.50 receives
  ``max_unorm=100`` through a shifted positional argument and clips the
  update of the zero placeholder to zero); ``small_noclip`` passes the
  arguments that restore plain Adam, and that is what we match.
  """
  ours, states = _run(ref, "small", rank=8)
  assert states[-1].mu["w"].dtype == jnp.float32
  assert np.all(ref["canonical/std/small/params"] == ref["params0/small"])
  np.testing.assert_allclose(ours, ref["canonical/std/small_noclip/params"],
                             rtol=1e-6, atol=1e-6)
  # Moments are un-normalised projected gradients: the two SVDs' factors
  # agree to ~1e-6, so entries agree to ~1e-6 of the moment's largest entry.
  mu_ref = ref["canonical/std/small_noclip/state1_fp32"][-1]
  np.testing.assert_allclose(states[-1].mu["w"], mu_ref, rtol=0,
                             atol=1e-5 * np.abs(mu_ref).max())
