"""lazy_refresh: Q-GaLore's per-matrix, layer-adaptive refresh intervals.

The interval decisions are checked against ``q_galore_torch`` 1.0 on the
same sequence of projectors (``fixtures/q_galore.npz``, written by
``fixtures/generate_q_galore.py``): the reference's projectors are fed to our
schedule, which must refresh at the same steps, double at the same steps and
hold the same queue. Singular vectors' signs differ between SVD
implementations and the similarity is signed, so feeding the reference's own
projectors is what makes the decisions comparable.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from galore_optax import galore_project
from galore_optax import lazy_refresh
from galore_optax import projection

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "q_galore.npz"
SHAPES = {"tall": (48, 32), "wide": (32, 48), "alternating": (48, 32)}


@pytest.fixture(scope="module")
def ref():
  with np.load(FIXTURE) as f:
    return {k: f[k] for k in f.files}


def _feed(schedule, plan, refresh_steps, projectors, steps):
  """Our decisions on the reference's projectors: per step, refreshed,
  interval and queue after the step."""
  due = jax.jit(lambda s, t: schedule.due(s, t, 0))
  observe = jax.jit(lambda s, p: schedule.observe(s, p, plan,
                                                  jnp.bool_(True)))
  state = schedule.init(plan, "float32")
  given = dict(zip(refresh_steps.tolist(), projectors))
  out = {"refreshed": [], "interval": [], "queue": [], "refreshes": []}
  for t in range(steps):
    is_due = bool(due(state, jnp.int32(t)))
    if is_due:
      p = jnp.asarray(given[t])
      state = observe(state, projection.Projector(
          p if plan.use_left else optax.MaskedNode(),
          p if plan.use_right else optax.MaskedNode()))
    out["refreshed"].append(is_due)
    out["interval"].append(int(state.interval))
    out["queue"].append(np.asarray(state.similarities))
    out["refreshes"].append(int(state.refreshes))
  return out


@pytest.mark.parametrize("case", list(SHAPES))
def test_interval_decisions_equal_q_galore_torch(ref, case):
  meta = json.loads(str(ref["__meta__"]))
  plan = projection.plan_leaf(SHAPES[case], meta["rank"], "std")
  schedule = lazy_refresh.LazySchedule(meta["update_proj_gap"],
                                       meta["queue_size"],
                                       meta["cos_threshold"])
  ours = _feed(schedule, plan, ref[f"lazy/{case}/refresh_steps"],
               ref[f"lazy/{case}/projectors"], meta["steps"])
  np.testing.assert_array_equal(ours["refreshed"],
                                ref[f"lazy/{case}/refreshed"].astype(bool))
  np.testing.assert_array_equal(ours["interval"], ref[f"lazy/{case}/interval"])
  # The reference's queue grows to 5 (NaN-padded here); ours is always 5
  # long with the newest last. Both hold float32 cosines of unit vectors
  # computed in different orders: equal to a few float32 roundings.
  for t, (got, want) in enumerate(zip(ours["queue"],
                                      ref[f"lazy/{case}/queue"])):
    n = int(np.sum(~np.isnan(want)))
    assert n == min(max(ours["refreshes"][t] - 1, 0), 5)
    np.testing.assert_allclose(got[5 - n:], want[:n], rtol=0, atol=1e-6)
  # The cases see doublings, and in "alternating" negative similarities.
  assert len(set(ours["interval"])) >= 4
  if case == "alternating":
    assert np.min(ref["lazy/alternating/queue"][~np.isnan(
        ref["lazy/alternating/queue"])]) < -0.9


def _rule(leading_vectors, offset, gap=2, queue_size=5, threshold=0.4):
  """The reference's rule in plain Python, for our own projectors: the
  refresh steps it chooses, given the leading vector at each step (with a
  phase ``offset``, and a refresh at step 0 whatever the phase)."""
  interval, queue, past, steps = gap, [], None, []
  for t, v in enumerate(leading_vectors):
    if t and (t - offset) % interval:
      continue
    steps.append(t)
    if past is not None:
      if len(queue) == queue_size:
        queue.pop(0)
      queue.append(float(np.dot(past, v) / np.linalg.norm(past) /
                         np.linalg.norm(v)))
      if len(queue) == queue_size and sum(queue) / queue_size >= threshold:
        interval *= 2
    past = v
  return steps


def _signal_grads(steps, shape, signal_from, seed):
  """Noise, plus from ``signal_from`` on a strong fixed rank-one part
  (per matrix of a stacked shape: ``signal_from`` is a list then)."""
  rng = np.random.default_rng(seed)
  *batch, m, n = shape
  u = rng.standard_normal((*batch, m, 1))
  v = rng.standard_normal((*batch, 1, n))
  on = np.asarray(signal_from).reshape(*batch, 1, 1)
  out = []
  for t in range(steps):
    g = rng.standard_normal(shape) + (t >= on) * 4.0 * u * v
    out.append(g.astype(np.float32))
  return out


@pytest.mark.parametrize("projector_dtype,stagger", [("float32", False),
                                                      ("int4", True)])
def test_compiled_schedule_follows_the_rule_per_matrix(projector_dtype,
                                                       stagger):
  # A stacked leaf whose two matrices see a signal from different steps
  # (so their intervals part), and two plain leaves of one shape (refreshed
  # by one loop), one with a signal. One compilation.
  steps = 40
  grads = _signal_grads(steps, (2, 12, 8), [6, 100], seed=0)
  plain = _signal_grads(steps, (8, 12), 10, seed=1)
  noise = _signal_grads(steps, (8, 12), 100, seed=2)
  params = {"stack": jnp.zeros((2, 12, 8)), "w": jnp.zeros((8, 12)),
            "x": jnp.zeros((8, 12))}
  tx = galore_project(optax.scale_by_adam(), rank=2, update_proj_gap=2,
                      refresh_schedule="lazy", projector_dtype=projector_dtype,
                      stagger_refresh=stagger)
  state = tx.init(params)
  update = jax.jit(tx.update)
  refresh_steps = {("stack", 0): [], ("stack", 1): [], ("w", None): [],
                   ("x", None): []}
  leading = {k: [] for k in refresh_steps}
  for t in range(steps):
    before = state.refresh_state
    _, state = update({"stack": grads[t], "w": plain[t], "x": noise[t]},
                      state)
    for name, i in refresh_steps:
      pick = (lambda x: x[i]) if i is not None else (lambda x: x)
      if int(pick(state.refresh_state[name].refreshes)) > int(
          pick(before[name].refreshes)):
        refresh_steps[name, i].append(t)
      leading[name, i].append(np.asarray(pick(
          state.refresh_state[name].leading)))
  assert update._cache_size() == 1
  offsets = {"stack": 0, "w": 1 if stagger else 0, "x": 1 if stagger else 0}
  for (name, i), got in refresh_steps.items():
    # Our leading vector at each refresh is the one the state keeps; the
    # rule on those vectors picks the same steps.
    assert got == _rule(leading[name, i], offsets[name]), (name, i)
  intervals = np.asarray(state.refresh_state["stack"].interval)
  assert intervals[0] > intervals[1] == 2, intervals
  assert (int(state.refresh_state["w"].interval) >
          int(state.refresh_state["x"].interval) == 2)
  # What the example's summary reports, per leaf and matrix.
  summary = lazy_refresh.schedule_summary(state)
  assert summary["stack"]["refreshes"] == [
      len(refresh_steps["stack", 0]), len(refresh_steps["stack", 1])]
  assert summary["stack"]["interval"] == intervals.tolist()
  assert summary["w"]["refreshes"] == [len(refresh_steps["w", None])]
  np.testing.assert_allclose(
      summary["w"]["similarity"],
      [np.mean(np.asarray(state.refresh_state["w"].similarities))], rtol=1e-6)


def test_due_matrices_alone_change_their_projector():
  plan = projection.plan_leaf((3, 8, 6), 2, "std")
  schedule = lazy_refresh.LazySchedule(2, 5, 0.4)
  state = schedule.init(plan, "int4")._replace(
      interval=jnp.array([2, 4, 8], jnp.int32),
      refreshes=jnp.ones(3, jnp.int32))
  due = schedule.due(state, jnp.int32(4), 0)
  np.testing.assert_array_equal(due, [True, True, False])
  from galore_optax import projector_storage
  old = projector_storage.store(projection.initial_projector(plan), "int4")
  grad = jax.random.normal(jax.random.key(0), plan.shape)
  compute = lambda g, p: projection.refresh_projector(
      g, plan, projector_storage.load(p))
  new, after = schedule.refresh_leaf(grad, (old, state), plan, due, compute,
                                     "int4")
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
    assert not np.array_equal(a[:2], b[:2])
    np.testing.assert_array_equal(a[2], b[2])
  np.testing.assert_array_equal(after.refreshes, [2, 2, 1])
  # A non-finite gradient records nothing.
  _, skipped = schedule.refresh_leaf(grad.at[0, 0, 0].set(jnp.nan),
                                     (old, state), plan, due, compute, "int4")
  np.testing.assert_array_equal(skipped.refreshes, [1, 2, 1])


@pytest.mark.parametrize("kwargs,match", [
    ({"refresh_schedule": "sometimes"}, "refresh_schedule"),
    ({"refresh_schedule": "lazy", "lazy_queue_size": 0}, "lazy_queue_size"),
    ({"refresh_schedule": "lazy", "lazy_queue_size": 2.5}, "lazy_queue_size"),
    ({"refresh_schedule": "lazy", "lazy_threshold": 1.5}, "lazy_threshold"),
    ({"refresh_schedule": "lazy", "lazy_threshold": "high"}, "lazy_threshold"),
    ({"refresh_schedule": "lazy", "moments": "reset"}, "moments='keep'"),
    ({"refresh_schedule": "lazy", "moments": "project"}, "moments='keep'"),
])
def test_bad_arguments_raise_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    galore_project(optax.scale_by_adam(), **kwargs)


def test_int8_projectors_of_a_stacked_leaf_raise_at_init():
  tx = galore_project(optax.scale_by_adam(), rank=2, refresh_schedule="lazy",
                      projector_dtype="int8")
  tx.init({"w": jnp.zeros((8, 6))})  # a single matrix is fine
  with pytest.raises(ValueError, match="int8 projectors share blocks"):
    tx.init({"w": jnp.zeros((2, 8, 6))})


def test_per_layer_step_keeps_each_layer_slice_schedule():
  # The per-layer step keeps one optimizer state per layer slice; each
  # carries its own lazy state and the result equals the ordinary step.
  # (tests/test_layerwise.py's shared cases run three updates, too few for
  # a lazy decision; here threshold 0 lets the layers' intervals part.)
  from galore_optax import galore_adamw
  from galore_optax import layerwise
  from galore_optax.layerwise import layout

  def loss_fn(params, batch):
    x, y = batch
    h = layerwise.scan_layers(lambda h, p: jnp.tanh(h @ p["w"]), x,
                              params["layers"])
    return jnp.mean((h - y) ** 2)

  params = {"layers": {"w": 0.3 * jax.random.normal(jax.random.key(0),
                                                    (2, 12, 12))}}
  tx = galore_adamw(1e-2, rank=2, update_proj_gap=1,
                    refresh_schedule="lazy", lazy_queue_size=1,
                    lazy_threshold=0.0, projector_dtype="int4")
  steps = layerwise.make_layerwise_step(loss_fn, tx, per_layer=["layers"],
                                        donate=False)
  per_layer, lw_state = params, steps.init(params)
  ordinary, state = params, tx.init(params)
  update = jax.jit(lambda p, s, b: tx.update(jax.grad(loss_fn)(p, b), s, p))
  for t in range(6):
    x = jax.random.normal(jax.random.key(t + 1), (4, 12))
    batch = (x, jnp.tanh(x[:, ::-1]))
    per_layer, lw_state, _ = steps.step(per_layer, lw_state, batch)
    updates, state = update(ordinary, state, batch)
    ordinary = optax.apply_updates(ordinary, updates)
  np.testing.assert_allclose(per_layer["layers"]["w"],
                             ordinary["layers"]["w"], rtol=0, atol=1e-6)
  (want,) = layout.galore_states(state)
  (got,) = layout.galore_states(
      steps.unpack_state(lw_state, params)["layers.w"].opt_state)
  np.testing.assert_array_equal(got.refresh_state["layers.w"].interval,
                                want.refresh_state["layers.w"].interval)
  np.testing.assert_array_equal(got.refresh_state["layers.w"].refreshes,
                                want.refresh_state["layers.w"].refreshes)
  assert got.refresh_state["layers.w"].refreshes.shape == (2,)


def test_lazy_schedule_refuses_random_projectors():
  # Random projectors are drawn, not computed from the gradient, so there is
  # no leading singular vector whose stability could lengthen an interval.
  with pytest.raises(ValueError, match="random"):
    galore_project(optax.scale_by_adam(), refresh_schedule="lazy",
                   projector_method="random")
