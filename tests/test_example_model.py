"""Tests for the example LLaMA model (examples/llama.py).

These tests are compile-bound on a small CPU, so they (1) fill most models
with numpy random weights through ``abstract_model`` instead of running the
initialisers eagerly (every distinct shape costs an XLA compile of the RNG),
(2) reuse one configuration so jitted functions hit the cache, and (3) compile
with XLA's cheapest CPU settings.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax import nnx

from examples import llama

VOCAB = 97

# XLA's cheapest CPU compile settings: compiles several times faster; the
# numerics checked here do not depend on them.
FAST_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def small_config(**overrides):
  """A model that compiles in about a second on CPU."""
  kw = dict(
      vocab_size=VOCAB,
      hidden_size=32,
      intermediate_size=64,
      num_attention_heads=4,
      num_key_value_heads=4,
      num_hidden_layers=2,
      head_dim=8,
      max_position_embeddings=64,
      rms_norm_eps=1e-6,
      tie_word_embeddings=False,
  )
  kw.update(overrides)
  return transformers.LlamaConfig(**kw)


def random_model(config, seed=0, **kwargs):
  """A model with numpy random weights (norm scales near 1)."""
  abstract = llama.abstract_model(config, **kwargs)
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def fill(path, x):
    base = 1.0 if path[-1].key == "scale" else 0.0
    # Cast on the host: a device-side cast would compile per shape.
    value = base + rng.normal(0.0, 0.1, x.shape)
    return jnp.asarray(value.astype(x.dtype))

  pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


@functools.partial(fast_jit, static_argnums=0)
def _forward(graphdef, state, input_ids):
  return nnx.merge(graphdef, state)(input_ids)


def forward(model, input_ids):
  """Jitted logits; the graphdef is a static (hashed) argument."""
  return _forward(*nnx.split(model), input_ids)


@functools.partial(fast_jit, static_argnums=0)
def _loss_and_grads(graphdef, params, batch):
  def loss(p):
    return llama.loss_fn(nnx.merge(graphdef, p), batch)

  return jax.value_and_grad(loss)(params)


def loss_and_grads(model, batch):
  """Jitted (loss, grads) with grads as a plain nested dict."""
  graphdef, params = nnx.split(model)
  loss, grads = _loss_and_grads(graphdef, params, batch)
  return loss, nnx.to_pure_dict(grads)


def random_ids(shape, vocab=VOCAB, seed=0):
  ids = np.random.default_rng(seed).integers(0, vocab, size=shape)
  return jnp.asarray(ids, jnp.int32)


def random_batch():
  return {"input_ids": random_ids((2, 8)), "labels": random_ids((2, 8), seed=1)}


def flat_paths(model_or_state):
  state = model_or_state
  if isinstance(state, nnx.Module):
    state = nnx.state(state, nnx.Param)
  return {".".join(str(k) for k in path): v
          for path, v in nnx.to_flat_state(state)}


def to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


def test_build_model_init_paths_and_shapes():
  # All kernels square (vocab = ffn = d_model) so that the real initialiser
  # compiles its RNG for one shape only.
  config = small_config(vocab_size=32, intermediate_size=32)
  model = llama.build_model(config, rngs=0)
  paths = flat_paths(model)
  expected = {
      "model.embed_tokens.embedding", "model.norm.scale", "lm_head.kernel"}
  for i in range(2):
    p = f"model.layers.{i}."
    expected |= {p + "input_layernorm.scale",
                 p + "post_attention_layernorm.scale"}
    expected |= {p + f"self_attn.{n}_proj.kernel" for n in "qkvo"}
    expected |= {p + f"mlp.{n}_proj.kernel" for n in ("gate", "up", "down")}
  assert set(paths) == expected
  # HF's init: N(0, initializer_range = 0.02) for matrices, ones for norms.
  q = np.asarray(paths["model.layers.0.self_attn.q_proj.kernel"][...])
  assert 0.015 < q.std() < 0.025
  np.testing.assert_array_equal(paths["model.norm.scale"][...], 1.0)
  sizes = [int(np.prod(v.shape)) for v in paths.values()]
  assert llama.param_count(model) == sum(sizes)
  # The graphdef is static under jit and must hash (HF configs do not).
  hash(nnx.graphdef(model))

  scanned = llama.build_model(config, rngs=0, scan_layers=True)
  stack = flat_paths(scanned)["model.layers.self_attn.q_proj.kernel"]
  stack = np.asarray(stack[...])
  assert stack.shape == (2, 32, 32)
  # Each layer of the stack has its own random init.
  assert not np.allclose(stack[0], stack[1])


def test_forward_shapes_and_kernel_layout():
  model = random_model(small_config())
  logits = forward(model, random_ids((2, 8)))
  assert logits.shape == (2, 8, VOCAB) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  paths = flat_paths(model)
  # Kernels are (in_features, out_features).
  assert paths["model.layers.0.mlp.gate_proj.kernel"].shape == (32, 64)
  assert paths["model.layers.0.mlp.down_proj.kernel"].shape == (64, 32)
  assert paths["lm_head.kernel"].shape == (32, VOCAB)
  assert paths["model.embed_tokens.embedding"].shape == (VOCAB, 32)


def test_causal_mask():
  model = random_model(small_config())
  ids = random_ids((2, 8))
  changed = ids.at[:, 5].set((ids[:, 5] + 1) % VOCAB)
  a, b = forward(model, ids), forward(model, changed)
  np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
  assert np.abs(np.asarray(a[:, 5:] - b[:, 5:])).max() > 1e-4


def test_gqa_equals_mha_with_repeated_kv_heads():
  gqa = random_model(small_config(num_key_value_heads=2), seed=1)
  mha = random_model(small_config(), seed=2)
  params = to_numpy(llama.get_params(gqa))
  layers = params["model"]["layers"]
  assert layers[0]["self_attn"]["k_proj"]["kernel"].shape == (32, 16)

  def repeat_heads(kernel):
    # (d, kv * hd) -> (d, heads * hd): query head h uses kv head h // 2.
    d = kernel.shape[0]
    return np.repeat(kernel.reshape(d, 2, 8), 2, axis=1).reshape(d, 32)

  for layer in layers.values():
    for name in ("k_proj", "v_proj"):
      proj = layer["self_attn"][name]
      proj["kernel"] = repeat_heads(proj["kernel"])
  llama.set_params(mha, params)
  ids = random_ids((2, 8))
  np.testing.assert_allclose(forward(gqa, ids), forward(mha, ids), atol=2e-5)


def test_rope_matches_reference_formula():
  head_dim, theta = 8, 500.0
  x = np.random.default_rng(0).normal(size=(1, 5, 2, head_dim))
  x = x.astype(np.float32)
  positions = np.array([[0, 1, 2, 7, 30]])

  @fast_jit
  def rope(x, pos):
    return llama.apply_rope(x, *llama.rope_cos_sin(pos, head_dim, theta))

  got = np.asarray(rope(jnp.asarray(x), jnp.asarray(positions)))

  # Features i and i + head_dim / 2 rotate together, as one complex number,
  # by the angle pos * theta ** (-2 i / head_dim).
  half = head_dim // 2
  want = np.empty_like(x)
  for t, pos in enumerate(positions[0]):
    for i in range(half):
      angle = pos * theta ** (-2.0 * i / head_dim)
      z = (x[0, t, :, i] + 1j * x[0, t, :, i + half]) * np.exp(1j * angle)
      want[0, t, :, i], want[0, t, :, i + half] = z.real, z.imag
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_rope_theta_is_read_from_config():
  assert llama._rope_theta(small_config(rope_theta=1234.0)) == 1234.0
  assert llama._rope_theta(small_config()) == 10000.0
  scaled = small_config(rope_scaling={"rope_type": "linear", "factor": 2.0})
  with pytest.raises(NotImplementedError):
    llama._rope_theta(scaled)


def test_scanned_equals_unrolled():
  config = small_config()
  unrolled = random_model(config, remat=True)
  scanned = random_model(config, seed=5, scan_layers=True, remat=True)
  # numpy trees: stacking them needs no per-shape XLA compiles.
  unrolled_params = to_numpy(llama.get_params(unrolled))
  llama.set_params(scanned, llama.stack_layer_params(unrolled_params))

  paths = flat_paths(scanned)
  assert paths["model.layers.self_attn.q_proj.kernel"].shape == (2, 32, 32)
  assert paths["model.layers.mlp.up_proj.kernel"].shape == (2, 32, 64)
  assert paths["model.layers.input_layernorm.scale"].shape == (2, 32)

  batch = random_batch()
  loss_u, grads_u = loss_and_grads(unrolled, batch)
  loss_s, grads_s = loss_and_grads(scanned, batch)
  np.testing.assert_allclose(loss_u, loss_s, rtol=1e-6)
  # Equal gradients for every weight need equal activations in every layer.
  grads_u = llama.stack_layer_params(to_numpy(grads_u))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               grads_u, grads_s)

  back = llama.unstack_layer_params(to_numpy(llama.get_params(scanned)))
  jax.tree.map(np.testing.assert_array_equal, back, unrolled_params)


def test_bf16_params_forward():
  model16 = random_model(
      small_config(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert all(v.dtype == jnp.bfloat16 for v in flat_paths(model16).values())
  # A float32 model with the same (bf16-representable) weights.
  model32 = random_model(small_config())
  llama.set_params(model32, jax.tree.map(lambda x: np.asarray(x, np.float32),
                                         llama.get_params(model16)))
  ids = random_ids((2, 8))
  logits16 = forward(model16, ids)
  assert logits16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(logits16, np.float32),
                             forward(model32, ids), atol=0.1)
  loss, _ = fast_jit(llama.cross_entropy)(logits16, ids)
  assert loss.dtype == jnp.float32 and np.isfinite(loss)


def test_tied_embeddings_have_no_lm_head():
  model = random_model(small_config(tie_word_embeddings=True))
  assert not any(p.startswith("lm_head") for p in flat_paths(model))
  assert forward(model, random_ids((2, 8))).shape == (2, 8, VOCAB)


def test_config_from_json_file_directory_and_mistral(tmp_path):
  config = small_config(hidden_size=48, head_dim=12, rope_theta=777.0)
  config.save_pretrained(tmp_path)  # writes tmp_path/config.json
  for source in (tmp_path, tmp_path / "config.json"):
    loaded = llama.get_config(str(source))
    assert loaded.hidden_size == 48 and loaded.model_type == "llama"
    assert llama._rope_theta(loaded) == 777.0
  with pytest.raises(ValueError, match="preset"):
    llama.get_config("no-such-preset")
  assert llama.get_config("tiny") is not llama.PRESETS["tiny"]  # a copy

  mistral = transformers.MistralConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
      num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
      head_dim=8, sliding_window=3)
  model = random_model(mistral)
  ids = random_ids((2, 8))
  a = forward(model, ids)
  b = forward(model, ids.at[:, 4].set((ids[:, 4] + 1) % VOCAB))
  # One layer with a window of 3: position 7 sees 5..7, position 6 sees 4..6.
  np.testing.assert_allclose(a[:, 7], b[:, 7], atol=1e-6)
  assert np.abs(np.asarray(a[:, 6] - b[:, 6])).max() > 1e-4


def test_preset_shapes_without_allocating():
  expected = {"60m": 58.1e6, "130m": 134.1e6, "350m": 367.9e6,
              "1b": 1339.1e6, "7b": 6738.4e6}
  for name, count in expected.items():
    # Stacked layers trace one layer instead of up to 32: same shapes.
    state = llama.abstract_model_state(
        name, param_dtype=jnp.bfloat16, scan_layers=True)
    leaves = jax.tree.leaves(nnx.to_pure_dict(state))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    assert llama.param_count(state) == pytest.approx(count, rel=1e-3), name
  flat = flat_paths(state)  # 7b
  assert flat["model.layers.mlp.up_proj.kernel"].shape == (32, 4096, 11008)
  assert flat["model.layers.self_attn.q_proj.kernel"].shape == (32, 4096, 4096)
  cfg = llama.PRESETS["7b"]
  assert cfg.vocab_size == 32000 and cfg.max_position_embeddings >= 1024

  unrolled = flat_paths(llama.abstract_model_state("60m"))
  assert unrolled["model.layers.7.mlp.down_proj.kernel"].shape == (1376, 512)
  assert llama.param_count(unrolled) == pytest.approx(58.1e6, rel=1e-3)

  assert llama.param_count(llama.abstract_model_state("tiny")) < 5e6
  byt5_vocab = len(transformers.ByT5Tokenizer())
  assert llama.PRESETS["tiny"].vocab_size == byt5_vocab


def test_cross_entropy_masks():
  logits = np.random.default_rng(0).normal(size=(2, 3, 5))
  logits = jnp.asarray(logits, jnp.bfloat16)
  labels = jnp.array([[1, 2, -100], [4, 0, 3]])
  mask = jnp.array([[1, 1, 1], [1, 0, 1]])
  loss, count = fast_jit(llama.cross_entropy)(logits, labels, mask)
  lp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float32)))
  want = -np.mean([lp[0, 0, 1], lp[0, 1, 2], lp[1, 0, 4], lp[1, 2, 3]])
  assert count == 4
  np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_loss_falls_with_adam():
  # Same model structure and batch shape as test_scanned_equals_unrolled, so
  # the jitted gradient is compiled once for both.
  model = random_model(small_config(), remat=True)
  # Start from HF-scale weights so that the initial loss is ~log(vocab).
  llama.set_params(model, jax.tree.map(
      lambda x: np.asarray(x) * (0.2 if x.ndim > 1 else 1.0),
      llama.get_params(model)))
  graphdef, params = nnx.split(model)
  batch = random_batch()
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  @fast_jit
  def update(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  losses = []
  for _ in range(30):
    loss, grads = _loss_and_grads(graphdef, params, batch)
    params, opt_state = update(grads, opt_state, params)
    losses.append(float(loss))
  assert losses[0] == pytest.approx(np.log(VOCAB), rel=0.05)
  assert losses[-1] < 0.5 * losses[0], losses


def test_layerwise_step_matches_ordinary_step():
  # Inside a per-layer step the model routes its layers and head through
  # layerwise.call_layer and its embedding through
  # layerwise.embedding_lookup (memory ordering only): same numbers.
  import galore_optax  # noqa: PLC0415
  from galore_optax import layerwise  # noqa: PLC0415

  graphdef, params = nnx.split(random_model(small_config(), remat=True))
  batch = random_batch()
  ids = batch["input_ids"]
  batch["input_ids"] = ids.at[0, 1].set(ids[0, 0]).at[1, 5].set(ids[0, 0])
  tx = galore_optax.galore_adamw(1e-2, rank=4, update_proj_gap=2,
                                 target_modules=["attn", "mlp"])
  loss = lambda p, b: llama.loss_fn(nnx.merge(graphdef, p), b)

  @fast_jit
  def ordinary(p, s, b):
    value, grads = jax.value_and_grad(loss)(p, b)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, value

  lw = layerwise.make_layerwise_step(loss, tx, jit=False)
  per_layer = fast_jit(lw.step)
  p1, s1 = params, tx.init(params)
  p2, s2 = params, lw.init(params)
  for _ in range(3):  # projector refreshes at updates 0 and 2
    p1, s1, l1 = ordinary(p1, s1, batch)
    p2, s2, l2 = per_layer(p2, s2, batch)
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0,
                               atol=1e-6)
