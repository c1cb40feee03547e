"""The per-layer step without whole-layer recomputation.

With ``recompute=False`` ``call_layer`` layers keep their forward pass's
residuals for their backward pass, as an ordinary backward pass does,
instead of recomputing the layer; with a ``jax.checkpoint`` policy they keep
what the policy saves and recompute the rest. The updates are the same, and
the step's jaxpr has one forward product per kernel instead of two when the
products are kept. The toy model is test_layerwise_fused's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import galore_optax as go
from examples import llama
from galore_optax import layerwise as lw
from galore_optax import weight_quantization as wq

from _layerwise_common import LR  # pylint: disable=g-bad-import-order
from _layerwise_common import assert_close
from _layerwise_common import run
from test_layerwise_fused import BATCHES
from test_layerwise_fused import D
from test_layerwise_fused import F
from test_layerwise_fused import MODELS
from test_layerwise_fused import _assert_states_close
from test_layerwise_fused import _galore
from test_layerwise_fused import _loss
from test_layerwise_fused import _params


KEPT = {"all": False, "products": lw.KEEP_DENSE_OUTPUTS,
        "nothing": jax.checkpoint_policies.nothing_saveable}


def _runs(tx, params, loss=_loss, **kw):
  """``(params, states, losses)`` recomputing, keeping every residual and
  keeping the products."""
  results = []
  for recompute in (True, KEPT["all"], KEPT["products"]):
    init, step = lw.make_layerwise_step(loss, tx, recompute=recompute,
                                        donate=False, **kw)
    results.append(run(step, params, jax.jit(init)(params), BATCHES))
  return results


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("optimizer", ["galore_adamw", "adamw", "8bit"])
def test_kept_residuals_give_the_recomputed_updates(optimizer, fused):
  # The packed states (step counts, 8-bit codes bit-cast to floats) are
  # residuals too: under a policy they must come through bit for bit.
  tx = {"galore_adamw": _galore(),
        "adamw": go.galore_adamw(LR, rank=4, target_modules=None,
                                 weight_decay=0.1),
        "8bit": go.galore_adamw_8bit(LR, rank=4, update_proj_gap=2,
                                     target_modules=["up", "down", "head"],
                                     min_size=64)}[optimizer]
  (p0, s0, l0), *kept = _runs(tx, _params(), fused=fused)
  for p1, s1, l1 in kept:
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    assert_close(p0, p1, eight_bit=optimizer == "8bit")
    if optimizer != "8bit":
      _assert_states_close(s0, s1)


def test_kept_residuals_with_int8_weights_and_clipping():
  params = _params()
  params = dict(params, layers=[dict(p, up=wq.quantize_weight(p["up"]))
                                for p in params["layers"]])
  (p0, s0, l0), *kept = _runs(_galore("reverse_std"), params, clip_norm=0.5,
                              fused=True)
  for p1, s1, l1 in kept:
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    assert_close(p0, p1)
    _assert_states_close(s0, s1)


def test_scanned_layers_are_recomputed_either_way():
  loss, layout, kw = MODELS["scanned"]
  (p0, _, l0), *kept = _runs(_galore(), layout(_params()), loss=loss, **kw)
  for p1, _, l1 in kept:
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    assert_close(p0, p1)


@pytest.mark.parametrize("recompute,kept", [
    (True, None), (False, "all"), (KEPT["products"], "products"),
    (KEPT["nothing"], "nothing")], ids=["True", "False", "products",
                                        "nothing"])
def test_recomputation_doubles_the_layers_forward_products(recompute, kept):
  params = _params()
  init, step = lw.make_layerwise_step(_loss, _galore(), recompute=recompute,
                                      donate=False)
  text = step.lower(params, init(params), BATCHES[0]).as_text()
  # The layers' "up" products (batch 4, 8 tokens): once per layer, and once
  # more per layer when recomputed.
  up = (f"(tensor<4x8x{D}xf32>, tensor<{D}x{F}xf32>) -> "
        f"tensor<4x8x{F}xf32>")
  forward = [line for line in text.splitlines()
             if "dot_general" in line and up in line]
  assert len(forward) == (2 if kept in ("all", "products") else 4)


@pytest.mark.parametrize("value", ["no", None, 1.0])
def test_recompute_must_be_a_bool_or_a_policy(value):
  with pytest.raises(ValueError, match="recompute must be True, False or a "
                     "jax.checkpoint policy"):
    lw.make_layerwise_step(_loss, _galore(), recompute=value)


def test_a_policy_recomputes_each_layer_only_when_its_gradient_arrives():
  """Temporaries: recomputation's plus the kept products, not all residuals.

  Under a policy the backward pass recomputes from saved residuals, which
  exist from the forward pass on; unless they wait for the layer's output
  gradient, XLA starts every layer's recomputation early and keeps all of
  it live (the example's tiny LLaMA at 8 x 64: as much as keeping every
  residual, 61 MB, against 34 MB).
  """
  config = llama.get_config("tiny")
  graphdef, params = nnx.split(llama.abstract_model(config), nnx.Param)
  batch = {"input_ids": jax.ShapeDtypeStruct((8, 64), jnp.int32),
           "labels": jax.ShapeDtypeStruct((8, 64), jnp.int32)}

  def temps(recompute):
    loss = lambda p, b: llama.loss_fn(nnx.merge(graphdef, p), b)
    step = lw.make_layerwise_step(loss, go.galore_adamw(
        LR, rank=8, target_modules=["attn", "mlp"]), recompute=recompute,
                                  fused=True)
    compiled = step.step.lower(params, jax.eval_shape(step.init, params),
                               batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  heads = config.num_attention_heads + 2 * config.num_key_value_heads
  widths = (heads * config.head_dim + 2 * config.hidden_size
            + 2 * config.intermediate_size)  # q, k, v; o, down; gate, up
  products = config.num_hidden_layers * 8 * 64 * widths * 4
  assert temps(lw.KEEP_DENSE_OUTPUTS) <= temps(True) + products
