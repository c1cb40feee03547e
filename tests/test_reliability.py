"""Failure modes: bad input, degenerate and non-finite gradients, dtypes,
determinism, compilation, and property-based checks for every optimizer."""

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_optax
from galore_optax import projection

# Every optimizer the library offers, as factories of (learning_rate, **kw).
GALORE = {
    "galore_adamw": galore_optax.galore_adamw,
    "galore_adamw_8bit": galore_optax.galore_adamw_8bit,
    "galore_adafactor": galore_optax.galore_adafactor,
}
ALL = {**GALORE, "adamw_8bit": galore_optax.adamw_8bit}


def _make(name, **kwargs):
  if name in GALORE:
    kwargs = {"rank": 4, "update_proj_gap": 2, **kwargs}
  if "8bit" in name:
    kwargs = {"min_size": 64, **kwargs}
  return ALL[name](1e-2, **kwargs)


PARAMS = {"attn": {"kernel": jnp.zeros((16, 8))},
          "mlp": {"kernel": jnp.zeros((2, 8, 24)), "bias": jnp.zeros((24,))}}


def _grads(step, params, scale=1.0):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.fold_in(jax.random.key(7), step),
                          len(leaves))
  return treedef.unflatten([
      (scale * jax.random.normal(k, p.shape)).astype(p.dtype)
      for k, p in zip(keys, leaves)])


def _finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.floating))


# 1. Bad configuration fails at construction (or init, for targets) with a
# message naming the argument, the value and what is accepted.
BAD = [
    ({"rank": 0}, r"rank must be a positive integer, got 0"),
    ({"rank": 1.5}, r"rank must be a positive integer, got 1\.5"),
    ({"update_proj_gap": 0}, r"update_proj_gap must be a positive integer"),
    ({"scale": float("inf")}, r"scale must be finite, got inf"),
    ({"proj_type": "diag"}, r"proj_type must be one of .*'std'.*got 'diag'"),
    ({"projector_method": "qr"},
     r"projector_method must be one of .*'randomized'.*got 'qr'"),
    ({"projector_dtype": "fp8"},
     r"projector_dtype must be one of .*'int8'.*got 'fp8'"),
]


@pytest.mark.parametrize("name", list(GALORE))
@pytest.mark.parametrize("kwargs,match", BAD)
def test_bad_galore_arguments(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _make(name, **kwargs)


@pytest.mark.parametrize("name", ["galore_adamw_8bit", "adamw_8bit"])
@pytest.mark.parametrize("kwargs,match", [
    ({"block_size": 0}, r"block_size must be a positive integer, got 0"),
    ({"min_size": -1}, r"min_size must be a positive integer, got -1"),
])
def test_bad_8bit_arguments(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _make(name, **kwargs)


@pytest.mark.parametrize("name", list(GALORE))
@pytest.mark.parametrize("targets,match", [
    (["nothing"], r"matches no parameter with two or more dimensions.*"
     r"attn\.kernel"),
    (["bias"], r"matched only leaves with fewer than two dimensions.*bias"),
])
def test_targets_that_match_nothing_fail_at_init(name, targets, match):
  tx = _make(name, target_modules=targets)
  with pytest.raises(ValueError, match=match):
    tx.init(PARAMS)


def test_unknown_optimizer_name_and_key():
  with pytest.raises(ValueError, match="galore_adamw"):
    galore_optax.create_optimizer("galore_adam", 1e-3)
  with pytest.raises(ValueError, match="ranks"):
    galore_optax.create_optimizer("galore_adamw", 1e-3, target_modules=["a"],
                                  optim_args="ranks=3")


# 2. Non-finite and degenerate gradients.
def _projectors(state):
  """``{leaf.side: (batch, m, r) float32 array}`` of a GaLore alias' state."""
  projectors = state[0].inner_states["galore"].inner_state.projectors
  out = {}
  for leaf, projector in projectors.items():
    for side in ("left", "right"):
      factor = getattr(projector, side)
      if not isinstance(factor, optax.MaskedNode):
        factor = np.asarray(factor)
        out[f"{leaf}.{side}"] = factor.reshape((-1,) + factor.shape[-2:])
  return out


@pytest.mark.parametrize("name", list(GALORE))
def test_nan_on_refresh_never_reaches_the_projector(name):
  tx = _make(name)
  state = tx.init(PARAMS)
  step = jax.jit(lambda g, s: tx.update(g, s, PARAMS))
  _, state = step(_grads(0, PARAMS), state)
  _, state = step(_grads(1, PARAMS), state)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan),
                     _grads(2, PARAMS))
  previous = _projectors(state)
  _, clean_state = step(_grads(2, PARAMS), state)
  _, state = step(bad, state)  # update 2 refreshes
  galore_state = state[0].inner_states["galore"].inner_state
  assert _finite(galore_state.projectors)
  # The NaN is in the first matrix of every leaf (the whole of attn.kernel,
  # matrix 0 of the stacked mlp.kernel): each of those keeps its previous
  # projector bit for bit; every other matrix (matrix 1 of mlp.kernel) is
  # refreshed exactly as without the NaN.
  kept, refreshed = _projectors(state), _projectors(clean_state)
  for key, old in previous.items():
    np.testing.assert_array_equal(kept[key][:1], old[:1], err_msg=key)
    np.testing.assert_array_equal(kept[key][1:], refreshed[key][1:],
                                  err_msg=key)
  assert not np.array_equal(refreshed["mlp.kernel.left"][1],
                            previous["mlp.kernel.left"][1])
  # Without apply_if_finite the NaN reaches the moments, as in any optax
  # optimizer; wrapped in apply_if_finite, the whole update is skipped.
  guarded = optax.apply_if_finite(_make(name), max_consecutive_errors=5)
  g_state = guarded.init(PARAMS)
  updates, g_state = guarded.update(bad, g_state, PARAMS)
  assert _finite(g_state.inner_state) and _finite(updates)
  assert int(g_state.notfinite_count) == 1


DEGENERATE = {
    "zero": lambda g: jnp.zeros_like(g),
    # Every row equal: rank one (rank-deficient for rank 4).
    "rank_one": lambda g: jnp.broadcast_to(g[..., :1, :], g.shape)
                          if g.ndim >= 2 else g,
    # Adam's second moment holds g**2: any float32 Adam overflows past ~1e19.
    "huge": lambda g: g * 1e15,
    "tiny": lambda g: g * 1e-30,
}


@pytest.mark.parametrize("name", list(GALORE))
def test_degenerate_gradients_give_finite_bounded_updates(name):
  # Gap 1: every kind of degenerate gradient hits a refresh.
  tx = _make(name, update_proj_gap=1)
  state = tx.init(PARAMS)
  step = jax.jit(lambda g, s: tx.update(g, s, PARAMS))
  for t, kind in enumerate(DEGENERATE):
    grads = jax.tree.map(DEGENERATE[kind], _grads(t, PARAMS))
    updates, state = step(grads, state)
    assert _finite(updates) and _finite(state), kind
    # Normalised optimizers: no update exceeds a few learning rates.
    assert max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(updates)
               ) <= 0.1, kind


@pytest.mark.parametrize("proj_type", projection.PROJ_TYPES)
def test_thin_matrices_and_rank_above_size(proj_type):
  shapes = [(1, 9), (9, 1), (1, 1), (3, 5)]
  tx = galore_optax.galore_project(optax.scale_by_adam(), rank=16,
                                   update_proj_gap=2, proj_type=proj_type)
  params = {f"w{i}": jnp.zeros(shape) for i, shape in enumerate(shapes)}
  state = tx.init(params)
  step = jax.jit(tx.update)
  for t in range(3):
    updates, state = step(_grads(t, params), state)
    chex.assert_trees_all_equal_shapes(updates, params)
    assert _finite(updates)


# 4. Determinism.
@pytest.mark.parametrize("method", ["svd", "randomized"])
def test_two_runs_are_identical(method):
  tx = _make("galore_adamw_8bit", projector_method=method)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))

  def run():
    params, state = PARAMS, tx.init(PARAMS)
    for t in range(4):
      updates, state = step(params, state, _grads(t, params))
      params = optax.apply_updates(params, updates)
    return params, state
  jax.tree.map(np.testing.assert_array_equal, run(), run())


@pytest.mark.parametrize("name", ["galore_adamw_8bit", "galore_adafactor"])
def test_apply_if_finite_skips_the_whole_update(name):
  guarded = optax.apply_if_finite(_make(name), max_consecutive_errors=5)
  step = jax.jit(lambda g, s: guarded.update(g, s, PARAMS))
  _, state = step(_grads(0, PARAMS), guarded.init(PARAMS))
  _, state = step(_grads(1, PARAMS), state)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan),
                     _grads(2, PARAMS))
  updates, skipped = step(bad, state)  # update 2 would refresh
  # Moments, projectors and the step count (the refresh schedule) stay.
  jax.tree.map(np.testing.assert_array_equal, skipped.inner_state,
               state.inner_state)
  assert all(not jnp.any(u) for u in jax.tree.leaves(updates))
  assert int(skipped.notfinite_count) == 1


# 5. One compilation across refresh and ordinary steps; invariant state.
@pytest.mark.parametrize("name", list(ALL))
def test_compiles_once_and_state_is_invariant(name):
  tx = _make(name)
  state = tx.init(PARAMS)
  traces = []

  @jax.jit
  def step(grads, state):
    traces.append(1)
    return tx.update(grads, state, PARAMS)

  for t in range(5):
    _, new_state = step(_grads(t, PARAMS), state)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
    chex.assert_trees_all_equal_structs(state, new_state)
    state = new_state
  assert len(traces) == 1


# 6. dtypes and the saturating step counter.
@pytest.mark.parametrize("name", list(ALL))
def test_parameter_dtypes(name):
  dtypes = (jnp.float32, jnp.bfloat16, jnp.float16)
  params = {jnp.dtype(d).name: jax.tree.map(lambda p, d=d: p.astype(d), PARAMS)
            for d in dtypes}
  tx = _make(name)
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  for t in range(3):
    updates, state = step(params, state, _grads(t, params))
    params = optax.apply_updates(params, updates)
  for d in dtypes:
    assert all(p.dtype == d
               for p in jax.tree.leaves(params[jnp.dtype(d).name]))
  assert _finite(params) and _finite(state)
  if name in GALORE:
    galore_state = state[0].inner_states["galore"].inner_state
    assert all(x.dtype in (jnp.float32, jnp.uint8)
               for x in jax.tree.leaves(galore_state.projectors))


def test_step_counter_saturates():
  tx = galore_optax.galore_project(optax.scale_by_adam(), rank=2,
                                   update_proj_gap=3)
  params = {"w": jnp.zeros((4, 4))}
  state = tx.init(params)
  state = state._replace(count=jnp.asarray(jnp.iinfo(jnp.int32).max))
  _, state = tx.update(_grads(0, params), state)
  assert int(state.count) == jnp.iinfo(jnp.int32).max


# 7. Property-based: random trees, sizes including 1, all projection types.
leaf_shapes = st.lists(st.integers(1, 5), min_size=0, max_size=4).map(tuple)


@hypothesis.settings(max_examples=8, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(
    shapes=st.lists(leaf_shapes, min_size=1, max_size=3),
    rank=st.integers(1, 6),
    proj_type=st.sampled_from(projection.PROJ_TYPES),
    name=st.sampled_from(list(GALORE)),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
    seed=st.integers(0, 2**16),
)
def test_random_trees_keep_shapes_dtypes_and_finiteness(shapes, rank,
                                                        proj_type, name,
                                                        dtype, seed):
  params = {f"p{i}": jnp.zeros(s, dtype) for i, s in enumerate(shapes)}
  hypothesis.assume(any(len(s) >= 2 for s in shapes))
  # min_size=4: 8-bit states for all but the smallest leaves.
  eight_bit = {"min_size": 4} if "8bit" in name else {}
  tx = ALL[name](1e-2, rank=rank, update_proj_gap=2, proj_type=proj_type,
                 **eight_bit)
  state = tx.init(params)
  step = jax.jit(lambda g, s: tx.update(g, s, params))
  for t in range(2):  # a refresh, then an ordinary step
    grads = jax.tree.map(
        lambda p: jax.random.normal(jax.random.key(seed + t), p.shape, dtype),
        params)
    updates, state = step(grads, state)
    chex.assert_trees_all_equal_shapes(updates, params)
    assert all(u.dtype == p.dtype
               for u, p in zip(jax.tree.leaves(updates),
                               jax.tree.leaves(params)))
    assert _finite(updates) and _finite(state)
