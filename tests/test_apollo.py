"""APOLLO / APOLLO-Mini (``output="apollo_channel"|"apollo_tensor"``,
``apollo_adamw``, ``apollo_mini``) and random projectors: parity with the
reference ``apollo_torch.APOLLOAdamW`` 1.0.3.

The fixture (``tests/fixtures/generate_apollo.py``) runs the reference on
10 steps (refreshes before steps 0, 4 and 8) of two shapes (both projection
sides), with a plain vector parameter in the same optimizer, for APOLLO
(random, rank 8, channel), APOLLO-Mini (random, rank 1, scale 128, tensor)
and ``proj="svd"`` (rank 8, channel; our sign convention). Random matrices
cannot share bits across frameworks: the fixture records the reference's,
and the tests put them into our state at each refresh.

Tolerance: ``RTOL = ATOL = 1e-6`` on parameters of magnitude ~1, a few
float32 ulps: the same operations in the same order up to the association
of float32 products (the bias correction after the limiter, as the
reference, see ``galore_optax.split_adam``). The limiter's state (a norm of
a whole matrix, summed in another order) within ``1e-5`` relative. With our
own SVD (``svd`` case) the projectors agree to ~3e-6 and the trajectories
still to ``SVD_ATOL = 1e-6`` (Fira needs more, see ``test_fira.py``).
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_optax
from galore_optax import projection
from galore_optax import random_projection
import _lowrank_parity as parity

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
RTOL, ATOL = 1e-6, 1e-6
SVD_ATOL = 1e-6
SHAPES = ("tall", "wide")


@pytest.fixture(scope="module")
def ref():
  with np.load(FIXTURES / "apollo_adamw.npz") as f:
    return {k: f[k] for k in f.keys() if k != "__meta__"}


def _apollo(case, gap):
  if case == "tensor":
    return galore_optax.apollo_mini(0.01, update_proj_gap=gap, eps=1e-8)
  return galore_optax.apollo_adamw(
      0.01, rank=8, update_proj_gap=gap, scale=1.0, eps=1e-8,
      projector_method="svd" if case == "svd" else "random")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", ("channel", "tensor", "svd"))
def test_apollo_matches_reference(ref, case, shape):
  orthos = ref[f"{case}/{shape}/ortho"]
  ours = parity.run_trajectory(_apollo(case, parity.NEVER), ref, shape,
                               parity.inject(orthos, shape))
  parity.compare(ours, ref, f"{case}/{shape}", RTOL, ATOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_apollo_with_own_svd_matches_reference(ref, shape):
  case = f"svd/{shape}"
  ours = parity.run_trajectory(_apollo("svd", parity.GAP), ref, shape)
  np.testing.assert_allclose(ours["ortho"], ref[f"{case}/ortho"], rtol=1e-5,
                             atol=1e-5)
  parity.compare(ours, ref, case, RTOL, SVD_ATOL)


RANDOM_PARAMS = {"a": jnp.zeros((6, 8)), "b": jnp.zeros((6, 8)),
                 "s": jnp.zeros((3, 8, 6))}
RANDOM_TX = galore_optax.galore_project(
    optax.scale_by_adam(), rank=2, update_proj_gap=2, scale=1.0,
    projector_method="random", output="apollo_channel")
RANDOM_UPDATE = jax.jit(RANDOM_TX.update)  # compiled once for the test


def _random_run(start, stop, state):
  projectors = []
  for t in range(start, stop):
    grads = jax.tree.map(
        lambda x: jax.random.normal(jax.random.key(t), x.shape),
        RANDOM_PARAMS)
    _, state = RANDOM_UPDATE(grads, state, RANDOM_PARAMS)
    projectors.append(state.projectors)
  return projectors, state


def test_random_projectors_depend_on_seed_leaf_and_refresh_only():
  projectors, _ = _random_run(0, 5, RANDOM_TX.init(RANDOM_PARAMS))
  left = lambda p, name: np.asarray(p[name].left)
  # Regenerated at refreshes (updates 0, 2, 4) only.
  np.testing.assert_array_equal(left(projectors[0], "a"),
                                left(projectors[1], "a"))
  assert not np.allclose(left(projectors[1], "a"), left(projectors[2], "a"))
  # Leaves of one shape, and matrices of a stack, get their own.
  assert not np.allclose(left(projectors[0], "a"), left(projectors[0], "b"))
  stack = np.asarray(projectors[0]["s"].right)
  assert stack.shape == (3, 2, 6) and not np.allclose(stack[0], stack[1])
  # The key: seed, the leaf's name, count // gap; entries N(0, 1/r) (to
  # rounding: XLA may turn the division by sqrt(r) into a product).
  plan = projection.plan_leaf((6, 8), 2, "std")
  draw = lambda seed, name, refresh: random_projection.gaussian_projector(
      random_projection.leaf_key(seed, name, jnp.asarray(refresh)), plan).left
  np.testing.assert_allclose(left(projectors[4], "a"), draw(0, "a", 2),
                             rtol=1e-6)
  assert not np.allclose(draw(1, "a", 2), draw(0, "a", 2))
  # A run resumed from its state draws the same ones.
  _, mid = _random_run(0, 3, RANDOM_TX.init(RANDOM_PARAMS))
  resumed, _ = _random_run(3, 5, mid)
  np.testing.assert_array_equal(left(resumed[1], "a"),
                                left(projectors[4], "a"))


def test_random_projection_computes_no_decomposition():
  tx = galore_optax.apollo_adamw(0.01, rank=4)
  params = {"w": jnp.zeros((16, 12))}
  jaxpr = str(jax.make_jaxpr(tx.update)(params, tx.init(params), params))
  for primitive in ("svd", "eigh", "qr", "householder_product"):
    assert not re.search(rf"\b{primitive}\b", jaxpr), primitive


def test_apollo_mini_state_is_two_vectors_and_a_float_per_matrix():
  tx = galore_optax.apollo_mini(0.01)
  state = tx.init({"w": jnp.zeros((64, 48))})
  sizes = [x.size for x in jax.tree.leaves(state) if x.ndim > 0]
  # Adam's rank-1 moments and the projector (64 values each), the limiter.
  assert sum(sizes) <= 3 * 64 + 4


def test_random_method_needs_the_fixed_schedule():
  for bad in ({"moments": "project"}, {"stagger_refresh": True}):
    with pytest.raises(ValueError, match="random"):
      galore_optax.galore_project(optax.scale_by_adam(),
                                  projector_method="random", **bad)
