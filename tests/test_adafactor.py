"""galore_adafactor and its primitives against galore_torch.GaLoreAdafactor.

The fixture comes from ``tests/fixtures/generate_galore_torch.py`` running the
real reference (torch 2.13, galore-torch 1.0): one optimizer with a GaLore
matrix ``w`` (rank 8, gap 4, scale 0.25, std), a plain matrix ``mat`` and a
plain vector ``vec``; lr 0.01, eps 1e-30, clip 1.0, decay_rate -0.8,
beta1 None or 0.9, 10 steps; parameters and states after every step.

What is comparable, and how:

* ``canonical/`` cases ran the reference with our singular-vector sign
  convention: parameters, states and projectors at every step.
* Raw (LAPACK-sign) cases: without ``beta1`` Adafactor only keeps statistics
  of *squared* projected gradients, and its update ``g * r * c`` flips with
  ``g``, so a sign flip of a singular vector cancels exactly, across
  refreshes too: all steps are compared. With ``beta1`` the first moment
  carried into the next window remembers the old signs: the GaLore
  parameter is compared in the first window (steps 0-3) only.
* ``mat`` and ``vec`` never see a projector: all steps, every case.

Tolerances are float32 rounding: the measured worst parameter error is
1.2e-7 (4.8e-7 with weight decay) on parameters of size ~1.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from galore_optax import ScaleByFactoredRmsHfState
from galore_optax import clip_by_matrix_rms
from galore_optax import galore_adafactor
from galore_optax import quantize_state_8bit
from galore_optax import scale_by_adafactor
from galore_optax import scale_by_factored_rms_hf
from galore_optax.state_8bit import is_second_moment

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
RTOL, ATOL = 1e-6, 1e-6  # a few float32 ulps of parameters ~1
STATE_RTOL = 1e-5  # second moments are ~1e3: relative float32 rounding
STEPS = 10
REFRESHES = (0, 4, 8)


@pytest.fixture(scope="module")
def ref():
  with np.load(FIXTURES / "galore_torch_adafactor.npz") as f:
    return {k: f[k] for k in f.keys() if k != "__meta__"}


def _tx(beta1, weight_decay=0.0, **kwargs):
  kwargs = {"rank": 8, "update_proj_gap": 4, "scale": 0.25,
            "proj_type": "std", "decay_rate": -0.8, "eps": 1e-30,
            "clip_threshold": 1.0, **kwargs}
  return galore_adafactor(0.01, beta1=beta1, weight_decay=weight_decay,
                          target_modules="w", **kwargs)


def _snapshot(state, beta1):
  """The states the fixture stores, in its names, from our chain's state."""
  partition = state[0]
  galore = partition.inner_states["galore"].inner_state
  full = partition.inner_states["full_rank"].inner_state
  out = {
      "exp_avg_sq_row": galore.inner_state[0].v_row["w"],
      "exp_avg_sq_col": galore.inner_state[0].v_col["w"],
      "mat/exp_avg_sq_row": full[0].v_row["mat"],
      "mat/exp_avg_sq_col": full[0].v_col["mat"],
      "vec/exp_avg_sq": full[0].v["vec"],
  }
  if beta1 is not None:
    out["exp_avg"] = galore.inner_state[3].ema["w"]
    out["mat/exp_avg"] = full[3].ema["mat"]
    out["vec/exp_avg"] = full[3].ema["vec"]
  return out, galore.projectors["w"]


def _run(ref, shape, tx, beta1=None):
  """Our trajectory: params, states and projectors after each step."""
  params = {"w": jnp.asarray(ref[f"params0/{shape}"]),
            "mat": jnp.asarray(ref["params0/mat"]),
            "vec": jnp.asarray(ref["params0/vec"])}
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = {}
  projectors = []
  for t in range(STEPS):
    grads = {"w": ref[f"grads/{shape}"][t], "mat": ref["grads/mat"][t],
             "vec": ref["grads/vec"][t]}
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    states, projector = _snapshot(state, beta1)
    rows = {"params": params["w"], "mat/params": params["mat"],
            "vec/params": params["vec"], **states}
    for k, v in rows.items():
      out.setdefault(k, []).append(np.asarray(v))
    projectors.append(projector)
  return {k: np.stack(v) for k, v in out.items()}, projectors


def _assert_case(ref, case, ours, galore_steps=STEPS):
  for key, values in ours.items():
    expected = ref[f"{case}/{key}"]
    steps = STEPS if "/" in key else galore_steps  # mat/..., vec/...
    tol = (dict(rtol=RTOL, atol=ATOL) if key.endswith("params")
           else dict(rtol=STATE_RTOL, atol=1e-6))
    np.testing.assert_allclose(values[:steps], expected[:steps],
                               err_msg=f"{case}/{key}", **tol)


def _beta1(name):
  return None if name == "none" else 0.9


@pytest.mark.parametrize("shape", ["tall", "wide"])
@pytest.mark.parametrize("b1name", ["none", "0.9"])
def test_canonical_trajectory_matches_reference(ref, b1name, shape):
  beta1 = _beta1(b1name)
  case = f"canonical/beta1_{b1name}/{shape}"
  ours, projectors = _run(ref, shape, _tx(beta1), beta1)
  _assert_case(ref, case, ours)
  side = "right" if shape == "tall" else "left"  # std keeps the larger side
  for window, step in enumerate(REFRESHES):
    np.testing.assert_allclose(getattr(projectors[step], side),
                               ref[f"{case}/ortho_{side}"][window], atol=2e-5)


@pytest.mark.parametrize("shape", ["tall", "wide"])
@pytest.mark.parametrize("b1name", ["none", "0.9"])
def test_raw_sign_trajectory_matches_reference(ref, b1name, shape):
  beta1 = _beta1(b1name)
  ours, _ = _run(ref, shape, _tx(beta1), beta1)
  # See the module docstring: without a first moment signs cancel for good.
  _assert_case(ref, f"beta1_{b1name}/{shape}", ours,
               galore_steps=STEPS if beta1 is None else REFRESHES[1])


def test_weight_decay_matches_reference(ref):
  ours, _ = _run(ref, "tall", _tx(0.9, weight_decay=0.1), 0.9)
  _assert_case(ref, "canonical/wd/beta1_0.9/tall", ours)


def test_weight_decay_with_constant_schedule_matches_reference(ref):
  """The schedule path (lr and lr * wd as functions) gives the same result."""
  tx = galore_adafactor(lambda count: 0.01, rank=8, update_proj_gap=4,
                        beta1=0.9, weight_decay=0.1, target_modules="w")
  ours, _ = _run(ref, "tall", tx, 0.9)
  _assert_case(ref, "canonical/wd/beta1_0.9/tall", ours)


@pytest.mark.parametrize("wrong", [{"decay_rate": -0.5},
                                   {"clip_threshold": 2.0},
                                   {"clip_threshold": 1e9},
                                   {"scale": 0.5},
                                   {"beta1": 0.8},
                                   {"weight_decay": 0.1}])
def test_wrong_setting_is_detected(ref, wrong):
  """The comparison can fail: each deliberately wrong setting makes it.

  ``clip_threshold=1e9`` (no clipping) differing shows that the reference's
  clipping is active on these gradients.
  """
  kwargs = {"beta1": 0.9, **wrong}
  beta1 = kwargs.pop("beta1")
  ours, _ = _run(ref, "tall", _tx(beta1, **kwargs), beta1)
  expected = ref["canonical/beta1_0.9/tall/params"]
  assert not np.allclose(ours["params"], expected, rtol=RTOL, atol=ATOL)


def test_weight_decay_follows_a_learning_rate_schedule():
  """With zero gradients only the decay acts: p <- p (1 - wd * lr_t)."""
  schedule = lambda count: 0.1 * (count + 1)
  tx = galore_adafactor(schedule, rank=2, update_proj_gap=2, beta1=0.9,
                        weight_decay=0.5, target_modules="w")
  params = {"w": jnp.ones((6, 4)), "b": jnp.ones((3,))}
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state,
                               params)
    params = optax.apply_updates(params, updates)
  expected = (1 - 0.05) * (1 - 0.1) * (1 - 0.15)
  for leaf in jax.tree.leaves(params):
    np.testing.assert_allclose(leaf, expected, rtol=1e-6)


def test_learning_rate_is_averaged_by_the_first_moment():
  """With beta1 the EMA mixes lr-scaled updates (lr inside, as upstream)."""
  g = jnp.array([[3.0, -1.0], [0.5, 2.0]])
  schedule = lambda count: 1.0 + count  # lr 1, then 2
  tx = scale_by_adafactor(schedule, beta1=0.5)
  plain = scale_by_adafactor(1.0)
  state, plain_state = tx.init(g), plain.init(g)
  u1, plain_state = plain.update(g, plain_state)
  u2, plain_state = plain.update(g, plain_state)
  _, state = tx.update(g, state)
  out, state = tx.update(g, state)
  # m1 = 0.5 * (1 * u1); m2 = 0.5 * m1 + 0.5 * (2 * u2)
  np.testing.assert_allclose(out, 0.25 * u1 + u2, rtol=1e-6)


def test_jit_compiles_once_across_refreshes():
  traces = []
  tx = galore_adafactor(optax.linear_schedule(0.01, 0.0, 10), rank=2,
                        update_proj_gap=3, beta1=0.9, weight_decay=0.1,
                        target_modules="w")

  @jax.jit
  def step(params, state, grads):
    traces.append(None)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = {"w": jnp.ones((8, 5)), "b": jnp.ones((5,))}
  state = tx.init(params)
  key = jax.random.key(0)
  for t in range(7):  # refreshes at 0, 3, 6
    grads = jax.tree.map(
        lambda p, t=t: jax.random.normal(jax.random.fold_in(key, t), p.shape),
        params)
    params, state = step(params, state, grads)
  assert len(traces) == 1
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def _stacked_grads(key, steps=4):
  """(3, 6, 5) gradients whose matrices have very different scales, so the
  per-matrix statistics and clipping cannot agree by accident."""
  scales = jnp.array([1.0, 100.0, 1e-3])[:, None, None]
  return [jax.random.normal(jax.random.fold_in(key, t), (3, 6, 5)) * scales
          for t in range(steps)]


@pytest.mark.parametrize("galore", [False, True])
def test_stacked_leaf_equals_separate_leaves(galore):
  if galore:
    tx = galore_adafactor(0.01, rank=2, update_proj_gap=2, beta1=0.9,
                          weight_decay=0.1)
  else:
    tx = optax.chain(scale_by_adafactor(0.01, beta1=0.9), optax.scale(-1.0))
  p0 = jax.random.normal(jax.random.key(1), (3, 6, 5))
  stacked = {"w": p0}
  separate = {f"w{i}": p0[i] for i in range(3)}
  s_stacked, s_separate = tx.init(stacked), tx.init(separate)
  for g in _stacked_grads(jax.random.key(2)):
    u, s_stacked = tx.update({"w": g}, s_stacked, stacked)
    stacked = optax.apply_updates(stacked, u)
    u, s_separate = tx.update({f"w{i}": g[i] for i in range(3)}, s_separate,
                              separate)
    separate = optax.apply_updates(separate, u)
  for i in range(3):
    np.testing.assert_allclose(stacked["w"][i], separate[f"w{i}"],
                               rtol=1e-6, atol=1e-6)


def test_clip_by_matrix_rms_is_per_matrix_and_per_vector():
  u = {"m": jnp.stack([jnp.full((2, 3), 4.0), jnp.full((2, 3), 0.5)]),
       "v": jnp.full((4,), 3.0)}
  out, _ = clip_by_matrix_rms(2.0).update(u, optax.EmptyState())
  np.testing.assert_allclose(out["m"][0], 2.0)  # RMS 4 -> 2
  np.testing.assert_allclose(out["m"][1], 0.5)  # under the threshold
  np.testing.assert_allclose(out["v"], 2.0)
  # On 2-D leaves it is optax's per-leaf clipping.
  m = jax.random.normal(jax.random.key(0), (5, 7)) * 3
  ours, _ = clip_by_matrix_rms(1.0).update(m, optax.EmptyState())
  theirs, _ = optax.clip_by_block_rms(1.0).update(m, optax.EmptyState())
  np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_factored_state_shapes_and_dtypes():
  params = {"m": jnp.zeros((2, 6, 5), jnp.bfloat16), "v": jnp.zeros((4,)),
            "s": jnp.zeros(())}
  tx = scale_by_factored_rms_hf()
  state = tx.init(params)
  assert isinstance(state, ScaleByFactoredRmsHfState)
  assert state.v_row["m"].shape == (2, 6)
  assert state.v_col["m"].shape == (2, 5)
  assert isinstance(state.v["m"], optax.MaskedNode)
  assert isinstance(state.v_row["v"], optax.MaskedNode)
  assert state.v["v"].shape == (4,) and state.v["s"].shape == ()
  assert all(x.dtype == jnp.float32 for x in
             (state.v_row["m"], state.v_col["m"], state.v["v"]))
  grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
  updates, state = tx.update(grads, state)
  assert updates["m"].dtype == jnp.bfloat16
  # First step: beta2 = 0, so v = g^2 + eps and the update is g / |g| = 1.
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_allclose(np.asarray(leaf, np.float32), 1.0, rtol=1e-2)


def test_8bit_state_uses_the_unsigned_map_for_second_moments():
  tx = quantize_state_8bit(scale_by_adafactor(0.01, beta1=0.9), min_size=1)
  params = {"m": jnp.ones((64, 48)), "v": jnp.ones((300,))}
  state = tx.init(params)
  inner = state.inner_state
  leaves = jax.tree_util.tree_flatten_with_path(inner)[0]
  kinds = {}
  for path, _ in leaves:
    name = jax.tree_util.keystr(path)
    kinds[name] = is_second_moment(inner, path)
  second = [n for n, s in kinds.items() if s]
  assert second and all(
      any(f in n for f in (".v_row", ".v_col", ".v[")) for n in second)
  assert not any(s for n, s in kinds.items() if ".ema" in n)
  # It runs, and stays close to the float32 optimizer.
  ref_tx = scale_by_adafactor(0.01, beta1=0.9)
  ref_state = ref_tx.init(params)
  key = jax.random.key(0)
  for t in range(3):
    g = jax.tree.map(
        lambda p, t=t: jax.random.normal(jax.random.fold_in(key, t), p.shape),
        params)
    u, state = tx.update(g, state)
    u_ref, ref_state = ref_tx.update(g, ref_state)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref)):
    np.testing.assert_allclose(a, b, atol=2e-3 * float(jnp.abs(b).max()))


def test_inject_hyperparams_with_a_schedule():
  tx = optax.inject_hyperparams(
      galore_adafactor,
      static_args=("rank", "update_proj_gap", "proj_type", "target_modules",
                   "projector_method", "projector_dtype", "stagger_refresh",
                   "seed"))(
          learning_rate=optax.linear_schedule(0.01, 0.0, 5), rank=2,
          update_proj_gap=2, weight_decay=0.1)
  params = {"w": jnp.ones((6, 4)), "b": jnp.ones((3,))}
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.3), params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.01)


@pytest.mark.parametrize("factory, kwargs", [
    (scale_by_factored_rms_hf, {"decay_rate": 0.5}),
    (scale_by_factored_rms_hf, {"eps": -1.0}),
    (clip_by_matrix_rms, {"threshold": 0.0}),
    (scale_by_adafactor, {"learning_rate": 0.1, "beta1": 1.0}),
    (scale_by_adafactor, {"learning_rate": 0.1, "clip_threshold": -1.0}),
    (scale_by_adafactor, {"learning_rate": float("nan")}),
    (galore_adafactor, {"learning_rate": 0.1, "weight_decay": "x"}),
    (galore_adafactor, {"learning_rate": 0.1, "rank": 0}),
])
def test_bad_arguments_fail_at_construction(factory, kwargs):
  with pytest.raises(ValueError):
    factory(**kwargs)
