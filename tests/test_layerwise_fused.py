"""Fused low-rank kernel gradients in the per-layer step (``fused=True``).

Between refreshes, ``layerwise.dense`` hands ``galore_project`` the
projection of a kernel's gradient made from the product's inputs
(``gradient_supply``) instead of the ``m x n`` gradient. The toy: an
embedding, two layers whose wide (16 x 40) and tall (40 x 16) kernels go
through ``dense`` inside ``call_layer`` (or, stacked, inside
``scan_layers``), a head through ``dense`` outside any layer; refreshes at
updates 0, 2, 4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_optax as go
from galore_optax import gradient_supply
from galore_optax import layerwise as lw
from galore_optax import projection
from galore_optax import weight_quantization as wq

from _layerwise_common import FAST  # pylint: disable=g-bad-import-order
from _layerwise_common import LR
from _layerwise_common import assert_close
from _layerwise_common import run

V, D, F, GAP = 32, 16, 40, 2
_rng = np.random.default_rng(3)
BATCHES = [jnp.asarray(_rng.integers(0, V, (4, 8))) for _ in range(5)]


def _params():
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(0, 0.3, shape), jnp.float32)
  return {"embed": normal(V, D),
          "layers": [{"up": normal(D, F), "down": normal(F, D),
                      "norm": jnp.ones((D,), jnp.float32)} for _ in range(2)],
          "head": normal(D, V)}


def _layer(x, p):
  h = jax.nn.gelu(lw.dense(x * p["norm"], p["up"]))
  return x + lw.dense(h, p["down"])


def _loss(params, ids):
  x = lw.embedding_lookup(params["embed"], ids)
  for p in params["layers"]:
    x = lw.call_layer(_layer, x, p)
  logits = lw.dense(x, params["head"])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, (ids + 1) % V).mean()


def _stacked(params):
  """The same weights, the layers stacked for ``scan_layers``."""
  return dict(params, layers=jax.tree.map(lambda *x: jnp.stack(x),
                                          *params["layers"]))


def _scanned_layer(x, p, scale):
  # ``scale`` comes in as an argument of every layer (as a rotary table
  # would), so ``dense`` inside finds the layer's kernels.
  return _layer(x * scale, p)


def _scanned_loss(params, ids):
  x = lw.embedding_lookup(params["embed"], ids)
  x = lw.scan_layers(_scanned_layer, x, params["layers"], jnp.float32(1.0))
  logits = lw.dense(x, params["head"])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, (ids + 1) % V).mean()


# (loss, parameters, make_layerwise_step options) of each model layout.
MODELS = {"unrolled": (_loss, lambda p: p, {}),
          "scanned": (_scanned_loss, _stacked, {"per_layer": ["layers"]})}


def _galore(proj_type="std", **kw):
  return go.galore_adamw(LR, rank=4, update_proj_gap=GAP, eps=1e-6,
                         weight_decay=0.1, proj_type=proj_type,
                         target_modules=["up", "down", "head"], **kw)


def _steps(tx, params, batches=BATCHES, loss=_loss, **kw):
  results = []
  for fused in (False, True):
    init, step = lw.make_layerwise_step(loss, tx, fused=fused, donate=False,
                                        **kw)
    results.append(run(step, params, jax.jit(init)(params), batches))
  return results


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("proj_type",
                         ["std", "reverse_std", "left", "right", "full"])
def test_fused_updates_equal_unfused_across_refreshes(proj_type, model):
  loss, layout, kw = MODELS[model]
  (p0, s0, l0), (p1, s1, l1) = _steps(_galore(proj_type), layout(_params()),
                                      loss=loss, **kw)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  assert_close(p0, p1)
  _assert_states_close(s0, s1)


def test_scanned_fused_step_equals_the_unrolled_one():
  """The stacked layers' fused updates are the unrolled layers' (the scan
  changes where the updates run, not what they are)."""
  (p0, s0, l0), = _steps(_galore("std"), _params())[1:]
  loss, layout, kw = MODELS["scanned"]
  (p1, s1, l1), = _steps(_galore("std"), layout(_params()), loss=loss,
                         **kw)[1:]
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  assert_close(layout(p0), p1)
  _assert_states_close(
      [s0.leaves["head"], s0.leaves["embed"]],
      [s1.leaves["head"], s1.leaves["embed"]])


def _assert_states_close(a, b):
  """Moments and projectors: the refreshes decompose gradients that differ
  by float32 rounding (a different order of the same sums), and singular
  vectors scale such differences by the inverse gap between singular
  values: 1e-5 instead of the parameters' 1e-6."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float32),
                               np.asarray(y, np.float32), rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["8bit_lazy", "randomized_accumulate",
                                     "int8_weights"])
def test_fused_with_8bit_states_lazy_accumulation_and_int8_weights(variant):
  params, kw = _params(), {}
  if variant == "8bit_lazy":
    tx = go.galore_adamw_8bit(LR, rank=4, update_proj_gap=1, eps=1e-6,
                              target_modules=["up", "down", "head"],
                              min_size=64, refresh_schedule="lazy",
                              lazy_queue_size=1, lazy_threshold=-1.0)
  elif variant == "randomized_accumulate":
    tx = _galore(projector_method="randomized")
    kw = {"accumulate_steps": 2}
  else:
    tx = _galore("reverse_std")
    params = dict(params, layers=[
        dict(p, up=wq.quantize_weight(p["up"])) for p in params["layers"]])
    kw = {"weight_dtype": jnp.float32}
  (p0, s0, l0), (p1, s1, l1) = _steps(tx, params, **kw)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  if variant == "randomized_accumulate":
    # The unfused step hands the optimizer the back-projected mean, which
    # it projects again (P^T P acc, acc to float32 rounding); the fused one
    # hands it acc itself: one more rounding apart.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-6),
                 p0, p1)
  else:
    assert_close(p0, p1, eight_bit=variant == "8bit_lazy")
  if variant != "8bit_lazy":
    _assert_states_close(s0, s1)


def test_fused_clipping_clips_the_lowrank_gradient_by_its_own_norm():
  """A refresh step clips the full gradient (as unfused); between
  refreshes the low-rank gradient is clipped by its own norm."""
  w = jnp.asarray(np.random.default_rng(1).normal(size=(12, 20)), jnp.float32)
  xs = [jnp.asarray(np.random.default_rng(i).normal(size=(6, 12)),
                    jnp.float32) for i in range(3)]
  loss = lambda p, x: jnp.sum(lw.dense(x, p["w"]) ** 2)
  tx = go.galore_adamw(LR, rank=3, update_proj_gap=3, target_modules=None)
  c = 0.5
  init, step = lw.make_layerwise_step(loss, tx, clip_norm=c, fused=True,
                                      donate=False)
  params, state = {"w": w}, init({"w": w})
  ref_params, ref_state = {"w": w}, tx.init({"w": w})
  for t, x in enumerate(xs):
    params, state, _ = step(params, state, x)
    g = jax.grad(lambda p: jnp.sum((x @ p["w"]) ** 2))(ref_params)["w"]
    if t == 0:  # refresh: clipped by the full gradient's norm
      factor = jnp.minimum(1.0, c / jnp.linalg.norm(g))
    else:
      (gs,) = [s for s in jax.tree.leaves(
          ref_state, is_leaf=lambda s: isinstance(s, go.GaLoreState))
               if isinstance(s, go.GaLoreState)]
      plan = projection.plan_leaf((12, 20), 3, "std")
      low = projection.project(g, gs.projectors["w"], plan)
      factor = jnp.minimum(1.0, c / jnp.linalg.norm(low))
    u, ref_state = tx.update({"w": g * factor}, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, u)
    np.testing.assert_allclose(params["w"], ref_params["w"], rtol=0,
                               atol=1e-6)


def _weight_gradient_products(jaxpr, shape, in_cond=False):
  """``(inside a cond branch?)`` for every product of the jaxpr (and its
  sub-jaxprs) that contracts token axes into a ``shape`` result."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      out = eqn.outvars[0].aval.shape
      if tuple(out) == shape and 0 in contract:
        found.append(in_cond)
    for sub in _subjaxprs(eqn.params):
      found += _weight_gradient_products(
          sub, shape, in_cond or eqn.primitive.name == "cond")
  return found


def _subjaxprs(params):
  """The jaxprs among an equation's parameters (cond branches, loop and
  custom-rule bodies)."""
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else [value]:
      if hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
        yield v.jaxpr
      elif hasattr(v, "eqns"):
        yield v


@pytest.mark.parametrize("model", sorted(MODELS))
def test_between_refreshes_no_full_weight_gradient_is_made(model):
  """Fused: a projected kernel's ``x^T dy`` exists only in the refresh
  branch of a ``cond``; unfused, it is made on every step."""
  loss, layout, kw = MODELS[model]
  params = layout(_params())
  for shape in ((D, F), (F, D)):  # the "up" and "down" kernels
    for fused, expected in ((False, {False}), (True, {True})):
      init, step = lw.make_layerwise_step(loss, _galore(), fused=fused,
                                          jit=False, **kw)
      jaxpr = jax.make_jaxpr(step)(params, init(params), BATCHES[0]).jaxpr
      assert set(_weight_gradient_products(jaxpr, shape)) == expected


def test_a_transformation_before_galore_project_refuses_fusion():
  tx = optax.chain(optax.scale(0.5), _galore())
  init, step = lw.make_layerwise_step(_loss, tx, fused=True)
  params = _params()
  with pytest.raises(ValueError, match="did not reach its galore_project"):
    step(params, init(params), BATCHES[0])


def test_supply_outside_the_per_layer_step():
  """``galore_project`` takes a supply in an ordinary update too, and the
  supplied low-rank gradient equals the projection of the full one."""
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, 12)),
                  jnp.float32)
  dy = jnp.asarray(np.random.default_rng(5).normal(size=(2, 5, 20)),
                   jnp.float32)
  g = x.reshape(-1, 12).T @ dy.reshape(-1, 20)
  for proj_type in ("std", "reverse_std", "full"):
    plan = projection.plan_leaf((12, 20), 4, proj_type)
    p = projection.compute_projector(g, plan)
    np.testing.assert_allclose(
        gradient_supply.project_product(x, dy, p, plan),
        projection.project(g, p, plan), rtol=1e-5, atol=1e-5)
