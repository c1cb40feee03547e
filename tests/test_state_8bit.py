"""``quantize_state_8bit``: bitsandbytes' 8-bit Adam protocol, the wrapper."""

import functools
import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from galore_optax import quantization as qz
from galore_optax.state_8bit import QuantizedState
from galore_optax.state_8bit import quantize_state_8bit
from galore_optax.state_fields import is_second_moment

FIXTURE = (pathlib.Path(__file__).parent / "fixtures" /
           "bitsandbytes_blockwise.npz")
LR = 1e-3


def adamw_8bit(lr=LR, weight_decay=0.0, **kwargs):
  return optax.chain(quantize_state_8bit(optax.scale_by_adam(), **kwargs),
                     optax.add_decayed_weights(weight_decay),
                     optax.scale_by_learning_rate(lr))


def _np_dequantize(q, signed):
  """NumPy dequantisation for checks outside jit (eager JAX would compile
  every op)."""
  code = np.asarray(qz.create_dynamic_map(signed))
  codes = np.asarray(q.codes)
  absmax = np.repeat(np.asarray(q.absmax), 256)[:codes.size]
  return (code[codes.reshape(-1)] * absmax).reshape(codes.shape)


def _adam_states(state):
  """(8-bit ScaleByAdamState with QuantizedArrays, its dequantised copy)."""
  inner = state[0].inner_state
  deq = inner._replace(
      mu=jax.tree.map(lambda q: qz.dequantize(q, signed=True), inner.mu,
                      is_leaf=lambda x: isinstance(x, qz.QuantizedArray)),
      nu=jax.tree.map(lambda q: qz.dequantize(q, signed=False), inner.nu,
                      is_leaf=lambda x: isinstance(x, qz.QuantizedArray)))
  return inner, deq


@functools.partial(jax.jit, static_argnames="steps")
def _protocol(p0, steps):
  """bitsandbytes' test: 8-bit vs float32 Adam, re-synchronised every step.

  After each step the float32 run's parameters and moments are set to the
  8-bit run's (dequantised), so each step measures one step's error. The
  gradient of step t is 0.01 * (a fixed N(0, 1) draw rolled by 7919 t):
  drawing 4M fresh normals per step would dominate the test's run time.
  ``p0`` is a dict of leaves, each with its own 8-bit state and metrics.
  """
  opt8, opt32 = adamw_8bit(), optax.adam(LR)
  keys = dict(zip(p0, jax.random.split(jax.random.key(1), len(p0))))
  base = {k: jax.random.normal(keys[k], p.shape).reshape(-1)
          for k, p in p0.items()}

  def step(carry, t):
    p8, s8, s32 = carry
    g = {k: 0.01 * jnp.roll(base[k], 7919 * t).reshape(p.shape)
         for k, p in p0.items()}
    u8, s8 = opt8.update(g, s8, p8)
    u32, s32 = opt32.update(g, s32, p8)
    new_p8 = optax.apply_updates(p8, u8)
    p32 = optax.apply_updates(p8, u32)
    _, deq = _adam_states(s8)
    fp = s32[0]
    rel = lambda a, b: jnp.mean(jnp.abs(a - b)) / jnp.mean(jnp.abs(b))
    metrics = dict(
        param_err=jax.tree.map(lambda a, b: jnp.mean(jnp.abs(a - b)), new_p8,
                               p32),
        mu_rel=jax.tree.map(rel, deq.mu, fp.mu),
        nu_rel=jax.tree.map(rel, deq.nu, fp.nu),
    )
    s32 = (fp._replace(mu=deq.mu, nu=deq.nu),) + s32[1:]  # re-synchronise
    return (new_p8, s8, s32), metrics

  s8 = opt8.init(p0)
  (_, s8, _), metrics = jax.lax.scan(step, (p0, s8, optax.adam(LR).init(p0)),
                                     jnp.arange(steps))
  return s8, metrics


# bitsandbytes' protocol: 50 steps for every shape. Leaves with the same step
# count share one compilation.
PROTOCOL_STEPS = {32: 50, 1024: 50, 4097: 50}


@functools.lru_cache(maxsize=None)
def _protocol_results(steps):
  p0 = {d: 0.1 * np.random.default_rng(d).standard_normal((1024, d),
                                                          np.float32)
        for d, n in PROTOCOL_STEPS.items() if n == steps}
  s8, metrics = _protocol(p0, steps)
  return s8[0].inner_state, jax.tree.map(np.asarray, metrics)


@pytest.mark.parametrize("d", sorted(PROTOCOL_STEPS))
def test_bitsandbytes_adam_protocol_against_float32_adam(d):
  steps = PROTOCOL_STEPS[d]
  inner, metrics = _protocol_results(steps)
  for moment in (inner.mu[d], inner.nu[d]):  # really 8-bit, even for d = 32
    assert isinstance(moment, qz.QuantizedArray)
    assert moment.codes.dtype == jnp.uint8 and moment.codes.shape == (1024, d)
    assert moment.absmax.dtype == jnp.float32
    assert moment.absmax.shape == (1024 * d // 256,)
  param_err = metrics["param_err"][d]
  assert param_err.shape == (steps,)
  assert np.mean(param_err) < 6e-5, param_err  # bitsandbytes' bound
  # The 8-bit moments stay close to float32 Adam's from the same state.
  assert np.max(metrics["mu_rel"][d]) < 0.02, metrics["mu_rel"][d]
  assert np.max(metrics["nu_rel"][d]) < 0.01, metrics["nu_rel"][d]


def test_trajectory_matches_bitsandbytes_adam8bit():
  data = np.load(FIXTURE)
  hp = json.loads(str(data["__meta__"]))["adam8bit"]
  assert hp["block_size"] == 256 and hp["min_8bit_size"] == 4096
  opt = optax.chain(
      quantize_state_8bit(optax.scale_by_adam(*hp["betas"], eps=hp["eps"])),
      optax.scale_by_learning_rate(hp["lr"]))
  params = {k: jnp.asarray(data[f"adam8bit/{k}/params0"]) for k in "wb"}
  state = jax.jit(opt.init)(params)
  update = jax.jit(opt.update)
  for t in range(hp["steps"]):
    grads = {k: jnp.asarray(data[f"adam8bit/{k}/grads"][t]) for k in "wb"}
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    inner = state[0].inner_state
    # 6144-value weight: 8-bit state, codes as bnb's up to its coarse search.
    w_diff = np.abs(np.asarray(params["w"]) - data["adam8bit/w/params"][t])
    assert w_diff.mean() < 2e-6, w_diff.mean()  # one step moves ~4e-4
    for ours, name in ((inner.mu["w"], "1"), (inner.nu["w"], "2")):
      agree = np.mean(np.asarray(ours.codes) ==
                      data[f"adam8bit/w/state{name}_codes"][t])
      assert agree > 0.95, (t, name, agree)
      np.testing.assert_allclose(ours.absmax,
                                 data[f"adam8bit/w/absmax{name}"][t], rtol=1e-6)
    # 100-value bias: under min_size, float32 state on both sides.
    assert inner.mu["b"].dtype == jnp.float32
    np.testing.assert_allclose(params["b"], data["adam8bit/b/params"][t],
                               atol=1e-7)
    np.testing.assert_allclose(inner.nu["b"], data["adam8bit/b/state2"][t],
                               rtol=1e-5)


SHAPES = {
    "big": (64, 128),
    "exact": (4096,),  # == min_size: quantised
    "under": (4095,),
    "small": (10,),
}


def _params():
  return {k: np.ones(s, np.float32) for k, s in SHAPES.items()}


def _grads(seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s, np.float32) for k, s in SHAPES.items()}


# One optimizer and one compiled step for the small tree, shared by tests
# (each compilation costs about a second on CPU).
OPT = adamw_8bit(weight_decay=0.1)
INIT = jax.jit(OPT.init)
TRACES = []


@jax.jit
def STEP(params, state, grads):
  TRACES.append(None)  # runs only while tracing
  updates, state = OPT.update(grads, state, params)
  return optax.apply_updates(params, updates), updates, state


def test_state_layout_and_maps():
  state = INIT(_params())
  assert isinstance(state[0], QuantizedState)
  inner = state[0].inner_state
  assert inner.count.dtype == jnp.int32
  # Zero moments: code of 0 is 127 on the signed map, 0 on the unsigned one.
  np.testing.assert_array_equal(inner.mu["big"].codes, 127)
  np.testing.assert_array_equal(inner.nu["big"].codes, 0)
  for moment in (inner.mu, inner.nu):
    for name, size in (("big", 8192), ("exact", 4096)):
      q = moment[name]
      assert isinstance(q, qz.QuantizedArray)
      assert q.codes.dtype == jnp.uint8 and q.codes.shape == SHAPES[name]
      assert q.absmax.dtype == jnp.float32 and q.absmax.shape == (size // 256,)
    for name in ("under", "small"):
      assert moment[name].dtype == jnp.float32
      assert moment[name].shape == SHAPES[name]
  # One step from zero moments: mu = 0.1 g (signed map), nu = 0.001 g^2
  # (unsigned map). Bounds: the maps' worst error (0.0071 signed, 0.0036
  # unsigned) times the block maximum.
  g = _grads()
  _, _, state = STEP(_params(), state, g)
  inner = state[0].inner_state
  mu = _np_dequantize(inner.mu["big"], signed=True)
  nu = _np_dequantize(inner.nu["big"], signed=False)
  gmax = np.abs(g["big"]).max()
  np.testing.assert_allclose(mu, 0.1 * g["big"], atol=0.0071 * 0.1 * gmax)
  np.testing.assert_allclose(nu, 0.001 * g["big"]**2,
                             atol=0.0036 * 0.001 * gmax**2)
  np.testing.assert_allclose(inner.nu["small"], 0.001 * g["small"]**2,
                             rtol=1e-6)


def test_unsigned_override_and_default_rule():
  # Override: everything on the signed map, whose code of 0 is 127 (the
  # unsigned map's is 0), so the zero moments of init tell the maps apart.
  opt = quantize_state_8bit(optax.scale_by_adam(), unsigned=lambda path: False)
  state = jax.jit(opt.init)({"w": np.ones((64, 128), np.float32)})
  np.testing.assert_array_equal(state.inner_state.nu["w"].codes, 127)
  np.testing.assert_array_equal(state.inner_state.mu["w"].codes, 127)

  def flags(state):
    return {jax.tree_util.keystr(p): is_second_moment(state, p)
            for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]}

  # Abstract states (jax.eval_shape) carry the same NamedTuple types.
  params = {"attn": {"v": np.ones((3, 3))}, "nu": np.ones(2)}
  adam = jax.eval_shape(
      optax.chain(optax.clip(1.0), optax.scale_by_adam()).init, params)
  f = flags(adam)
  # Parameter names ("v", "nu" dict keys) never decide; state fields do.
  assert f["[1].mu['attn']['v']"] is False and f["[1].mu['nu']"] is False
  assert f["[1].nu['attn']['v']"] is True and f["[1].nu['nu']"] is True
  factored = jax.eval_shape(optax.scale_by_factored_rms().init,
                            {"w": np.ones((300, 200))})
  assert all(v for k, v in flags(factored).items() if k != ".count")
  # Adan's ``v`` is a signed difference EMA: not claimed by the default.
  adan = jax.eval_shape(optax.scale_by_adan().init, {"w": np.ones(3)})
  assert not flags(adan)[".v['w']"]
  wrapped = jax.eval_shape(
      optax.inject_hyperparams(optax.adamw)(learning_rate=0.1).init,
      {"w": np.ones(3)})
  assert flags(wrapped)[".inner_state[0].nu['w']"]
  assert not flags(wrapped)[".inner_state[0].mu['w']"]


def test_shapes_and_dtypes_invariant_and_jit_traces_once():
  params = _params()
  state0 = INIT(params)
  state = state0
  params, _, state = STEP(params, state, _grads(0))
  traced = len(TRACES)
  assert traced >= 1
  for seed in range(1, 4):
    params, _, state = STEP(params, state, _grads(seed))
    chex.assert_trees_all_equal_structs(state, state0)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, state0)
  assert len(TRACES) == traced  # no retracing
  assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))


def test_adamw_8bit_chain_tracks_optax_adamw():
  opt32 = optax.adamw(LR, weight_decay=0.1)

  @jax.jit
  def step32(params, state, grads):
    updates, state = opt32.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  p8 = p32 = p0 = _params()
  s8, s32 = INIT(p0), jax.jit(opt32.init)(p0)
  for seed in range(10):  # no re-synchronisation here
    g = jax.tree.map(lambda x: 0.01 * x, _grads(seed))
    p8, _, s8 = STEP(p8, s8, g)
    p32, s32 = step32(p32, s32, g)
  moved = np.mean(np.abs(np.asarray(p32["big"]) - p0["big"]))
  diff = np.mean(np.abs(np.asarray(p8["big"]) - np.asarray(p32["big"])))
  assert moved > 2e-3
  assert diff < 0.03 * moved, (diff, moved)
  # Leaves under min_size keep float32 moments: same as optax.adamw.
  np.testing.assert_allclose(p8["small"], p32["small"], atol=1e-6)


def test_bfloat16_params():
  p0 = (0.1 * np.random.default_rng(3).standard_normal((256, 64))).astype(
      jnp.bfloat16)
  opt8, opt32 = adamw_8bit(), optax.adam(LR)

  @jax.jit
  def run(p0):
    def body(carry, t):
      p8, s8, s32 = carry
      g = (0.01 * jax.random.normal(jax.random.fold_in(jax.random.key(4), t),
                                    p0.shape)).astype(jnp.bfloat16)
      u8, s8 = opt8.update(g, s8, p8)
      new_p8 = optax.apply_updates(p8, u8)
      p32 = p8.astype(jnp.float32)  # re-synchronised float32 reference
      u32, s32 = opt32.update(g.astype(jnp.float32), s32, p32)
      _, deq = _adam_states(s8)
      err = jnp.mean(jnp.abs(new_p8.astype(jnp.float32) -
                             optax.apply_updates(p32, u32)))
      s32 = (s32[0]._replace(mu=deq.mu, nu=deq.nu),) + s32[1:]
      return (new_p8, s8, s32), err

    s8 = opt8.init(p0)
    carry = (p0, s8, optax.adam(LR).init(p0.astype(jnp.float32)))
    (p8, s8_end, _), errs = jax.lax.scan(body, carry, jnp.arange(10))
    return p8, s8, s8_end, errs

  p8, s8, s8_end, errs = run(p0)
  assert p8.dtype == jnp.bfloat16
  chex.assert_trees_all_equal_shapes_and_dtypes(s8, s8_end)
  assert isinstance(s8_end[0].inner_state.mu, qz.QuantizedArray)
  assert float(jnp.mean(errs)) < 1.7e-4  # bitsandbytes' bf16 bound


def test_orbax_round_trip_is_bit_identical(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  params = _params()
  state = INIT(params)
  for seed in range(2):
    params, _, state = STEP(params, state, _grads(seed))

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", state)
  checkpointer.wait_until_finished()
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = checkpointer.restore(tmp_path / "ckpt", target)
  chex.assert_trees_all_equal_structs(restored, state)
  chex.assert_trees_all_equal(restored, state)

  out1 = STEP(params, state, _grads(9))
  out2 = STEP(params, restored, _grads(9))
  chex.assert_trees_all_equal(out1, out2)


def test_extra_args_are_forwarded():
  seen = []

  def update(updates, state, params=None, *, scale=1.0, **extra_args):
    del params, extra_args
    seen.append(scale)
    return jax.tree.map(lambda u: scale * u, updates), state

  inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(),
                                                update)
  opt = quantize_state_8bit(inner)
  updates, _ = opt.update({"w": jnp.ones(3)}, opt.init({"w": jnp.ones(3)}),
                          scale=3.0)
  assert seen == [3.0]
  np.testing.assert_array_equal(updates["w"], 3.0)
  # A plain GradientTransformation ignores extra args.
  opt = quantize_state_8bit(optax.scale(2.0))
  updates, _ = opt.update({"w": jnp.ones(3)}, opt.init({"w": jnp.ones(3)}),
                          value=1.0)
  np.testing.assert_array_equal(updates["w"], 2.0)


def test_inner_quantized_arrays_pass_through_untouched():
  """A QuantizedArray kept by the inner state is neither re-quantised nor
  dequantised (e.g. an 8-bit projector, or a nested wrapper)."""
  nested = quantize_state_8bit(quantize_state_8bit(optax.scale_by_adam()))
  params = {"w": np.ones((64, 128), np.float32)}
  state = jax.jit(nested.init)(params)
  inner = state.inner_state.inner_state
  assert isinstance(inner.mu["w"], qz.QuantizedArray)
  assert inner.mu["w"].codes.dtype == jnp.uint8
  _, state = jax.jit(nested.update)({"w": np.full((64, 128), 0.5,
                                                   np.float32)}, state)
  nu = _np_dequantize(state.inner_state.inner_state.nu["w"], signed=False)
  np.testing.assert_allclose(nu, 0.001 * 0.25, rtol=1e-6)


def test_state_memory_is_about_a_quarter():
  params = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}

  def nbytes(opt):
    state = jax.eval_shape(opt.init, params)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))

  full = nbytes(optax.scale_by_adam())
  small = nbytes(quantize_state_8bit(optax.scale_by_adam()))
  assert small / full < 0.26  # 1 byte per value + 4 per 256 (+ count)


@pytest.mark.parametrize("name", ["block_size", "min_size"])
@pytest.mark.parametrize("bad", [0, -1, 2.5, True, None, "256"])
def test_bad_arguments_raise(name, bad):
  with pytest.raises(ValueError, match=name):
    quantize_state_8bit(optax.scale_by_adam(), **{name: bad})


def test_bad_unsigned_raises():
  with pytest.raises(ValueError, match="unsigned"):
    quantize_state_8bit(optax.scale_by_adam(), unsigned="nu")


def test_composes_outside_galore_project():
  """The other order: 8-bit storage of the whole GaLore state, projectors
  included (signed map), second moments on the unsigned map."""
  from galore_optax import galore_project  # pylint: disable=g-import-not-at-top
  tx = quantize_state_8bit(
      galore_project(optax.scale_by_adam(), rank=16, update_proj_gap=2),
      min_size=256)
  params = {"w": jnp.zeros((64, 32))}
  state = tx.init(params)
  grads = {"w": jax.random.normal(jax.random.key(0), (64, 32))}
  step = jax.jit(tx.update)
  for _ in range(3):
    updates, new_state = step(grads, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
    state = new_state
  inner = state.inner_state
  assert inner.projectors["w"].right.codes.dtype == jnp.uint8
  assert inner.inner_state.nu["w"].codes.dtype == jnp.uint8
  assert updates["w"].shape == (64, 32)
  assert bool(jnp.all(jnp.isfinite(updates["w"])))


def _adam_by_hand(grads, state):
  """One step of 8-bit Adam written out: dequantise, Adam (float32)."""
  inner = state.inner_state
  deq = lambda signed: (lambda x: qz.dequantize(x, signed) if isinstance(
      x, qz.QuantizedArray) else x)
  is_q = lambda x: isinstance(x, qz.QuantizedArray)
  float_state = inner._replace(
      mu=jax.tree.map(deq(True), inner.mu, is_leaf=is_q),
      nu=jax.tree.map(deq(False), inner.nu, is_leaf=is_q))
  return optax.scale_by_adam().update(grads, float_state)


def test_update_equals_dequantise_adam_quantise_bit_for_bit():
  """Each use of the new state recomputes it from the 8-bit state; the
  result is still exactly one dequantise-update-quantise step."""
  tx = quantize_state_8bit(optax.scale_by_adam())
  params = {"w": jnp.zeros((96, 128)), "b": jnp.zeros((300,))}
  state = tx.init(params)
  step, by_hand = jax.jit(tx.update), jax.jit(_adam_by_hand)
  quantize = jax.jit(qz.quantize, static_argnums=1)
  for i in range(3):
    grads = jax.tree.map(
        lambda p, i=i: jax.random.normal(jax.random.key(i), p.shape), params)
    expected_updates, expected = by_hand(grads, state)
    updates, state = step(grads, state)
    chex.assert_trees_all_equal(updates, expected_updates)
    inner = state.inner_state
    assert int(inner.count) == int(expected.count)
    # "b" is below min_size: float32 as it is.
    np.testing.assert_array_equal(inner.mu["b"], expected.mu["b"])
    np.testing.assert_array_equal(inner.nu["b"], expected.nu["b"])
    for new, want, signed in ((inner.mu["w"], expected.mu["w"], True),
                              (inner.nu["w"], expected.nu["w"], False)):
      want = quantize(want, signed)
      np.testing.assert_array_equal(new.codes, want.codes)
      np.testing.assert_array_equal(new.absmax, want.absmax)


def test_dequantized_state_is_not_written_out():
  """XLA fuses each use of the dequantised moments into one pass over the
  codes: no float32 copy of a moment among the step's temporaries."""
  tx = quantize_state_8bit(optax.scale_by_adam())
  params = {"w": jnp.zeros((1024, 1024))}
  state = tx.init(params)
  compiled = jax.jit(tx.update, donate_argnums=1).lower(params,
                                                        state).compile()
  one_moment = 4 * 1024 * 1024
  assert compiled.memory_analysis().temp_size_in_bytes < one_moment


def test_costly_inner_work_is_not_repeated():
  """Around an inner transformation with products (here the projection),
  the state is dequantised once and the inner update traced once."""
  from galore_optax import galore_project  # pylint: disable=g-import-not-at-top

  def count_dots(jaxpr):
    return sum(eqn.primitive.name == "dot_general" for eqn in jaxpr.eqns)

  inner = galore_project(optax.scale_by_adam(), rank=16, update_proj_gap=2)
  tx = quantize_state_8bit(inner, min_size=256)
  params = {"w": jnp.zeros((64, 32))}
  grads = {"w": jnp.ones((64, 32))}
  alone = jax.make_jaxpr(inner.update)(grads, inner.init(params)).jaxpr
  wrapped = jax.make_jaxpr(tx.update)(grads, tx.init(params)).jaxpr
  assert count_dots(alone) >= 2  # at least: project, project back
  assert count_dots(wrapped) == count_dots(alone)


@pytest.mark.parametrize("bad", [4, 260, 384, 2**25])
def test_block_size_must_be_a_power_of_two_in_range(bad):
  with pytest.raises(ValueError, match=r"block_size must be a power of two "
                     rf"from 8 to 16777216, got {bad}"):
    quantize_state_8bit(optax.scale_by_adam(), block_size=bad)


def test_block_size_beyond_every_leaf_costs_what_the_leaves_do():
  """A leaf smaller than a block is one block of its own size: the same
  state and update as with a block of exactly its size, memory in
  proportion to the leaf (not 64 MiB per block of 2**24 values)."""
  params = {"w": jnp.zeros((4, 8))}
  grads = {"w": jnp.linspace(-1.0, 1.0, 32).reshape(4, 8)}

  def compiled_update(block_size):
    tx = quantize_state_8bit(optax.scale_by_adam(), block_size=block_size,
                             min_size=1)
    state = tx.init(params)
    return jax.jit(tx.update).lower(grads, state).compile(), state

  (huge, huge_state), (fitted, fitted_state) = map(compiled_update,
                                                   (2**24, 32))
  assert huge.memory_analysis().temp_size_in_bytes < 2**16
  assert huge_state.inner_state.mu["w"].absmax.shape == (1,)
  chex.assert_trees_all_equal(huge(grads, huge_state),
                              fitted(grads, fitted_state))
  # min_size above every leaf: nothing is quantised, nothing is wasted.
  tx = quantize_state_8bit(optax.scale_by_adam(), min_size=2**62)
  assert jax.tree.leaves(jax.eval_shape(tx.init, params))[1].dtype == (
      jnp.float32)


def test_state_of_another_block_size_fails_at_update_naming_the_leaf():
  params = {"w": jnp.zeros((48, 96))}  # 18 blocks of 256, 9 of 512
  state = quantize_state_8bit(optax.scale_by_adam()).init(params)
  other = quantize_state_8bit(optax.scale_by_adam(), block_size=512)
  with pytest.raises(ValueError, match=r"block_size=512\) cannot read the "
                     r"8-bit state leaf \.mu\['w'\].*absmax must have shape "
                     r"\(9,\).*got \(18,\)"):
    other.update(params, state)


def test_updates_keep_the_incoming_dtype():
  """The float32 dequantised state does not make bfloat16 updates float32
  (quantised and unquantised leaves alike)."""
  tx = quantize_state_8bit(optax.scale_by_adam(), min_size=64)
  params = {"big": jnp.zeros((64, 8), jnp.bfloat16),
            "small": jnp.zeros((8,), jnp.bfloat16)}
  updates, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params),
                                      tx.init(params))
  assert isinstance(state.inner_state.mu["big"], qz.QuantizedArray)
  assert {k: u.dtype for k, u in updates.items()} == {
      "big": jnp.bfloat16, "small": jnp.bfloat16}
  np.testing.assert_array_equal(np.asarray(updates["big"], np.float32), 1.0)


def test_update_dtype_float32_and_bad_update_dtype():
  tx = quantize_state_8bit(optax.scale_by_adam(), min_size=64,
                           update_dtype=jnp.float32)
  params = {"big": jnp.zeros((64, 8), jnp.float16)}
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params),
                                  tx.init(params))
  assert updates["big"].dtype == jnp.float32
  for bad in ("int8", "nonsense", 3):
    with pytest.raises(ValueError, match="update_dtype must be a floating"):
      quantize_state_8bit(optax.scale_by_adam(), update_dtype=bad)
