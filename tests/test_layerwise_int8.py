"""int8 weights and ``layerwise.dense`` in the per-layer step.

A toy with an embedding, three layers and a head whose matrices are stored
as ``weight_quantization.QuantizedWeight`` (or float): ``call_layer``,
``dense`` and ``embedding_lookup`` against the ordinary step with
``weight_quantization.apply_updates``; and kernels updated one at a time
inside a layer's backward pass.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_optax as go
from galore_optax import layerwise as lw
from galore_optax import weight_quantization as wq

from _layerwise_common import LR  # pylint: disable=g-bad-import-order
from _layerwise_common import assert_close
from _layerwise_common import ordinary_step
from _layerwise_common import run

_NV, _ND = 64, 32  # vocabulary, width of the int8 toy


_TOY_INT8 = ["embed", "attn", "mix", "mlp", "head"]


def _toy_params():
  k = jax.random.split(jax.random.key(7), 5)
  return {"embed": jax.random.normal(k[0], (_NV, _ND)) * 0.3,
          "attn": {"w": jax.random.normal(k[1], (_ND, _ND)) * 0.3,
                   "v": jax.random.normal(k[4], (_ND, _ND)) * 0.3,
                   "b": jnp.full((_ND,), 0.1, jnp.float32)},
          "mix": {"w": jax.random.normal(k[4], (_ND, _ND)) * 0.2},
          "mlp": {"w": jax.random.normal(k[2], (_ND, _ND)) * 0.3},
          "head": jax.random.normal(k[3], (_ND, _NV)) * 0.3}


def _toy_attn(x, p, scale):
  # Kernels through lw.dense (updated inside the layer's backward pass),
  # the bias used directly; ``scale`` is passed as an argument.
  h = jnp.tanh(lw.dense(x, p["w"]) + p["b"]) * scale
  return x + lw.dense(h, p["v"])


def _toy_loss(params, ids, layerwise_calls=True):
  """Embedding, three layers, head. ``attn`` multiplies its kernels through
  ``dense``, ``mix`` uses its kernel directly inside ``call_layer`` and
  ``mlp`` directly without it (an int8 leaf then goes through the plain
  hook)."""
  scale = jnp.linspace(0.5, 1.5, _ND)
  mix = lambda x, p: x + jnp.tanh(x @ p["w"])
  if layerwise_calls:
    x = lw.embedding_lookup(params["embed"], ids)
    x = lw.call_layer(_toy_attn, x, params["attn"], scale)
    x = lw.call_layer(mix, x, params["mix"])
  else:
    x = _toy_attn(params["embed"][ids], params["attn"], scale)
    x = mix(x, params["mix"])
  x = jnp.tanh(x @ params["mlp"]["w"])
  logits = (lw.dense(x, params["head"]) if layerwise_calls else
            x @ params["head"])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, (ids + 1) % _NV).mean()


_TOY_BATCHES = [jnp.asarray(np.random.default_rng(i).integers(0, _NV, (4, 8)))
                for i in range(3)]


def _assert_int8_close(params, ref):
  for a, b in zip(jax.tree.leaves(params, is_leaf=wq.is_quantized),
                  jax.tree.leaves(ref, is_leaf=wq.is_quantized)):
    if wq.is_quantized(a):
      assert a.codes.dtype == jnp.int8 and a.scale.dtype == jnp.float32
      # Float32 rounding of the update may move a code at a rounding tie.
      assert np.mean(np.asarray(a.codes) != np.asarray(b.codes)) < 1e-3
      np.testing.assert_allclose(a.scale, b.scale, rtol=1e-6)
    else:
      # The optimizer's moments are 8-bit here (see assert_close).
      assert_close(a, b, eight_bit=True)


@pytest.mark.parametrize("weights, optimizer", [
    ("float", "galore_adamw_8bit"), ("int8", "galore_adamw_8bit"),
    ("int8", "apollo_mini_8bit")])
def test_int8_weights_and_dense_match_the_ordinary_step(weights, optimizer):
  """call_layer, dense and embedding_lookup on int8 (and float) leaves,
  the head and embedding updated in row blocks: the same parameters as the
  ordinary step with weight_quantization.apply_updates and the same keys
  (rounding noise is drawn per row, so row blocks draw the same bits)."""
  if optimizer == "apollo_mini_8bit":
    tx = go.apollo_mini(LR, update_proj_gap=2, target_modules=["attn", "mlp"],
                        state_8bit=True, min_size=64)
  else:
    tx = go.galore_adamw_8bit(LR, rank=4, update_proj_gap=2,
                              target_modules=["attn", "mlp"], min_size=64)
  params = _toy_params()
  if weights == "int8":
    params = wq.quantize_params(params, _TOY_INT8,
                                group_size=16, min_size=64)
    assert wq.is_quantized(params["head"]) and not wq.is_quantized(
        params["attn"]["b"])
  base = jax.random.key(11)

  @jax.jit
  def ordinary(stored, state, ids, key):
    values = wq.dequantize_params(stored)
    loss, g = jax.value_and_grad(
        lambda p: _toy_loss(p, ids, layerwise_calls=False))(values)
    u, state = tx.update(g, state, values)
    return wq.apply_updates(stored, u, key=key), state, loss

  init, step = lw.make_layerwise_step(
      _toy_loss, tx, row_chunks={"head": 4, "embed": 2}, donate=False)
  ref = params
  ref_state = jax.jit(lambda p: tx.init(wq.dequantize_params(p)))(params)
  state = init(params)
  for n, ids in enumerate(_TOY_BATCHES):
    key = jax.random.fold_in(base, n)
    ref, ref_state, ref_loss = ordinary(ref, ref_state, ids, key)
    params, state, loss = step(params, state, ids, key)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  _assert_int8_close(params, ref)
  moved = wq.dequantize_params(params)["head"] - wq.dequantize_params(
      _toy_params() if weights == "float" else
      wq.quantize_params(_toy_params(), _TOY_INT8,
                         group_size=16, min_size=64))["head"]
  assert np.abs(moved).max() > 0.5 * LR  # the weights did move


def test_int8_steps_trace_once_and_nearest_rounding_without_key():
  traces = []

  def loss(p, ids):
    traces.append(1)
    return _toy_loss(p, ids)

  tx = go.adamw_8bit(LR, min_size=64, block_size=64)
  stored = wq.quantize_params(_toy_params(), _TOY_INT8,
                              group_size=16, min_size=64)
  init, step = lw.make_layerwise_step(loss, tx)
  params = jax.tree.map(jnp.copy, stored)
  state = init(params)
  codes = params["mlp"]["w"].codes
  for n, ids in enumerate(_TOY_BATCHES):
    params, state, _ = step(params, state, ids, jax.random.fold_in(
        jax.random.key(0), n))
  assert len(traces) == 1 and codes.is_deleted()
  # Without a key: round to nearest, as weight_quantization.apply_updates.
  init, step = lw.make_layerwise_step(_toy_loss, tx, donate=False)
  values = wq.dequantize_params(stored)
  g = jax.grad(lambda p: _toy_loss(p, _TOY_BATCHES[0], False))(values)
  u, _ = tx.update(g, tx.init(values), values)
  expected = wq.apply_updates(stored, u)
  new, _, _ = step(stored, init(stored), _TOY_BATCHES[0])
  _assert_int8_close(new, expected)


def test_int8_and_dense_errors():
  stored = wq.quantize_params(_toy_params(), _TOY_INT8,
                              group_size=16, min_size=64)
  tx = optax.sgd(0.1)

  def tied(p, ids):  # the head kernel also used outside dense
    return _toy_loss(p, ids) + jnp.sum(p["head"])

  init, step = lw.make_layerwise_step(tied, tx, jit=False)
  with pytest.raises(ValueError, match="also elsewhere"):
    jax.eval_shape(step, stored, jax.eval_shape(init, stored),
                   _TOY_BATCHES[0])

  def twice(p, ids):  # two dense calls on one kernel
    x = jnp.ones((2, _ND))
    return jnp.sum(lw.dense(x, p["head"])) + jnp.sum(lw.dense(x, p["head"]))

  init, step = lw.make_layerwise_step(twice, tx, jit=False)
  params = _toy_params()
  with pytest.raises(ValueError, match="more than one"):
    jax.eval_shape(step, params, jax.eval_shape(init, params),
                   _TOY_BATCHES[0])
  x = jnp.ones((2, _ND))
  in_layer = {  # misuses of a kernel inside call_layer
      "also used otherwise": lambda h, p: lw.dense(h, p["w"]) + h @ p["w"],
      "more than one layerwise.dense": lambda h, p: lw.dense(
          lw.dense(h, p["w"]), p["w"]),
  }
  for message, layer in in_layer.items():
    loss = lambda p, ids, layer=layer: jnp.sum(lw.call_layer(layer, x, p))
    init, step = lw.make_layerwise_step(loss, tx, jit=False)
    p = {"w": jnp.eye(_ND)}
    with pytest.raises(ValueError, match=message):
      jax.eval_shape(step, p, jax.eval_shape(init, p), _TOY_BATCHES[0])
  with pytest.raises(ValueError, match="floating dtype"):
    lw.make_layerwise_step(_toy_loss, tx, weight_dtype=jnp.int8)
  with pytest.raises(ValueError, match="2-D kernel"):
    lw.dense(jnp.ones((2, 3)), jnp.ones((3,)))
  stacked = {"blocks": wq.quantize_weight(jnp.ones((2, 8, 16)))}
  with pytest.raises(ValueError, match="stored in int8"):
    lw.make_layerwise_step(lambda p, b: 0.0, tx,
                           per_layer=["blocks"]).init(stacked)


def _three_kernel_layer(h, p, use_dense):
  matmul = lw.dense if use_dense else (lambda a, w: a @ w)
  for name in ("w0", "w1", "w2"):
    h = jnp.tanh(matmul(h, p[name]))
  return h


def test_dense_in_call_layer_makes_one_weight_gradient_at_a_time():
  """Kernels multiplied through ``dense`` inside ``call_layer`` are updated
  in the product's backward rule, each before the next product's gradient
  is made: XLA's peak temporary memory holds about one weight gradient
  instead of the layer's three (and the step is the ordinary one)."""
  n = 512
  k = jax.random.split(jax.random.key(3), 4)
  params = {f"w{i}": jax.random.normal(k[i], (n, n)) * 0.05 for i in range(3)}
  x = jax.random.normal(k[3], (4, n))
  tx = optax.adam(LR)
  temps = {}
  for use_dense in (False, True):
    layer = functools.partial(_three_kernel_layer, use_dense=use_dense)
    loss = lambda p, b, layer=layer: jnp.mean(lw.call_layer(layer, b, p)**2)
    init, step = lw.make_layerwise_step(loss, tx, jit=False)
    state = jax.eval_shape(init, params)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, state, x).compile()
    temps[use_dense] = compiled.memory_analysis().temp_size_in_bytes
  weight = n * n * 4
  assert temps[False] > 2.5 * weight, temps
  assert temps[True] < 1.5 * weight, temps

  # SGD: Adam's first steps divide by |g|, so where a gradient is near
  # eps float32 rounding is amplified past any useful tolerance.
  tx = optax.sgd(1.0)
  layer = functools.partial(_three_kernel_layer, use_dense=True)
  loss = lambda p, b: jnp.mean(lw.call_layer(layer, b, p, remat=True)**2)
  ref, _, ref_losses = run(ordinary_step(loss, tx), params, tx.init(params),
                           [x, 2 * x])
  init, step = lw.make_layerwise_step(loss, tx)
  new, _, losses = run(step, params, init(params), [x, 2 * x])
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  assert_close(new, ref)


def test_dense_under_inner_transformations_of_a_layer_is_correct():
  """``dense`` inside ``jax.checkpoint`` or a ``lax.scan`` body within a
  layer cannot update its kernel in place (the kernel is closed over or
  re-traced there): it is a plain product, and the kernel's gradient goes
  to its update at the layer's end. The step is still the ordinary one."""
  n = 64
  k = jax.random.split(jax.random.key(5), 4)
  params = {f"w{i}": jax.random.normal(k[i], (n, n)) * 0.2 for i in range(3)}
  x = jax.random.normal(k[3], (4, n))
  layer = functools.partial(_three_kernel_layer, use_dense=True)
  wrapped = {
      "checkpoint": jax.checkpoint(layer),
      "scan": lambda h, p: jax.lax.scan(
          lambda c, _: (layer(c, p), None), h, None, length=2)[0],
  }
  tx = optax.sgd(1.0)
  for f in wrapped.values():
    loss = lambda p, b, f=f: jnp.mean(lw.call_layer(f, b, p)**2)
    ref, _, ref_losses = run(ordinary_step(loss, tx), params,
                             tx.init(params), [x, 2 * x])
    init, step = lw.make_layerwise_step(loss, tx, donate=False)
    new, _, losses = run(step, params, init(params), [x, 2 * x])
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    assert_close(new, ref)
