"""galore_project: state, jit, dtypes, moments, ordering, guards.

The refresh schedule (batches, phases, loops) is tested in test_refresh.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _galore_steps import random_grads
from _galore_steps import tanh_chain_step
from galore_optax import GaLoreState
from galore_optax import galore_project
from galore_optax import ordering
from galore_optax import projection
from galore_optax import quantize_state_8bit


PARAMS = {"w": jnp.zeros((12, 8)), "b": jnp.zeros((8,)),
          "stack": jnp.zeros((3, 6, 10))}


def test_state_shapes_and_types():
  tx = galore_project(optax.scale_by_adam(), rank=4)
  state = tx.init(PARAMS)
  assert isinstance(state, GaLoreState)
  assert state.count.dtype == jnp.int32
  assert state.projectors["w"].right.shape == (4, 8)
  assert isinstance(state.projectors["w"].left, optax.MaskedNode)
  assert set(state.projectors) == {"w", "stack"}  # 1-D leaves: none
  assert state.projectors["stack"].left.shape == (3, 6, 4)
  assert state.inner_state.mu["w"].shape == (12, 4)
  assert state.inner_state.mu["b"].shape == (8,)
  assert state.inner_state.mu["stack"].shape == (3, 4, 10)


def test_refresh_at_multiples_of_gap_only():
  tx = galore_project(optax.scale_by_adam(), rank=3, update_proj_gap=3)
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  history = []
  for step in range(8):
    _, state = update(random_grads(step, PARAMS), state)
    history.append(np.asarray(state.projectors["w"].right))
  changed = [step for step in range(1, 8)
             if not np.array_equal(history[step], history[step - 1])]
  assert changed == [3, 6]
  # The refresh uses the gradient of that very step.
  g6 = random_grads(6, PARAMS)["w"]
  expected = projection.compute_projector(
      g6, projection.plan_leaf((12, 8), 3, "std"))
  np.testing.assert_allclose(history[6], expected.right, atol=1e-6)


def test_moments_are_kept_across_refresh():
  tx = galore_project(optax.scale_by_adam(), rank=3, update_proj_gap=2)
  state = tx.init(PARAMS)
  for step in range(2):
    _, state = tx.update(random_grads(step, PARAMS), state)
  mu_before = state.inner_state.mu["w"]
  g = random_grads(2, PARAMS)
  _, after = tx.update(g, state)
  low = projection.project(g["w"], after.projectors["w"],
                           projection.plan_leaf((12, 8), 3, "std"))
  np.testing.assert_allclose(after.inner_state.mu["w"],
                             0.9 * mu_before + 0.1 * low, rtol=1e-5, atol=1e-6)
  assert int(after.inner_state.count) == 3


def test_update_is_scaled_back_projection():
  tx = galore_project(optax.identity(), rank=3, scale=0.5)
  g = random_grads(0, PARAMS)
  upd, state = tx.update(g, tx.init(PARAMS))
  plan = projection.plan_leaf((12, 8), 3, "std")
  q = state.projectors["w"].right
  np.testing.assert_allclose(upd["w"], 0.5 * (g["w"] @ q.T) @ q, atol=1e-5)
  np.testing.assert_array_equal(upd["b"], g["b"])
  del plan


def test_small_leaves_get_inner_at_full_size():
  inner = optax.scale_by_adam()
  tx = galore_project(inner, rank=3)
  g = random_grads(0, PARAMS)
  upd, _ = tx.update(g, tx.init(PARAMS))
  ref, _ = inner.update({"b": g["b"]}, inner.init({"b": PARAMS["b"]}))
  np.testing.assert_allclose(upd["b"], ref["b"], rtol=1e-6)  # f32 rounding


def test_jit_compiles_once_and_state_is_invariant():
  tx = galore_project(optax.scale_by_adam(), rank=3, update_proj_gap=2)
  state = tx.init(PARAMS)
  traces = []

  @jax.jit
  def step(g, state):
    traces.append(1)
    return tx.update(g, state)

  for i in range(5):
    _, new_state = step(random_grads(i, PARAMS), state)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
    state = new_state
  assert len(traces) == 1


def test_bf16_params_keep_dtype_and_float32_projectors():
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
  tx = galore_project(optax.scale_by_adam(), rank=3)
  state = tx.init(params)
  upd, state = jax.jit(tx.update)(random_grads(0, params), state)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(upd))
  assert state.projectors["w"].right.dtype == jnp.float32
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(upd))


def test_bfloat16_projector_storage():
  tx = galore_project(optax.scale_by_adam(), rank=3, projector_dtype="bfloat16")
  state = tx.init(PARAMS)
  _, state = tx.update(random_grads(0, PARAMS), state)
  assert state.projectors["w"].right.dtype == jnp.bfloat16


def test_non_finite_gradient_keeps_previous_projector():
  tx = galore_project(optax.scale_by_adam(), rank=3, update_proj_gap=2)
  state = tx.init(PARAMS)
  _, state = tx.update(random_grads(0, PARAMS), state)
  before = state.projectors
  bad = random_grads(1, PARAMS)
  _, state = tx.update(bad, state)
  bad = random_grads(2, PARAMS)
  bad["w"] = bad["w"].at[0, 0].set(jnp.nan)
  bad["stack"] = bad["stack"].at[1, 0, 0].set(jnp.inf)
  _, state = tx.update(bad, state)  # a refresh step
  np.testing.assert_array_equal(state.projectors["w"].right,
                                before["w"].right)
  # Per matrix of a stacked leaf: only the poisoned matrix keeps its own.
  np.testing.assert_array_equal(state.projectors["stack"].left[1],
                                before["stack"].left[1])
  assert not np.array_equal(state.projectors["stack"].left[0],
                            before["stack"].left[0])
  assert all(bool(jnp.all(jnp.isfinite(x)))
             for x in jax.tree.leaves(state.projectors))


@pytest.mark.parametrize("stagger_refresh", [False, True])
def test_donated_step_does_not_copy_the_weights(monkeypatch, stagger_refresh):
  # Each weight is read by the forward and the backward pass (its input
  # gradient) and then overwritten in its donated buffer; unless its update
  # is ordered after those reads, XLA copies the weight first (7 of 8
  # weights here without the ordering, unstaggered).
  layers, d = 8, 96
  params = {f"layer{i}": jnp.full((d, d), 0.01 * (i + 1))
            for i in range(layers)}
  step, tx = tanh_chain_step(params, stagger_refresh)
  donated_step = jax.jit(step, donate_argnums=(0, 1))
  hlo = donated_step.lower(params, tx.init(params)).compile().as_text()
  entry = hlo[hlo.index("\nENTRY"):]  # the refreshes may copy in branches
  assert entry.count(f"f32[{d},{d}]{{1,0}} copy(") == 0
  ordered = donated_step(jax.tree.map(jnp.copy, params), tx.init(params))

  # The ordering changes no value: the same step without it.
  monkeypatch.setattr(ordering, "after", lambda x, *deps: x)
  step, tx = tanh_chain_step(params, stagger_refresh)
  unordered = jax.jit(step)(params, tx.init(params))
  chex.assert_trees_all_equal(ordered, unordered)


@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 0}, "rank"),
    ({"rank": 2.5}, "rank"),
    ({"rank": True}, "rank"),
    ({"rank": jnp.asarray(4)}, "static_args"),
    ({"update_proj_gap": -1}, "update_proj_gap"),
    ({"proj_type": "diag"}, "proj_type"),
    ({"projector_method": "qr"}, "projector_method"),
    ({"projector_dtype": "int2"}, "projector_dtype"),
    ({"scale": float("nan")}, "scale"),
    ({"moments": "rotate"}, "moments"),
    ({"matrix_axes": 3}, "matrix_axes"),
    ({"matrix_axes": {"q": [0]}}, "matrix_axes"),
    ({"moments": "reset", "stagger_refresh": True}, "stagger_refresh"),
])
def test_bad_arguments_raise_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    galore_project(optax.scale_by_adam(), **kwargs)


def _decaying_matrix(seed: int, m: int, n: int) -> np.ndarray:
  """A random float32 matrix whose singular values decay by 0.6."""
  rng = np.random.default_rng(seed)
  k = min(m, n)
  u = np.linalg.qr(rng.standard_normal((m, k)))[0]
  v = np.linalg.qr(rng.standard_normal((n, k)))[0]
  return ((u * 0.6 ** np.arange(k)) @ v.T).astype(np.float32)


@pytest.mark.parametrize("method", ["svd", "randomized"])
def test_stacked_leaf_equals_separate_leaves(method):
  """A (L, m, n) leaf (e.g. nnx.scan layers) is L independent matrices."""
  stacked = {"w": jnp.zeros((3, 12, 8))}
  separate = {f"w{i}": jnp.zeros((12, 8)) for i in range(3)}
  kwargs = dict(rank=3, update_proj_gap=2, projector_method=method)
  tx = galore_project(optax.scale_by_adam(), **kwargs)
  s_state, p_state = tx.init(stacked), tx.init(separate)
  for step in range(5):
    # Decaying spectra: with Gaussian matrices (a small gap after the top
    # 3), one float32 rounding of the gradients moved the updates by 1e-6
    # (the exact SVD's by 3e-6), so the check tested rounding luck.
    g = jnp.stack([
        jnp.asarray(_decaying_matrix(10 * step + i, 12, 8)) for i in range(3)])
    s_upd, s_state = tx.update({"w": g}, s_state)
    p_upd, p_state = tx.update({f"w{i}": g[i] for i in range(3)}, p_state)
    # The randomized method's test matrix depends on the update and its
    # shape only, so it is the same for the stack and the separate leaves.
    for i in range(3):
      np.testing.assert_allclose(s_upd["w"][i], p_upd[f"w{i}"], atol=1e-6)


# Leaves projected on each side and both, stacked included.
MOMENT_PARAMS = {"tall": jnp.zeros((12, 8)), "wide": jnp.zeros((6, 10)),
                 "stack": jnp.zeros((2, 9, 7))}


@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_project_moments_carries_them_into_the_new_basis(proj_type):
  b1, b2 = 0.9, 0.999
  tx = galore_project(optax.scale_by_adam(b1=b1, b2=b2), rank=3,
                      update_proj_gap=2, proj_type=proj_type,
                      moments="project")
  state = tx.init(MOMENT_PARAMS)
  update = jax.jit(tx.update)
  for step in range(2):
    _, state = update(random_grads(step, MOMENT_PARAMS), state)
  g = random_grads(2, MOMENT_PARAMS)
  _, after = update(g, state)  # count 2: a refresh
  for name, p in MOMENT_PARAMS.items():
    plan = projection.plan_leaf(p.shape, 3, proj_type)
    old, new = state.projectors[name], after.projectors[name]
    side = new.left if plan.use_left else new.right
    assert not np.allclose(side, old.left if plan.use_left else old.right)
    # The overlap matrices, written out: C = P_new^T P_old, D = Q_old Q_new^T.
    mu, nu = state.inner_state.mu[name], state.inner_state.nu[name]
    if plan.use_left:
      c = np.swapaxes(new.left, -1, -2) @ old.left
      mu, nu = c @ mu, (c * c) @ nu
    if plan.use_right:
      d = old.right @ np.swapaxes(new.right, -1, -2)
      mu, nu = mu @ d, nu @ (d * d)
    low = projection.project(g[name], new, plan)
    np.testing.assert_allclose(after.inner_state.mu[name],
                               b1 * mu + (1 - b1) * low, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after.inner_state.nu[name],
                               b2 * nu + (1 - b2) * low**2, rtol=1e-5,
                               atol=1e-7)
  assert int(after.inner_state.count) == 3


def test_project_moments_at_full_rank_preserves_the_full_space_moment():
  # With r = min(m, n) both bases span everything: carrying the moment to
  # the new basis must not change what it stands for in the full space.
  params = {"w": jnp.zeros((10, 4))}
  plan = projection.plan_leaf((10, 4), 4, "std")
  tx = galore_project(optax.scale_by_adam(b1=0.9), rank=4, update_proj_gap=2,
                      moments="project")
  state = tx.init(params)
  for step in range(2):
    _, state = tx.update(random_grads(step, params), state)
  g = random_grads(2, params)
  _, after = tx.update(g, state)
  full_before = projection.project_back(state.inner_state.mu["w"],
                                        state.projectors["w"], plan)
  full_after = projection.project_back(after.inner_state.mu["w"],
                                       after.projectors["w"], plan)
  np.testing.assert_allclose(full_after, 0.9 * full_before + 0.1 * g["w"],
                             rtol=1e-5, atol=1e-6)
  # "keep" does not: the same coordinates now mean other directions.
  tx_keep = galore_project(optax.scale_by_adam(b1=0.9), rank=4,
                           update_proj_gap=2)
  keep = tx_keep.init(params)
  for step in range(3):
    _, keep = tx_keep.update(random_grads(step, params), keep)
  full_keep = projection.project_back(keep.inner_state.mu["w"],
                                      keep.projectors["w"], plan)
  assert not np.allclose(full_keep, full_after, atol=1e-3)


def test_reset_moments_restarts_the_inner_optimizer():
  tx = galore_project(optax.scale_by_adam(), rank=3, update_proj_gap=3,
                      moments="reset")
  state = tx.init(MOMENT_PARAMS)
  update = jax.jit(tx.update)
  for step in range(3):
    _, state = update(random_grads(step, MOMENT_PARAMS), state)
  g = random_grads(3, MOMENT_PARAMS)
  updates, after = update(g, state)  # count 3: refresh and reset
  fresh_updates, fresh = tx.update(g, tx.init(MOMENT_PARAMS))
  chex.assert_trees_all_close(updates, fresh_updates, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(after.inner_state, fresh.inner_state,
                              rtol=1e-6, atol=1e-7)
  # Between refreshes nothing is reset.
  _, later = update(random_grads(4, MOMENT_PARAMS), after)
  assert int(later.inner_state.count) == 2
  assert update._cache_size() == 1


def test_moment_policies_reject_what_they_cannot_do():
  with pytest.raises(ValueError, match="every leaf must be projected"):
    galore_project(optax.scale_by_adam(), rank=2, moments="reset").init(
        {"w": jnp.zeros((4, 4)), "b": jnp.zeros((4,))})
  eight_bit = quantize_state_8bit(optax.scale_by_adam(), min_size=1)
  with pytest.raises(ValueError, match="needs float moments"):
    galore_project(eight_bit, rank=2, moments="project").init(
        {"w": jnp.zeros((64, 64))})


def test_matrix_axes_selects_the_matrix_of_a_head_shaped_kernel():
  # q: (d_model, heads, head_dim) -> d_model x (heads * head_dim);
  # o: (heads, head_dim, d_model) -> (heads * head_dim) x d_model.
  shaped = {"q": jnp.zeros((12, 2, 5)), "o": jnp.zeros((2, 5, 12))}
  flat = {"q": jnp.zeros((12, 10)), "o": jnp.zeros((10, 12))}
  axes = {"q": ([0], [1, 2]), "o": ([0, 1], [-1])}
  tx = galore_project(optax.scale_by_adam(), rank=3, update_proj_gap=2,
                      matrix_axes=axes)
  tx_flat = galore_project(optax.scale_by_adam(), rank=3, update_proj_gap=2)
  state, state_flat = tx.init(shaped), tx_flat.init(flat)
  update = jax.jit(tx.update)
  for step in range(4):
    g = random_grads(step, shaped)
    u, state = update(g, state)
    u_flat, state_flat = tx_flat.update(
        jax.tree.map(lambda x, f: x.reshape(f.shape), g, flat), state_flat)
    for k in shaped:
      assert u[k].shape == shaped[k].shape
      np.testing.assert_allclose(u[k].reshape(flat[k].shape), u_flat[k],
                                 rtol=1e-6, atol=1e-7)
  assert state.projectors["q"].right.shape == (3, 10)
  assert update._cache_size() == 1


def test_matrix_axes_other_axes_are_batch_axes():
  # (d_model, heads, head_dim) seen as one (d_model x head_dim) matrix per
  # head equals the same stack stored head-first.
  x = jnp.zeros((12, 3, 5))
  tx = galore_project(optax.scale_by_adam(), rank=2,
                      matrix_axes={"w": ([0], [2])})
  tx_stacked = galore_project(optax.scale_by_adam(), rank=2)
  state, stacked = tx.init({"w": x}), tx_stacked.init(
      {"w": jnp.zeros((3, 12, 5))})
  for step in range(3):
    g = random_grads(step, {"w": x})
    u, state = tx.update(g, state)
    u_st, stacked = tx_stacked.update(
        {"w": g["w"].transpose(1, 0, 2)}, stacked)
    np.testing.assert_allclose(u["w"].transpose(1, 0, 2), u_st["w"],
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("axes,match", [
    ({"w": ([0], [0])}, "disjoint"),
    ({"w": ([0], [])}, "non-empty"),
    ({"w": ([3], [1])}, "axes"),
    ({"nothing": ([0], [1])}, "match no leaf"),
])
def test_bad_matrix_axes_raise_at_init(axes, match):
  tx = galore_project(optax.scale_by_adam(), rank=2, matrix_axes=axes)
  with pytest.raises(ValueError, match=match):
    tx.init({"w": jnp.zeros((4, 3, 5))})
