"""ordering: values unchanged, and the result data-depends on the deps."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from galore_optax import ordering

DEP = jnp.array([[1.0, -2.0], [3.0, 4.0]])
NON_FINITE_DEPS = [
    jnp.array([jnp.nan, 1.0]),
    jnp.array([jnp.inf, -jnp.inf]),
    jnp.array([-jnp.inf]),
    jnp.array([3e38, 3e38]),  # the float32 sum overflows
]


def _bits(x):
  x = np.asarray(x)
  return x.dtype, x.shape, x.tobytes()


@pytest.mark.parametrize("x", [
    jnp.array([1.5, -2.25, jnp.nan, jnp.inf, -jnp.inf], jnp.float32),
    jnp.array([1, -7, 2**31 - 1], jnp.int32),
    jnp.array([3, 0, 255], jnp.uint8),
    jnp.array([1.5, -3.0, jnp.inf], jnp.bfloat16),
    jnp.array([1 + 2j, 0.5 - 3.5j, jnp.nan], jnp.complex64),
    jnp.float32(7.0),
], ids=["float32", "int32", "uint8", "bfloat16", "complex64", "scalar"])
@pytest.mark.parametrize("dep", [DEP, *NON_FINITE_DEPS],
                         ids=["finite", "nan", "inf", "-inf", "overflow"])
def test_after_returns_the_same_bits_and_dtype(x, dep):
  out = jax.jit(ordering.after)(x, dep)
  assert _bits(out) == _bits(x)


def test_a_negative_zero_may_come_back_as_a_positive_zero():
  # x + 0: equal values, but the sign of a zero is not kept (IEEE -0 + 0 is
  # +0), so "the same bits" above holds for nonzero values.
  x = jnp.array([-0.0, 0.0, -1.0])
  out = jax.jit(ordering.after)(x, DEP)
  np.testing.assert_array_equal(out, x)
  assert out.dtype == x.dtype


def test_after_keeps_pytrees_booleans_and_python_numbers():
  tree = {"a": jnp.ones((2,), jnp.float16), "b": (jnp.array([True, False]),)}
  out = jax.jit(ordering.after)(tree, DEP)
  assert jax.tree.structure(out) == jax.tree.structure(tree)
  for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
    assert _bits(got) == _bits(want)
  assert float(ordering.after(2.5, DEP)) == 2.5


@pytest.mark.parametrize("dep", [DEP, *NON_FINITE_DEPS])
def test_zero_after_is_an_exact_zero(dep):
  zero = jax.jit(lambda d: ordering.zero_after(d, [d, None, "not an array"]))(
      dep)
  assert zero.dtype == jnp.float32 and zero.shape == ()
  assert float(zero) == 0.0
  # No array deps (or only empty ones): a constant zero.
  assert float(ordering.zero_after(jnp.zeros((0, 3)), None)) == 0.0


def test_first_element():
  x = jnp.arange(12.0).reshape(3, 4) + 5
  first = ordering.first_element(x)
  assert first.shape == (1,) and float(first[0]) == 5.0
  empty = ordering.first_element(jnp.zeros((0, 4), jnp.int8))
  assert empty.shape == (0,) and empty.dtype == jnp.int8


def _reached_from(jaxpr, source_index):
  """The variables of a jaxpr that data-depend on input ``source_index``."""
  reached = {jaxpr.invars[source_index]}
  for eqn in jaxpr.eqns:
    if any(v in reached for v in eqn.invars
           if isinstance(v, jax.extend.core.Var)):
      reached.update(eqn.outvars)
  return reached


def test_the_result_depends_on_every_dep_in_the_jaxpr():
  x, y, z = jnp.ones((3,)), jnp.full((4, 2), 2.0), jnp.full((5,), 3.0)
  jaxpr = jax.make_jaxpr(ordering.after)(x, y, z).jaxpr
  sums = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "reduce_sum"]
  for dep in (1, 2):
    reached = _reached_from(jaxpr, dep)
    assert jaxpr.outvars[0] in reached
    # The dep enters through a sum of it.
    assert any(eqn.invars[0] in reached for eqn in sums)
  # first_element makes it a one-element dependency on y.
  jaxpr = jax.make_jaxpr(lambda x, y: ordering.after(
      x, ordering.first_element(y)))(x, y).jaxpr
  assert jaxpr.outvars[0] in _reached_from(jaxpr, 1)


def test_xla_does_not_fold_the_dependency_away():
  def f(x, y):
    return ordering.after(x * 2, ordering.first_element(y @ y))

  hlo = jax.jit(f).lower(jnp.ones((3,)), jnp.ones((4, 4))).compile().as_text()
  entry = hlo[hlo.index("\nENTRY"):]
  y_param = next(line.split("=")[0].strip() for line in entry.splitlines()
                 if "parameter(1)" in line)
  # y is still read after the optimisations (by its product, on which the
  # result waits); a foldable zero would leave only its declaration.
  assert entry.count(y_param) >= 2
