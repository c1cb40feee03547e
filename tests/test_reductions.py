"""reductions: max and min (and the largest magnitude) by one reduction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from galore_optax import reductions


def _data(shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype)


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_max_and_min_equal_separate_reductions(axis, dtype):
  x = _data((5, 7, 3), dtype)
  x_max, x_min = jax.jit(reductions.max_and_min, static_argnums=1)(x, axis)
  np.testing.assert_array_equal(x_max, jnp.max(x, axis=axis))
  np.testing.assert_array_equal(x_min, jnp.min(x, axis=axis))
  assert x_max.dtype == x_min.dtype == dtype


@pytest.mark.parametrize("axis", [0, -1])
def test_abs_max_equals_max_of_magnitudes(axis):
  x = _data((6, 9))
  x = x.at[2, 3].set(-10.0)  # a negative extreme
  np.testing.assert_array_equal(reductions.abs_max(x, axis),
                                jnp.max(jnp.abs(x), axis=axis))


def test_nan_propagates_and_infinities_count():
  x = jnp.array([[1.0, jnp.nan, -2.0], [3.0, -jnp.inf, 0.5]])
  x_max, x_min = reductions.max_and_min(x, 1)
  assert np.isnan(x_max[0]) and np.isnan(x_min[0])
  assert x_max[1] == 3.0 and x_min[1] == -np.inf
  assert reductions.abs_max(x, 1)[1] == np.inf


def test_one_reduction_in_the_jaxpr():
  jaxpr = jax.make_jaxpr(lambda x: reductions.abs_max(x, 0))(_data((4, 3)))
  names = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
  assert names.count("reduce") == 1
  assert "reduce_max" not in names and "reduce_min" not in names
