"""int8 weights with group-wise scales and stochastic rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import galore_optax
from galore_optax import weight_quantization as wq

PARAMS = {
    "attn": {"kernel": jax.random.normal(jax.random.key(0), (64, 512)) * 0.02},
    "mlp": {"kernel": jax.random.normal(jax.random.key(1), (96, 300)) * 0.02,
            "bias": jnp.zeros((300,))},
    "norm": {"scale": jnp.ones((64,))},
}


def test_nearest_rounding_error_is_at_most_half_a_step():
  w = PARAMS["attn"]["kernel"]
  q = wq.quantize_weight(w, group_size=128)
  assert q.codes.dtype == jnp.int8 and q.codes.shape == w.shape
  assert q.scale.dtype == jnp.float32 and q.scale.shape == (64, 4)
  groups = np.asarray(w).reshape(64, 4, 128)
  # XLA divides by the constant 127 as a product with its reciprocal: 1 ulp.
  np.testing.assert_allclose(q.scale, np.abs(groups).max(-1) / 127,
                             rtol=1.2e-7, atol=0)
  assert int(jnp.abs(q.codes.astype(jnp.int32)).max()) == 127
  err = np.abs(np.asarray(wq.dequantize_weight(q)) - np.asarray(w))
  step = np.repeat(np.asarray(q.scale), 128, axis=1)
  assert (err <= step / 2 * (1 + 1e-6)).all()


def test_group_size_that_does_not_divide_gives_one_scale_per_row():
  q = wq.quantize_weight(PARAMS["mlp"]["kernel"], group_size=256)
  assert q.scale.shape == (96, 1)
  np.testing.assert_allclose(
      q.scale[:, 0], np.abs(PARAMS["mlp"]["kernel"]).max(-1) / 127,
      rtol=1.2e-7, atol=0)
  assert wq.quantize_weight(PARAMS["mlp"]["kernel"],
                            group_size=None).scale.shape == (96, 1)


def test_zero_groups_and_bfloat16():
  w = jnp.zeros((4, 256), jnp.bfloat16).at[1, :3].set(
      jnp.array([127., -64, 3], jnp.bfloat16))
  q = wq.quantize_weight(w, group_size=128)
  out = wq.dequantize_weight(q, jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, w)  # scale 1: every value is a code
  assert not np.asarray(q.codes[0]).any() and (q.scale[0] == 0).all()


def test_bad_input_is_rejected():
  with pytest.raises(ValueError, match="group_size"):
    wq.quantize_weight(PARAMS["attn"]["kernel"], group_size=0)
  with pytest.raises(ValueError, match="scalar"):
    wq.quantize_weight(jnp.float32(1.0))
  with pytest.raises(ValueError, match="matches no parameter"):
    wq.quantize_params(PARAMS, ["nothing_like_this"])
  q = wq.quantize_weight(PARAMS["attn"]["kernel"])
  with pytest.raises(ValueError, match="does not match"):
    wq.apply_update(q, jnp.zeros((64, 256)))


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
  w = PARAMS["attn"]["kernel"]
  nearest = wq.quantize_weight(w, group_size=128)
  step = np.repeat(np.asarray(nearest.scale), 128, axis=1)
  draws = jax.vmap(lambda k: wq.dequantize_weight(
      wq.quantize_weight(w, group_size=128, key=k)))(
          jax.random.split(jax.random.key(5), 400))
  t = np.asarray(w) / step
  codes = np.asarray(draws) / step
  assert np.all((np.abs(codes - np.floor(t)) < 1e-3) |
                (np.abs(codes - np.ceil(t)) < 1e-3))
  # The mean of 400 draws has standard error <= step / (2 sqrt(400)); the
  # bias of round-to-nearest is up to step / 2.
  bias = np.abs(np.asarray(draws).mean(0) - np.asarray(w)) / step
  assert bias.mean() < 0.02 and bias.max() < 0.15
  nearest_bias = np.abs(np.asarray(wq.dequantize_weight(nearest)) -
                        np.asarray(w)) / step
  assert nearest_bias.mean() > 0.2


def test_zero_update_keeps_codes_and_scales_bit_for_bit():
  q = wq.quantize_weight(PARAMS["attn"]["kernel"], group_size=128)
  update = jnp.zeros((64, 512)).at[3, 130].set(1e-3)  # touches group (3, 1)
  for key in (None, jax.random.key(0)):
    new = wq.apply_update(q, update, key=key)
    untouched = np.ones((64, 4), bool)
    untouched[3, 1] = False
    np.testing.assert_array_equal(np.asarray(new.scale)[untouched],
                                  np.asarray(q.scale)[untouched])
    same = np.asarray(new.codes) == np.asarray(q.codes)
    assert same.reshape(64, 4, 128)[untouched].all()


def test_row_blocked_update_gives_the_same_bits():
  """``block_elements`` re-quantises blocks of rows in a loop (noise is
  drawn per row): the same codes and scales as all at once, also for a
  block of rows of a larger weight (``row_offset``)."""
  q = wq.quantize_weight(PARAMS["mlp"]["kernel"], group_size=100)  # (96, 300)
  update = jax.random.normal(jax.random.key(3), q.codes.shape) * 1e-3
  for key in (None, jax.random.key(4)):
    # Both compiled (eager and compiled arithmetic may round differently).
    apply = jax.jit(lambda q, u, b, key=key: wq.apply_update(
        q, u, key=key, row_offset=5, block_elements=b), static_argnums=2)
    whole = apply(q, update, None)
    for block_elements in (300, 7 * 300, 32 * 300):  # 96, 16, 3 blocks
      blocked = apply(q, update, block_elements)
      np.testing.assert_array_equal(blocked.codes, whole.codes)
      np.testing.assert_array_equal(blocked.scale, whole.scale)
  assert wq._row_blocks(96, 300, 7 * 300) == 16  # 6 rows per block
  assert wq._row_blocks(96, 300, 299) == 1  # one row is already larger
  assert wq._row_blocks(96, 300, None) == 1


def test_small_updates_survive_stochastic_rounding_not_nearest():
  """100 updates of 0.1 quantisation steps: nearest rounding loses them all."""
  w = PARAMS["attn"]["kernel"]
  q0 = wq.quantize_weight(w, group_size=128)
  step = jnp.repeat(q0.scale, 128, axis=1)
  # Keep every group's maximum still so that the steps stay put.
  fixed = jnp.abs(w) == jnp.repeat(
      jnp.abs(w).reshape(64, 4, 128).max(-1), 128, axis=1)
  update = jnp.where(fixed, 0.0, 0.1 * step)

  def run(key):
    def body(i, q):
      k = None if key is None else jax.random.fold_in(key, i)
      return wq.apply_update(q, update, key=k)
    return jax.lax.fori_loop(0, 100, body, q0)

  target = wq.dequantize_weight(q0) + 100 * update
  moved = update != 0
  # Stochastic rounding: each step moves a weight by a whole step with
  # probability 0.1, so after 100 updates the mean drift is 10 steps (each
  # weight's own error has a standard deviation of 3 steps).
  drift = (wq.dequantize_weight(run(jax.random.key(1))) - target) / step
  assert abs(float(drift[moved].mean())) < 0.1
  assert 2.0 < float(jnp.abs(drift[moved]).mean()) < 3.0
  # Round to nearest: every update is rounded away; 10 steps lost.
  nearest = run(None)
  np.testing.assert_array_equal(nearest.codes, q0.codes)
  lost = wq.dequantize_weight(nearest)
  assert float(((lost - target) / step)[moved].mean()) < -9.9


def test_params_helpers_select_like_galore_targets():
  q = wq.quantize_params(PARAMS, ["attn", "mlp"], group_size=128)
  assert wq.is_quantized(q["attn"]["kernel"])
  assert wq.is_quantized(q["mlp"]["kernel"])
  assert q["mlp"]["bias"] is PARAMS["mlp"]["bias"]
  assert q["norm"]["scale"] is PARAMS["norm"]["scale"]
  small = wq.quantize_params(PARAMS, "all-linear", min_size=30_000)
  assert wq.is_quantized(small["attn"]["kernel"])  # 32768 values
  assert not wq.is_quantized(small["mlp"]["kernel"])  # 28800 values
  deq = wq.dequantize_params(q, jnp.bfloat16)
  assert jax.tree.structure(deq) == jax.tree.structure(PARAMS)
  assert deq["attn"]["kernel"].dtype == jnp.bfloat16
  assert deq["norm"]["scale"].dtype == jnp.float32


def test_apply_updates_matches_optax_on_float_leaves_and_keys_per_leaf():
  q = wq.quantize_params(PARAMS, ["attn", "mlp"])
  updates = jax.tree.map(lambda p: jnp.full(p.shape, 1e-3, p.dtype), PARAMS)
  new = wq.apply_updates(q, updates, key=jax.random.key(0))
  want = optax.apply_updates(PARAMS, updates)
  np.testing.assert_array_equal(new["norm"]["scale"], want["norm"]["scale"])
  np.testing.assert_array_equal(new["mlp"]["bias"], want["mlp"]["bias"])
  again = wq.apply_updates(q, updates, key=jax.random.key(0))
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  other = wq.apply_updates(q, updates, key=jax.random.key(1))
  assert (other["attn"]["kernel"].codes != new["attn"]["kernel"].codes).any()
  # Each leaf draws its own bits: the first leaf's key is fold_in(key, 0).
  first = wq.apply_update(q["attn"]["kernel"], updates["attn"]["kernel"],
                          key=jax.random.fold_in(jax.random.key(0), 0))
  np.testing.assert_array_equal(first.codes, new["attn"]["kernel"].codes)


def _train(tx, qparams, state, start, stop, base_key):
  def loss(p, t):
    x = jax.random.normal(jax.random.fold_in(jax.random.key(9), t), (8, 64))
    h = x @ p["attn"]["kernel"]
    return jnp.mean((h[:, :96] @ p["mlp"]["kernel"] + p["mlp"]["bias"]) ** 2)

  traces = []

  def step(q, s, t):
    traces.append(1)
    p = wq.dequantize_params(q)
    grads = jax.grad(loss)(p, t)
    updates, s = tx.update(grads, s, p)
    return wq.apply_updates(q, updates,
                            key=jax.random.fold_in(base_key, t)), s

  step = jax.jit(step, donate_argnums=(0, 1))
  for t in range(start, stop):
    qparams, state = step(qparams, state, jnp.int32(t))
  return qparams, state, len(traces)


def test_galore_adamw_8bit_trains_int8_weights_exactly_resumably(tmp_path):
  tx = galore_optax.galore_adamw_8bit(1e-2, rank=8, update_proj_gap=3,
                                      target_modules=["attn", "mlp"],
                                      min_size=256)
  fresh = lambda: wq.quantize_params(jax.tree.map(jnp.copy, PARAMS),
                                     ["attn", "mlp"], group_size=128)
  key = jax.random.key(42)
  q = fresh()
  full, _, traces = _train(tx, q, tx.init(wq.dequantize_params(q)), 0, 6, key)
  assert traces == 1  # one trace for six steps
  assert (full["attn"]["kernel"].codes != fresh()["attn"]["kernel"].codes).any()

  q = fresh()
  q, state, _ = _train(tx, q, tx.init(wq.dequantize_params(q)), 0, 3, key)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"params": q, "opt_state": state})
  checkpointer.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          {"params": q, "opt_state": state})
  restored = checkpointer.restore(tmp_path / "ckpt", abstract)
  assert isinstance(restored["params"]["attn"]["kernel"], wq.QuantizedWeight)
  resumed, _, _ = _train(tx, restored["params"], restored["opt_state"], 3, 6,
                         key)
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
