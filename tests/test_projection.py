"""Projection math: sides, ranks, SVD and randomized projectors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from galore_optax import projection


def _matrix(key, m, n, decay=0.7):
  """A matrix with geometrically decaying singular values."""
  k1, k2 = jax.random.split(jax.random.key(key))
  u, _ = jnp.linalg.qr(jax.random.normal(k1, (m, min(m, n))))
  v, _ = jnp.linalg.qr(jax.random.normal(k2, (n, min(m, n))))
  s = decay ** jnp.arange(min(m, n))
  return (u * s) @ v.T


# (proj_type, shape) -> (use_left, use_right), as galore_torch chooses.
SIDES = {
    ("std", (40, 24)): (False, True),
    ("std", (24, 40)): (True, False),
    ("std", (32, 32)): (False, True),
    ("reverse_std", (40, 24)): (True, False),
    ("reverse_std", (24, 40)): (False, True),
    ("reverse_std", (32, 32)): (True, False),
    ("left", (40, 24)): (True, False),
    ("right", (24, 40)): (False, True),
    ("full", (40, 24)): (True, True),
}


@pytest.mark.parametrize("proj_type,shape", list(SIDES))
def test_sides_match_reference(proj_type, shape):
  plan = projection.plan_leaf(shape, 8, proj_type)
  assert (plan.use_left, plan.use_right) == SIDES[(proj_type, shape)]


def test_std_keeps_larger_dimension_in_state():
  assert projection.plan_leaf((4096, 11008), 128, "std").lowrank_shape == (
      128, 11008)
  assert projection.plan_leaf((11008, 4096), 128, "std").lowrank_shape == (
      11008, 128)
  assert projection.plan_leaf((64, 32), 8, "full").lowrank_shape == (8, 8)


def test_effective_rank_is_clipped():
  plan = projection.plan_leaf((12, 6), 8, "left")
  assert plan.rank == 6 and plan.left_shape == (12, 6)
  assert projection.plan_leaf((3, 5, 7), 100, "std").lowrank_shape == (3, 5, 7)


def test_unknown_proj_type_raises():
  with pytest.raises(ValueError, match="proj_type"):
    projection.plan_leaf((4, 4), 2, "diagonal")


@pytest.mark.parametrize("proj_type", projection.PROJ_TYPES)
def test_svd_projector_is_top_singular_subspace(proj_type):
  g = _matrix(0, 30, 20)
  plan = projection.plan_leaf(g.shape, 5, proj_type)
  proj = projection.compute_projector(g, plan)
  u, s, vh = np.linalg.svd(np.asarray(g), full_matrices=False)
  if plan.use_left:
    p = np.asarray(proj.left)
    np.testing.assert_allclose(p.T @ p, np.eye(5), atol=1e-5)
    # Same span as the top-5 left singular vectors, sign canonicalised.
    np.testing.assert_allclose(np.abs(p.T @ u[:, :5]), np.eye(5), atol=1e-4)
    assert np.all(p[np.argmax(np.abs(p), axis=0), range(5)] > 0)
  if plan.use_right:
    q = np.asarray(proj.right)
    np.testing.assert_allclose(q @ q.T, np.eye(5), atol=1e-5)
    np.testing.assert_allclose(np.abs(q @ vh[:5].T), np.eye(5), atol=1e-4)
    assert np.all(q[range(5), np.argmax(np.abs(q), axis=1)] > 0)


@pytest.mark.parametrize("proj_type", projection.PROJ_TYPES)
def test_project_back_is_orthogonal_projection(proj_type):
  g = _matrix(1, 24, 16)
  plan = projection.plan_leaf(g.shape, 4, proj_type)
  proj = projection.compute_projector(g, plan)
  low = projection.project(g, proj, plan)
  assert low.shape == plan.lowrank_shape
  back = projection.project_back(low, proj, plan)
  p = np.eye(24) if not plan.use_left else np.asarray(proj.left @ proj.left.T)
  q = np.eye(16) if not plan.use_right else np.asarray(
      proj.right.T @ proj.right)
  np.testing.assert_allclose(back, p @ np.asarray(g) @ q, atol=1e-5)


def test_batched_leaf_equals_separate_matrices():
  gs = jnp.stack([_matrix(i, 20, 12) for i in range(3)])
  plan = projection.plan_leaf(gs.shape, 4, "std")
  proj = projection.compute_projector(gs, plan)
  for i in range(3):
    single = projection.compute_projector(
        gs[i], projection.plan_leaf(gs[i].shape, 4, "std"))
    np.testing.assert_allclose(proj.right[i], single.right, atol=1e-5)


def _svd_operand_shapes(fn, *args):
  """Shapes of the matrices that ``fn``'s jaxpr hands to an SVD."""
  shapes, stack = [], [jax.make_jaxpr(fn)(*args).jaxpr]
  while stack:
    for eqn in stack.pop().eqns:
      if eqn.primitive.name == "svd":
        shapes.append(eqn.invars[0].aval.shape)
      for param in eqn.params.values():
        inner = getattr(param, "jaxpr", param)
        if hasattr(inner, "eqns"):
          stack.append(inner)
  return set(shapes)


@pytest.mark.parametrize("shape", [(3, 6, 10), (3, 10, 6)])
def test_exact_svd_decomposes_the_tall_orientation(shape):
  """XLA:CPU's SVD of a wide matrix takes 1.25-1.5x its transpose's."""
  plan = projection.plan_leaf(shape, 2, "full")
  assert _svd_operand_shapes(lambda g: projection.compute_projector(g, plan),
                             jnp.zeros(shape)) == {(3, 10, 6)}


def test_exact_projector_of_a_matrix_and_its_transpose_agree():
  g = _matrix(6, 12, 20)
  left = projection.compute_projector(
      g, projection.plan_leaf(g.shape, 5, "left")).left
  right = projection.compute_projector(
      g.T, projection.plan_leaf(g.T.shape, 5, "right")).right
  np.testing.assert_array_equal(left, right.T)


def _captured_energy(g, proj, plan):
  return float(jnp.sum(projection.project(g, proj, plan) ** 2))


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_randomized_captures_exact_energy(proj_type):
  g = _matrix(2, 64, 48, decay=0.8)
  plan = projection.plan_leaf(g.shape, 8, proj_type)
  exact = projection.compute_projector(g, plan)
  start = projection.initial_projector(plan)
  fast = projection.compute_projector(
      g, plan, method="randomized", previous=start, key=jax.random.key(0))
  ratio = _captured_energy(g, fast, plan) / _captured_energy(g, exact, plan)
  assert ratio > 0.99
  for f in fast:
    if not isinstance(f, optax.MaskedNode):
      assert bool(jnp.all(jnp.isfinite(f)))


def test_randomized_warm_start_tracks_drifting_subspace():
  g0 = _matrix(3, 64, 48, decay=0.85)
  plan = projection.plan_leaf(g0.shape, 8, "left")
  exact0 = projection.compute_projector(g0, plan)
  g1 = g0 + 0.05 * _matrix(4, 64, 48, decay=0.85)
  warm = projection.compute_projector(
      g1, plan, method="randomized", previous=exact0, key=jax.random.key(1),
      n_iter=1)
  exact1 = projection.compute_projector(g1, plan)
  ratio = _captured_energy(g1, warm, plan) / _captured_energy(g1, exact1, plan)
  assert ratio > 0.999


def test_randomized_refresh_of_degenerate_gradients_is_orthonormal():
  """Zero and rank-deficient gradients, whose range may lie in the previous
  projector's span (the oversampling columns add nothing then)."""
  rng = np.random.default_rng(0)
  inside = np.zeros((24, 40))
  inside[:3] = rng.standard_normal((3, 40))
  gs = jnp.asarray(np.stack([
      np.zeros((24, 40)), np.outer(rng.standard_normal(24),
                                   rng.standard_normal(40)),
      inside, rng.standard_normal((24, 40))]), jnp.float32)
  plan = projection.plan_leaf(gs.shape, 6, "full")
  refresh = jax.jit(lambda g, p: projection.refresh_projector(
      g, plan, p, method="randomized", key=jax.random.key(0)))
  for previous in (projection.initial_projector(plan),
                   projection.compute_projector(gs, plan)):
    new = refresh(gs, previous)
    for p in (new.left, jnp.swapaxes(new.right, -1, -2)):
      np.testing.assert_allclose(jnp.swapaxes(p, -1, -2) @ p,
                                 np.broadcast_to(np.eye(6), (4, 6, 6)),
                                 atol=1e-5)


def test_randomized_keeps_the_ritz_vectors_where_cholesky_qr_fails(
    monkeypatch):
  """An ill-conditioned power step (here: a poisoned factorisation of one
  matrix's 4 x 4 Gram matrix) falls back to the Rayleigh-Ritz vectors."""
  gs = jnp.stack([_matrix(i, 40, 24, decay=0.8) for i in range(3)])
  plan = projection.plan_leaf(gs.shape, 4, "left")
  cholesky = jnp.linalg.cholesky

  def poisoned(x, **kwargs):
    out = cholesky(x, **kwargs)
    if x.shape[-1] != 4:  # rank: the power step keeps the top rank rows
      return out
    return out.at[1].set(jnp.nan)

  monkeypatch.setattr(jnp.linalg, "cholesky", poisoned)
  previous = projection.initial_projector(plan)
  new = projection.refresh_projector(gs, plan, previous, method="randomized",
                                     key=jax.random.key(0))
  p = np.asarray(new.left)
  assert np.all(np.isfinite(p)) and not np.array_equal(p[1],
                                                       previous.left[1])
  np.testing.assert_allclose(np.swapaxes(p, -1, -2) @ p,
                             np.broadcast_to(np.eye(4), (3, 4, 4)), atol=1e-5)


def test_randomized_needs_previous_and_key():
  plan = projection.plan_leaf((4, 4), 2, "left")
  with pytest.raises(ValueError, match="previous and key"):
    projection.compute_projector(jnp.ones((4, 4)), plan, method="randomized")


def test_initial_projector_is_orthonormal():
  plan = projection.plan_leaf((2, 6, 4), 3, "full")
  proj = projection.initial_projector(plan)
  assert proj.left.shape == (2, 6, 3) and proj.right.shape == (2, 3, 4)
  np.testing.assert_allclose(
      jnp.swapaxes(proj.left, -1, -2) @ proj.left, np.broadcast_to(
          np.eye(3), (2, 3, 3)))


@pytest.mark.parametrize("method", projection.PROJECTOR_METHODS)
@pytest.mark.parametrize("scale", [1e19, 1e-30])
def test_projector_is_scale_invariant(method, scale):
  """Huge gradients would overflow G G^T Q in the randomized method."""
  g = _matrix(5, 24, 16)
  plan = projection.plan_leaf(g.shape, 4, "left")
  kwargs = dict(method=method, previous=projection.initial_projector(plan),
                key=jax.random.key(0))
  scaled = projection.compute_projector(g * scale, plan, **kwargs)
  plain = projection.compute_projector(g, plan, **kwargs)
  np.testing.assert_allclose(scaled.left, plain.left, atol=1e-5)


@pytest.mark.parametrize("method", projection.PROJECTOR_METHODS)
def test_power_of_two_multiples_give_bit_identical_projectors(method):
  """Subnormal entries (flushed to zero by XLA:CPU arithmetic, which made a
  subnormal gradient an all-zero one) and peaks above 2**126 (whose
  reciprocal is subnormal, which did the same) are scaled exactly first."""
  ints = np.random.default_rng(0).integers(-2**20, 2**20, (2, 12, 8))
  plan = projection.plan_leaf(ints.shape, 3, "full")
  refresh = jax.jit(lambda g: projection.refresh_projector(
      g, plan, projection.initial_projector(plan), method=method,
      key=jax.random.key(0)))
  expected = refresh(jnp.asarray(ints, jnp.float32))
  # Exact in float32 (numpy does not flush): all subnormal, a subnormal
  # tail below a normal peak, and a peak of 2**127.
  for power in (-149, -135, 107):
    g = (ints * 2.0**power).astype(np.float32)
    np.testing.assert_array_equal(g.astype(np.float64) * 2.0**-power, ints)
    jax.tree.map(np.testing.assert_array_equal, refresh(jnp.asarray(g)),
                 expected)


@pytest.mark.parametrize("method", ["svd", "randomized"])
def test_refresh_keeps_previous_where_the_decomposition_fails(monkeypatch,
                                                              method):
  gs = jnp.stack([_matrix(i, 20, 12) for i in range(3)])
  plan = projection.plan_leaf(gs.shape, 4, "full")
  previous = projection.initial_projector(plan)
  svd, eigh = jnp.linalg.svd, jnp.linalg.eigh

  def poison_matrix_1(x, outputs, ranks):
    # LAPACK and cuSOLVER report a failed SVD or eigh as NaN outputs (JAX's
    # lowering).
    nan = jnp.zeros(x.shape[:-2], bool).at[1].set(True)
    return tuple(jnp.where(nan.reshape(nan.shape + (1,) * k), jnp.nan, a)
                 for a, k in zip(outputs, ranks))

  # The exact method factorises with svd, the randomized one's Rayleigh-Ritz
  # step with eigh.
  monkeypatch.setattr(jnp.linalg, "svd", lambda x, **kwargs: poison_matrix_1(
      x, svd(x, **kwargs), (2, 1, 2)))
  monkeypatch.setattr(jnp.linalg, "eigh", lambda x, **kwargs: poison_matrix_1(
      x, eigh(x, **kwargs), (1, 2)))
  new = projection.refresh_projector(gs, plan, previous, method=method,
                                     key=jax.random.key(0))
  for factor, before in zip(new, previous):
    np.testing.assert_array_equal(factor[1], before[1])
    for i in (0, 2):
      assert bool(jnp.all(jnp.isfinite(factor[i])))
      assert not np.array_equal(factor[i], before[i])


def test_refresh_keeps_previous_where_the_gradient_is_not_finite():
  gs = jnp.stack([_matrix(i, 20, 12) for i in range(3)])
  gs = gs.at[0, 3, 4].set(jnp.inf).at[2, 0, 0].set(jnp.nan)
  plan = projection.plan_leaf(gs.shape, 4, "left")
  previous = projection.initial_projector(plan)
  new = projection.refresh_projector(gs, plan, previous)
  np.testing.assert_array_equal(new.left[0], previous.left[0])
  np.testing.assert_array_equal(new.left[2], previous.left[2])
  np.testing.assert_allclose(
      new.left[1], projection.compute_projector(
          gs[1], projection.plan_leaf(gs[1].shape, 4, "left")).left,
      atol=1e-6)
