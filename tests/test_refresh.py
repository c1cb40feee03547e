"""refresh: when and how galore_project recomputes its projectors.

Batches of equal-shape leaves, their byte bound and balance, staggered
phases, the zero-trip refresh loops, and the randomized method's test
matrices.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _galore_steps import random_grads
from _galore_steps import tanh_chain_step
from galore_optax import galore_project
from galore_optax import projection
from galore_optax import projector_storage
from galore_optax import refresh


def _refreshed_leaves(tx, params, steps):
  """Per step after the first, the leaves whose projector changed."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  prev = None
  refreshed = {}
  for step in range(steps):
    _, state = update(random_grads(step, params), state)
    cur = {k: np.asarray(v.right) for k, v in state.projectors.items()}
    if prev is not None:
      refreshed[step] = sorted(k for k in cur
                               if not np.array_equal(cur[k], prev[k]))
    prev = cur
  return refreshed


def test_staggered_refresh_spreads_leaves():
  # Distinct shapes: each leaf is its own refresh batch.
  params = {f"w{i}": jnp.zeros((8, 6 - i)) for i in range(4)}
  tx = galore_project(optax.scale_by_adam(), rank=2, update_proj_gap=4,
                      stagger_refresh=True)
  assert _refreshed_leaves(tx, params, 9) == {
      1: ["w1"], 2: ["w2"], 3: ["w3"], 4: ["w0"], 5: ["w1"], 6: ["w2"],
      7: ["w3"], 8: ["w0"]}


def test_staggered_refresh_spreads_single_leaves_while_the_window_allows():
  # Equal shapes, 4 leaves, gap 4: one leaf per step, as with distinct shapes.
  params = {f"w{i}": jnp.zeros((8, 6)) for i in range(4)}
  tx = galore_project(optax.scale_by_adam(), rank=2, update_proj_gap=4,
                      stagger_refresh=True)
  assert _refreshed_leaves(tx, params, 6) == {
      1: ["w1"], 2: ["w2"], 3: ["w3"], 4: ["w0"], 5: ["w1"]}


def test_staggered_refresh_spreads_batches_of_equal_shapes():
  # 4 leaves, gap 2: batches of ceil(4 / 2) = 2 leaves, one per step.
  params = {f"w{i}": jnp.zeros((8, 6)) for i in range(4)}
  tx = galore_project(optax.scale_by_adam(), rank=2, update_proj_gap=2,
                      stagger_refresh=True)
  assert _refreshed_leaves(tx, params, 5) == {
      1: ["w2", "w3"], 2: ["w0", "w1"], 3: ["w2", "w3"], 4: ["w0", "w1"]}


def test_refresh_batches_respect_the_byte_bound(monkeypatch):
  # Two leaves' worth of float32 per batch: w0+w1 and w2+w3 refresh together.
  monkeypatch.setattr(refresh, "REFRESH_BATCH_BYTES", 2 * 4 * 8 * 6)
  keys = [("a",)] * 4 + [("b",)]
  assert refresh.refresh_batches(keys, [48] * 5) == [[0, 1], [2, 3], [4]]
  assert refresh.refresh_batches(keys, [48] * 5, max_leaves=1) == [
      [0], [1], [2], [3], [4]]
  # Five leaves, at most four per batch: 3 + 2, not 4 + a remainder of 1.
  monkeypatch.setattr(refresh, "REFRESH_BATCH_BYTES", 4 * 4 * 48)
  assert refresh.refresh_batches([("a",)] * 5, [48] * 5) == [
      [0, 1, 2], [3, 4]]


def test_refresh_does_not_keep_every_gradient_alive(monkeypatch):
  # One leaf per refresh batch. A single refresh cond over all gradients
  # would keep them all alive until every projection could start (24 gradient
  # sizes of temporaries here); one cond per batch lets each be projected
  # and freed as the backward pass produces it, as staggering does.
  monkeypatch.setattr(refresh, "REFRESH_BATCH_BYTES", 0)
  layers, d = 8, 256
  params = {f"layer{i}": jnp.zeros((d, d)) for i in range(layers)}

  def temp_bytes(stagger_refresh):
    step, tx = tanh_chain_step(params, stagger_refresh)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, tx.init(params)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  default = temp_bytes(False)
  assert default <= temp_bytes(True)
  assert default < layers * d * d * 4


@pytest.mark.parametrize("method,kernel", [("svd", "lapack_sgesdd"),
                                           ("randomized", "lapack_ssyevd")])
@pytest.mark.parametrize("batch_bytes", [0, 2**30])
def test_decompositions_run_only_inside_the_refresh(monkeypatch, batch_bytes,
                                                    method, kernel):
  # A refresh that XLA could hoist out of its loop or cond (a loop-invariant
  # decomposition) would run at every update, not every update_proj_gap.
  monkeypatch.setattr(refresh, "REFRESH_BATCH_BYTES", batch_bytes)
  params = {f"layer{i}": jnp.zeros((32, 32)) for i in range(4)}
  step, tx = tanh_chain_step(params, stagger_refresh=False,
                             projector_method=method)
  hlo = jax.jit(step).lower(params, tx.init(params)).compile().as_text()
  assert kernel in hlo
  assert kernel not in hlo[hlo.index("\nENTRY"):]


@pytest.mark.parametrize("stagger", [False, True])
def test_exact_svd_refreshes_each_leaf_in_its_own_cond(stagger):
  """The randomized method refreshes equal-shape leaves by one loop; the
  exact SVD gives each leaf a cond (loops over several leaves made ordinary
  steps slower), at the phase its batch would have."""
  params = {f"w{i}": jnp.zeros((24, 16)) for i in range(4)}
  def counts(method):
    tx = galore_project(optax.scale_by_adam(), rank=4, update_proj_gap=2,
                        projector_method=method, stagger_refresh=stagger)
    jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params)).jaxpr
    return _primitive_count(jaxpr, "while"), _primitive_count(jaxpr, "cond")
  assert counts("svd")[0] == 0 and counts("svd")[1] >= 4
  assert counts("randomized")[0] >= 1


# The exact SVD refreshes every leaf by a cond of its own, batched or not.
@pytest.mark.parametrize("method", ["randomized"])
@pytest.mark.parametrize("projector_dtype", ["float32", "int8"])
def test_batched_refresh_equals_refreshing_each_leaf(monkeypatch, method,
                                                     projector_dtype):
  params = {f"w{i}": jnp.zeros((3, 24, 16)) for i in range(3)}
  params["bad"] = jnp.zeros((3, 24, 16))
  grads = random_grads(0, params)
  grads["bad"] = grads["bad"].at[1, 2, 3].set(jnp.nan)  # keeps its own

  def run(batch_bytes):
    monkeypatch.setattr(refresh, "REFRESH_BATCH_BYTES", batch_bytes)
    tx = galore_project(optax.scale_by_adam(), rank=4, update_proj_gap=2,
                        projector_method=method,
                        projector_dtype=projector_dtype)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(3):
      g = grads if step == 0 else random_grads(step, params)
      updates, state = update(g, state)
    return updates, state

  batched = run(2**30)
  single = run(0)
  chex.assert_trees_all_equal(batched, single)


def _primitive_count(jaxpr, name):
  """Occurrences of a primitive in a jaxpr and the jaxprs nested in it."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == name
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          count += _primitive_count(sub, name)
  return count


@pytest.mark.parametrize("stagger", [False, True])
def test_randomized_refresh_draws_once_per_sketch_shape(stagger):
  """Random test matrices are drawn once per update and shape, outside the
  refreshes: a refresh per leaf (staggered) would otherwise compile one
  random generator each."""
  params = {f"w{i}": jnp.zeros((24, 16)) for i in range(5)}
  params["v"] = jnp.zeros((16, 40))  # another sketch shape
  tx = galore_project(optax.scale_by_adam(), rank=4, update_proj_gap=10,
                      projector_method="randomized", stagger_refresh=stagger)
  jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params)).jaxpr
  assert _primitive_count(jaxpr, "random_bits") == 2


def test_refresh_offsets_spread_batches_over_the_window():
  assert refresh.refresh_offsets(3, 8, stagger=False) == [0, 0, 0]
  assert refresh.refresh_offsets(4, 8, stagger=True) == [0, 2, 4, 6]
  # More batches than steps: some phases hold several batches.
  assert refresh.refresh_offsets(3, 2, stagger=True) == [0, 0, 1]


def test_every_batch_is_due_at_update_zero_then_at_its_phase():
  due = lambda count, offset: bool(refresh.is_due(jnp.int32(count), offset, 4))
  assert all(due(0, offset) for offset in range(4))
  assert [c for c in range(1, 10) if due(c, 0)] == [4, 8]
  assert [c for c in range(1, 10) if due(c, 3)] == [3, 7]


def test_step_sketches_are_one_per_shape_and_reproducible():
  plans = [projection.plan_leaf(shape, 4, "std")
           for shape in [(24, 16), (24, 16), (3, 24, 16), (16, 40)]]
  dims = {d for p in plans for d in projection.sketch_dims(p) if d is not None}
  sketches = refresh.step_sketches(plans, jnp.int32(3), seed=0)
  assert set(sketches) == dims and len(dims) == 2
  again = refresh.step_sketches(plans, jnp.int32(3), seed=0)
  later = refresh.step_sketches(plans, jnp.int32(4), seed=0)
  for d in dims:
    assert sketches[d].shape == d and sketches[d].dtype == jnp.float32
    np.testing.assert_array_equal(sketches[d], again[d])
    assert not np.array_equal(sketches[d], later[d])
  assert refresh.step_sketches([], jnp.int32(0), seed=0) == {}


@pytest.mark.parametrize("size", [1, 3])
@pytest.mark.parametrize("method", ["svd", "randomized"])
def test_refresh_batch_loop_equals_each_leaf_and_skips_when_not_due(size,
                                                                     method):
  plan = projection.plan_leaf((24, 16), 4, "std")
  policy = refresh.RefreshPolicy(
      optax.scale_by_adam(), gap=2, stagger=False, method=method,
      projector_dtype="int8", moments="keep", seed=0)
  grads = [random_grads(i, {"w": jnp.zeros((24, 16))})["w"]
           for i in range(size)]
  stored = [projection.initial_projector(plan)] * size
  stored = [projector_storage.store(p, "int8") for p in stored]
  sketches = refresh.step_sketches([plan], jnp.int32(0), seed=0)

  @jax.jit
  def run(grads, stored, due):
    return (policy.refresh_batch(grads, stored, plan, sketches, due),
            [policy.refresh_leaf(g, p, plan, sketches)
             for g, p in zip(grads, stored)])

  batched, each = run(grads, stored, jnp.bool_(True))
  chex.assert_trees_all_equal(batched, each)
  skipped, _ = run(grads, stored, jnp.bool_(False))
  chex.assert_trees_all_equal(skipped, stored)
