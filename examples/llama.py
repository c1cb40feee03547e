"""A LLaMA-style causal language model in Flax NNX, for the GaLore examples.

The architecture follows the LLaMA family as configured by Hugging Face's
``LlamaConfig`` (and ``MistralConfig``): RMSNorm (pre-norm), rotary position
embeddings, grouped-query attention with a causal mask, a SwiGLU MLP and an
untied language-model head unless ``tie_word_embeddings`` is set.

Parameter paths deliberately mirror Hugging Face's module names, so that
name-based target selection written for PyTorch GaLore (``"attn"``, ``"mlp"``,
``r".*q_proj.*"``...) selects the same matrices here::

    model.embed_tokens.embedding                  (vocab, d_model)
    model.layers.0.self_attn.q_proj.kernel        (d_model, heads * head_dim)
    model.layers.0.mlp.gate_proj.kernel           (d_model, ffn)
    model.layers.0.input_layernorm.scale          (d_model,)
    model.norm.scale                              (d_model,)
    lm_head.kernel                                (d_model, vocab)

Kernels are ``(in_features, out_features)``, the transpose of PyTorch's
``weight``. With ``scan_layers=True`` the decoder layers are stacked and every
layer weight gains a leading layer axis
(``model.layers.self_attn.q_proj.kernel`` with shape
``(L, d_model, heads * head_dim)``).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# transformers announces on import that PyTorch is missing; these examples
# only use its configs and tokenizers, so that line is noise in every run.
logging.getLogger("transformers").addFilter(
    lambda record: not record.getMessage().startswith("PyTorch was not found"))
import transformers  # noqa: E402  (after the filter above)
from flax import nnx  # noqa: E402

from galore_optax import layerwise
from galore_optax import memory

Dtype = Any
# A transformers.PretrainedConfig, a preset name or a local path.
ConfigLike = Any

__all__ = [
    "PRESETS",
    "Linear",
    "RMSNorm",
    "LlamaAttention",
    "LlamaMLP",
    "LlamaDecoderLayer",
    "LlamaModel",
    "LlamaForCausalLM",
    "get_config",
    "build_model",
    "abstract_model",
    "abstract_model_state",
    "param_count",
    "rope_cos_sin",
    "apply_rope",
    "stack_layer_params",
    "unstack_layer_params",
    "set_params",
    "get_params",
    "cross_entropy",
    "loss_fn",
]


# ---------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------

# The tiny preset's vocabulary (ByT5's bytes), so that it trains with no
# tokenizer files at all.
BYT5_VOCAB_SIZE = memory.BYT5_VOCAB_SIZE


def _llama_config(
    shape: memory.LlamaShape,
    *,
    max_position_embeddings: int = 1024,
    **kwargs: Any,
) -> transformers.LlamaConfig:
  """Builds a ``LlamaConfig`` of these shapes (plus the fields given)."""
  return transformers.LlamaConfig(
      vocab_size=shape.vocab,
      hidden_size=shape.d_model,
      intermediate_size=shape.ffn,
      num_attention_heads=shape.heads,
      num_key_value_heads=shape.kv_heads or shape.heads,
      num_hidden_layers=shape.layers,
      head_dim=shape.head_dim or shape.d_model // shape.heads,
      max_position_embeddings=max_position_embeddings,
      rms_norm_eps=1e-6,
      initializer_range=0.02,
      hidden_act="silu",
      tie_word_embeddings=shape.tie_embeddings,
      **kwargs,
  )


# The fields of each preset beyond its shapes (``galore_optax.memory.
# LLAMA_SHAPES``, the single source of the presets' shapes): `tiny` is a
# CPU-sized model on the ByT5 byte vocabulary (pad 0, eos 1); the others are
# the paper's LLaMA shapes (GaLore, Table 2 and the 7B run).
_PRESET_FIELDS: dict[str, dict[str, Any]] = {
    "tiny": dict(pad_token_id=0, eos_token_id=1, bos_token_id=None),
    "7b": dict(max_position_embeddings=2048),
}
PRESETS: dict[str, transformers.LlamaConfig] = {
    name: _llama_config(shape, **_PRESET_FIELDS.get(name, {}))
    for name, shape in memory.LLAMA_SHAPES.items()
}


def get_config(config: ConfigLike) -> transformers.PretrainedConfig:
  """Resolves a model configuration from a preset name, a path or a config.

  Args:
    config: a ``transformers.PretrainedConfig`` (returned as a copy), the name
      of one of ``PRESETS``, or a local path to a ``config.json`` file or to a
      directory holding one. Paths are read with ``local_files_only=True``:
      nothing is ever downloaded.

  Returns:
    A fresh configuration object that the caller may modify.

  Raises:
    ValueError: if ``config`` is a string that is neither a preset nor an
      existing local path.
  """
  if isinstance(config, transformers.PretrainedConfig):
    return copy.deepcopy(config)
  if isinstance(config, str | os.PathLike):
    name = os.fspath(config)
    if name in PRESETS:
      return copy.deepcopy(PRESETS[name])
    if os.path.exists(name):
      if os.path.isfile(name):
        # AutoConfig wants a directory or a hub id; read the JSON
        # ourselves and dispatch on its model_type.
        config_dict, _ = transformers.PretrainedConfig.get_config_dict(name)
        model_type = config_dict.get("model_type", "llama")
        return transformers.AutoConfig.for_model(model_type, **{
            k: v for k, v in config_dict.items() if k != "model_type"
        })
      return transformers.AutoConfig.from_pretrained(
          name, local_files_only=True)
    raise ValueError(
        f"Unknown model config {name!r}: not a preset ({', '.join(PRESETS)}) "
        "and not an existing local file or directory."
    )
  raise TypeError(f"Cannot make a model config from {type(config).__name__}.")


def _head_dim(config: transformers.PretrainedConfig) -> int:
  head_dim = getattr(config, "head_dim", None)
  if head_dim:
    return int(head_dim)
  return config.hidden_size // config.num_attention_heads


def _num_kv_heads(config: transformers.PretrainedConfig) -> int:
  kv = getattr(config, "num_key_value_heads", None)
  return int(kv) if kv else int(config.num_attention_heads)


def _rope_theta(config: transformers.PretrainedConfig) -> float:
  """Reads rope_theta from transformers 5 (`rope_parameters`) or 4 layouts."""
  params = getattr(config, "rope_parameters", None)
  scaling = getattr(config, "rope_scaling", None)
  for p in (params, scaling):
    if isinstance(p, Mapping):
      rope_type = p.get("rope_type", p.get("type", "default"))
      # Only plain RoPE is implemented: a scaled variant (llama3, yarn,
      # ...) silently computed as plain RoPE would give wrong logits.
      if rope_type not in (None, "default"):
        raise NotImplementedError(f"rope_type {rope_type!r} is not supported.")
  if isinstance(params, Mapping) and "rope_theta" in params:
    return float(params["rope_theta"])
  theta = getattr(config, "rope_theta", None)
  return float(theta) if theta is not None else 10000.0


_ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu, "gelu": jax.nn.gelu}


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm with a learned per-feature scale.

  The statistics are computed in float32 whatever the activation dtype,
  because a bf16 mean of squares over thousands of features loses most of
  its precision.
  """

  def __init__(
      self,
      num_features: int,
      *,
      eps: float = 1e-6,
      dtype: Dtype = jnp.float32,
      param_dtype: Dtype = jnp.float32,
  ):
    """Creates the norm.

    Args:
      num_features: size of the last axis.
      eps: added to the mean square before the reciprocal square root.
      dtype: dtype of the output.
      param_dtype: dtype of the ``scale`` parameter.
    """
    self.scale = nnx.Param(jnp.ones((num_features,), dtype=param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalises the last axis of ``x``.

    Args:
      x: activations ``[..., num_features]``.

    Returns:
      The normalised, scaled activations in ``self.dtype``.
    """
    x32 = x.astype(jnp.float32)
    mean_square = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(mean_square + self.eps)
    # Like HF: cast back to the activation dtype before scaling.
    return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


def rope_cos_sin(
    positions: jax.Array, head_dim: int, theta: float = 10000.0
) -> tuple[jax.Array, jax.Array]:
  """Rotary-embedding tables in Hugging Face's "rotate half" layout.

  Feature ``i`` and ``i + head_dim / 2`` form a pair rotated by the angle
  ``position * theta ** (-2 i / head_dim)``.

  Args:
    positions: integer positions, any shape ``P``.
    head_dim: per-head feature size (even).
    theta: the RoPE base (``rope_theta``).

  Returns:
    ``(cos, sin)``, each float32 with shape ``P + (head_dim,)``.
  """
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (theta**exponents)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates query or key heads by their positions.

  Args:
    x: ``[batch, seq, heads, head_dim]``.
    cos: ``[batch, seq, head_dim]`` from :func:`rope_cos_sin`.
    sin: same shape as ``cos``.

  Returns:
    The rotated heads, same shape and dtype as ``x``.
  """
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return (x32 * cos + rotated * sin).astype(x.dtype)


def _normal_init(config: transformers.PretrainedConfig) -> nnx.Initializer:
  return nnx.initializers.normal(getattr(config, "initializer_range", 0.02))


class Linear(nnx.Linear):
  """``nnx.Linear`` whose product goes through ``layerwise.dense``.

  The same parameters and result as ``nnx.Linear`` (default precision);
  inside a per-layer step the kernel is updated in the product's backward
  rule, so its gradient exists only while its update runs.
  """

  def __call__(self, x: jax.Array) -> jax.Array:
    y = layerwise.dense(x, self.kernel[...], dtype=self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y


def _linear(
    in_features: int,
    out_features: int,
    config: transformers.PretrainedConfig,
    *,
    use_bias: bool,
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
) -> nnx.Linear:
  # HF initialises every LLaMA linear and embedding with
  # N(0, initializer_range); GaLore's experiments start from that init.
  return Linear(
      in_features,
      out_features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=_normal_init(config),
      rngs=rngs,
  )


class LlamaAttention(nnx.Module):
  """Causal multi-head attention with grouped-query key/value heads and RoPE."""

  def __init__(
      self,
      config: transformers.PretrainedConfig,
      *,
      dtype: Dtype = jnp.float32,
      param_dtype: Dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    """Creates the q/k/v/o projections.

    Args:
      config: model configuration.
      dtype: computation dtype.
      param_dtype: parameter dtype.
      rngs: random streams for the initialisers.
    """
    d = config.hidden_size
    self.num_heads = int(config.num_attention_heads)
    self.num_kv_heads = _num_kv_heads(config)
    self.head_dim = _head_dim(config)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_attention_heads ({self.num_heads}) must be a multiple of "
          f"num_key_value_heads ({self.num_kv_heads})."
      )
    bias = bool(getattr(config, "attention_bias", False))
    lin = functools.partial(
        _linear, config=config, use_bias=bias, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)
    self.q_proj = lin(d, self.num_heads * self.head_dim)
    self.k_proj = lin(d, self.num_kv_heads * self.head_dim)
    self.v_proj = lin(d, self.num_kv_heads * self.head_dim)
    self.o_proj = lin(self.num_heads * self.head_dim, d)

  def __call__(
      self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array
  ) -> jax.Array:
    """Attends causally over ``x``.

    Args:
      x: ``[batch, seq, d_model]``.
      cos: rotary table ``[batch, seq, head_dim]``.
      sin: rotary table ``[batch, seq, head_dim]``.
      mask: boolean ``[batch or 1, seq, seq]``; True where query ``t`` may
        attend to key ``s``.

    Returns:
      ``[batch, seq, d_model]``.
    """
    b, t, _ = x.shape
    groups = self.num_heads // self.num_kv_heads
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    # GQA without materialising repeated K/V: query heads are grouped as
    # (kv_head, group), matching HF's repeat_kv ordering (head h uses kv
    # head h // groups).
    q = q.reshape(b, t, self.num_kv_heads, groups, self.head_dim)
    scores = jnp.einsum(
        "btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32
    ) * (self.head_dim**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores,
                       jnp.finfo(jnp.float32).min)
    # Softmax in float32: bf16 exponentials over long rows are too coarse.
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))


class LlamaMLP(nnx.Module):
  """SwiGLU feed-forward block: ``down(act(gate(x)) * up(x))``."""

  def __init__(
      self,
      config: transformers.PretrainedConfig,
      *,
      dtype: Dtype = jnp.float32,
      param_dtype: Dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    """Creates the gate/up/down projections.

    Args:
      config: model configuration.
      dtype: computation dtype.
      param_dtype: parameter dtype.
      rngs: random streams for the initialisers.
    """
    d, ffn = config.hidden_size, config.intermediate_size
    bias = bool(getattr(config, "mlp_bias", False))
    lin = functools.partial(
        _linear, config=config, use_bias=bias, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)
    act = getattr(config, "hidden_act", "silu")
    if act not in _ACTIVATIONS:
      raise NotImplementedError(f"hidden_act {act!r} is not supported.")
    self.act = act
    self.gate_proj = lin(d, ffn)
    self.up_proj = lin(d, ffn)
    self.down_proj = lin(ffn, d)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the block.

    Args:
      x: ``[..., d_model]``.

    Returns:
      ``[..., d_model]``.
    """
    gate = _ACTIVATIONS[self.act](self.gate_proj(x))
    return self.down_proj(gate * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
  """Pre-norm transformer block: attention then MLP, each with a residual."""

  def __init__(
      self,
      config: transformers.PretrainedConfig,
      *,
      dtype: Dtype = jnp.float32,
      param_dtype: Dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    """Creates the block.

    Args:
      config: model configuration.
      dtype: computation dtype.
      param_dtype: parameter dtype.
      rngs: random streams for the initialisers.
    """
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    eps = float(getattr(config, "rms_norm_eps", 1e-6))
    self.self_attn = LlamaAttention(config, rngs=rngs, **kw)
    self.mlp = LlamaMLP(config, rngs=rngs, **kw)
    self.input_layernorm = RMSNorm(config.hidden_size, eps=eps, **kw)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps, **kw)

  def __call__(
      self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array
  ) -> jax.Array:
    """Applies the block.

    Args:
      x: ``[batch, seq, d_model]``.
      cos: rotary table ``[batch, seq, head_dim]``.
      sin: rotary table ``[batch, seq, head_dim]``.
      mask: boolean attention mask ``[batch or 1, seq, seq]``.

    Returns:
      ``[batch, seq, d_model]``.
    """
    h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
    return h + self.mlp(self.post_attention_layernorm(h))


def _apply_layer(
    layer: LlamaDecoderLayer,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    mask: jax.Array,
) -> jax.Array:
  return layer(x, cos, sin, mask)


# Activation checkpointing per decoder layer: only the layer inputs are kept
# for the backward pass; everything inside a layer is recomputed.
_apply_layer_remat = nnx.remat(_apply_layer)


class LlamaModel(nnx.Module):
  """The decoder stack: token embedding, decoder layers, final norm."""

  def __init__(
      self,
      config: transformers.PretrainedConfig,
      *,
      dtype: Dtype = jnp.float32,
      param_dtype: Dtype = jnp.float32,
      remat: bool = False,
      scan_layers: bool = False,
      rngs: nnx.Rngs,
  ):
    """Creates the stack.

    Args:
      config: model configuration.
      dtype: computation dtype.
      param_dtype: parameter dtype.
      remat: recompute each decoder layer's activations in the backward pass.
      scan_layers: stack the layers (leading layer axis on every weight)
        and run them with a scan, so compile time does not grow with depth.
      rngs: random streams for the initialisers.
    """
    # No reference to `config` is kept: HF configs are unhashable, and NNX
    # graphdefs (static under jit) must hash. Only scalars are stored.
    self.dtype = dtype
    self.remat = remat
    self.scan_layers = scan_layers
    self.head_dim = _head_dim(config)
    self.rope_theta = _rope_theta(config)
    window = getattr(config, "sliding_window", None)
    # Mistral-style sliding window; LLaMA configs have no such field.
    self.sliding_window = int(window) if window else None
    self.embed_tokens = nnx.Embed(
        config.vocab_size,
        config.hidden_size,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=_normal_init(config),
        rngs=rngs,
    )
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    num_layers = int(config.num_hidden_layers)
    if scan_layers:
      # vmap over split rng keys: one independently initialised layer per
      # slice of the leading axis.
      @nnx.split_rngs(splits=num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def create_stack(rngs: nnx.Rngs) -> LlamaDecoderLayer:
        return LlamaDecoderLayer(config, rngs=rngs, **kw)

      self.layers = create_stack(rngs)
    else:
      self.layers = nnx.List([
          LlamaDecoderLayer(config, rngs=rngs, **kw) for _ in range(num_layers)
      ])
    eps = float(getattr(config, "rms_norm_eps", 1e-6))
    self.norm = RMSNorm(config.hidden_size, eps=eps, **kw)

  def _mask(self, seq_len: int, attention_mask: jax.Array | None) -> jax.Array:
    q = jnp.arange(seq_len)[:, None]
    k = jnp.arange(seq_len)[None, :]
    allowed = k <= q
    if self.sliding_window is not None:
      allowed &= (q - k) < self.sliding_window
    allowed = allowed[None]
    if attention_mask is not None:
      # Padding keys are never attended to.
      allowed = allowed & attention_mask.astype(bool)[:, None, :]
    return allowed

  def __call__(
      self,
      input_ids: jax.Array,
      *,
      positions: jax.Array | None = None,
      attention_mask: jax.Array | None = None,
  ) -> jax.Array:
    """Runs the stack.

    Args:
      input_ids: int ``[batch, seq]``.
      positions: optional int ``[batch, seq]`` positions; defaults to
        ``0 .. seq - 1``.
      attention_mask: optional ``[batch, seq]``, 1 for real tokens and 0 for
        padding.

    Returns:
      Final hidden states ``[batch, seq, d_model]`` in the computation dtype.
    """
    b, t = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta)
    mask = self._mask(t, attention_mask)
    # The same lookup as nnx.Embed; inside a per-layer step its gradient
    # buffer is only created when needed (and an int8 table is dequantised
    # row by row). Casting the looked-up rows equals casting the table.
    h = layerwise.embedding_lookup(self.embed_tokens.embedding[...],
                                   input_ids)
    if self.embed_tokens.dtype is not None:
      h = h.astype(self.embed_tokens.dtype)
    if self.scan_layers:
      apply = _apply_layer_remat if self.remat else _apply_layer

      @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
      def run(layer: LlamaDecoderLayer, x: jax.Array) -> jax.Array:
        return apply(layer, x, cos, sin, mask)

      h = run(self.layers, h)
    else:
      for layer in self.layers:
        # call_layer is the plain call (checkpointed if remat) outside a
        # per-layer step; inside one it recomputes the layer and updates
        # each weight as soon as its gradient exists.
        layer_def, layer_params = nnx.split(layer)
        h = layerwise.call_layer(
            lambda x, p, *a, d=layer_def: _apply_layer(nnx.merge(d, p), x, *a),
            h, layer_params, cos, sin, mask, remat=self.remat)
    return self.norm(h)


class LlamaForCausalLM(nnx.Module):
  """LLaMA decoder stack plus the language-model head (HF layout)."""

  def __init__(
      self,
      config: transformers.PretrainedConfig,
      *,
      dtype: Dtype = jnp.float32,
      param_dtype: Dtype = jnp.float32,
      remat: bool = False,
      scan_layers: bool = False,
      rngs: nnx.Rngs,
  ):
    """Creates the model; see :func:`build_model` for the arguments."""
    self.vocab_size = int(config.vocab_size)
    self.hidden_size = int(config.hidden_size)
    self.num_layers = int(config.num_hidden_layers)
    self.model = LlamaModel(
        config,
        dtype=dtype,
        param_dtype=param_dtype,
        remat=remat,
        scan_layers=scan_layers,
        rngs=rngs,
    )
    self.tie_word_embeddings = bool(
        getattr(config, "tie_word_embeddings", False))
    if not self.tie_word_embeddings:
      self.lm_head = _linear(
          config.hidden_size,
          config.vocab_size,
          config,
          use_bias=False,
          dtype=dtype,
          param_dtype=param_dtype,
          rngs=rngs,
      )

  def __call__(
      self,
      input_ids: jax.Array,
      *,
      positions: jax.Array | None = None,
      attention_mask: jax.Array | None = None,
  ) -> jax.Array:
    """Computes next-token logits.

    Args:
      input_ids: int ``[batch, seq]``.
      positions: optional int ``[batch, seq]`` positions.
      attention_mask: optional ``[batch, seq]`` padding mask (1 = real token).

    Returns:
      Logits ``[batch, seq, vocab]`` in the computation dtype.
    """
    h = self.model(
        input_ids, positions=positions, attention_mask=attention_mask)
    if self.tie_word_embeddings:
      return self.model.embed_tokens.attend(h)
    # Inside a per-layer step the head's gradient is made and consumed one
    # row block at a time (Linear goes through layerwise.dense).
    return self.lm_head(h)


# ---------------------------------------------------------------------------
# Construction and inspection helpers
# ---------------------------------------------------------------------------


def build_model(
    config: ConfigLike,
    *,
    rngs: nnx.Rngs | int = 0,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    remat: bool = False,
    scan_layers: bool = False,
) -> LlamaForCausalLM:
  """Builds a LLaMA-style causal LM.

  Args:
    config: a ``LlamaConfig``/``MistralConfig`` (or any config with the same
      fields), a preset name from ``PRESETS``, or a local config path.
    rngs: ``nnx.Rngs`` or an integer seed for the parameter initialisers.
    dtype: computation dtype (activations, matmuls).
    param_dtype: dtype the parameters are stored in, e.g. ``jnp.bfloat16``.
    remat: activation checkpointing per decoder layer.
    scan_layers: stack the decoder layers along a leading axis and scan them.

  Returns:
    The initialised ``LlamaForCausalLM``.
  """
  config = get_config(config)
  if isinstance(rngs, int):
    rngs = nnx.Rngs(params=rngs)
  return LlamaForCausalLM(
      config,
      dtype=dtype,
      param_dtype=param_dtype,
      remat=remat,
      scan_layers=scan_layers,
      rngs=rngs,
  )


def abstract_model(
    config: ConfigLike,
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    remat: bool = False,
    scan_layers: bool = False,
) -> LlamaForCausalLM:
  """Builds the model with ``jax.ShapeDtypeStruct`` leaves, allocating nothing.

  Useful to lower and size a train step (``.lower(...).compile()
  .memory_analysis()``) for models that do not fit in memory.

  Args:
    config: as for :func:`build_model`.
    dtype: computation dtype.
    param_dtype: parameter dtype.
    remat: activation checkpointing per decoder layer.
    scan_layers: stacked layers.

  Returns:
    An abstract ``LlamaForCausalLM`` (use ``nnx.split`` for graphdef/state).
  """
  config = get_config(config)
  return nnx.eval_shape(
      lambda: build_model(
          config,
          rngs=nnx.Rngs(params=0),
          dtype=dtype,
          param_dtype=param_dtype,
          remat=remat,
          scan_layers=scan_layers,
      )
  )


def abstract_model_state(
    config: ConfigLike,
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    scan_layers: bool = False,
) -> nnx.State:
  """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, allocating nothing.

  Args:
    config: as for :func:`build_model`.
    dtype: computation dtype.
    param_dtype: parameter dtype.
    scan_layers: stacked layers.

  Returns:
    An ``nnx.State`` of the ``nnx.Param`` variables whose values are
    ``jax.ShapeDtypeStruct``.
  """
  model = abstract_model(
      config, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
  return nnx.state(model, nnx.Param)


def _leaf_size(x: Any) -> int:
  shape = getattr(x, "shape", None)
  return int(np.prod(shape)) if shape is not None else 0


def param_count(tree: Any) -> int:
  """Counts parameters.

  Args:
    tree: an ``nnx.Module`` (its ``nnx.Param`` variables are counted), an
      ``nnx.State`` or any pytree of arrays / ``jax.ShapeDtypeStruct``.

  Returns:
    The total number of scalar parameters.
  """
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, nnx.Param)
  if isinstance(tree, nnx.State):
    tree = nnx.to_pure_dict(tree)
  return sum(_leaf_size(x) for x in jax.tree.leaves(tree))


def get_params(model: nnx.Module) -> dict:
  """The model's parameters as a plain nested dict (``nnx.to_pure_dict``).

  Args:
    model: an NNX module.

  Returns:
    Nested dict of arrays, keyed like the parameter paths (list indices are
    ints).
  """
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def set_params(model: nnx.Module, params: Mapping) -> None:
  """Overwrites a model's parameters in place from a plain nested dict.

  Args:
    model: the module to update; its structure must match ``params``.
    params: nested dict as returned by :func:`get_params` or
      :func:`stack_layer_params`.
  """
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)


def _layer_index(key: Any) -> int:
  return int(key)


def stack_layer_params(params: Mapping) -> dict:
  """Converts unrolled parameters (``model.layers.<i>...``) to stacked ones.

  Args:
    params: nested dict from :func:`get_params` of a model built with
      ``scan_layers=False``.

  Returns:
    A nested dict for a ``scan_layers=True`` model: ``model.layers`` holds
    one tree whose arrays have a leading layer axis, in layer order. numpy
    inputs give numpy outputs.
  """
  layers = params["model"]["layers"]
  ordered = [layers[k] for k in sorted(layers, key=_layer_index)]
  # Host (numpy) checkpoints stay on the host; device arrays stay on device.
  def stack(*xs):
    if all(isinstance(x, np.ndarray) for x in xs):
      return np.stack(xs)
    return jnp.stack(xs)

  stacked = jax.tree.map(stack, *ordered)
  model = dict(params["model"])
  model["layers"] = stacked
  out = dict(params)
  out["model"] = model
  return out


def unstack_layer_params(params: Mapping) -> dict:
  """Inverse of :func:`stack_layer_params`.

  Args:
    params: nested dict from a ``scan_layers=True`` model.

  Returns:
    A nested dict for a ``scan_layers=False`` model, with integer layer keys.
  """
  stacked = params["model"]["layers"]
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  model = dict(params["model"])
  model["layers"] = {
      i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_layers)
  }
  out = dict(params)
  out["model"] = model
  return out


# ---------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------


def cross_entropy(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """Mean token cross-entropy, computed in float32.

  Args:
    logits: ``[..., vocab]`` in any float dtype.
    labels: int ``[...]``; negative labels (HF's -100) are ignored.
    mask: optional ``[...]``, nonzero where the token counts.

  Returns:
    ``(mean_loss, num_tokens)``: the mean over counted tokens (0 if none)
    and the number of counted tokens (float32).
  """
  logits = logits.astype(jnp.float32)
  valid = labels >= 0
  if mask is not None:
    valid = valid & (mask != 0)
  safe_labels = jnp.where(valid, labels, 0)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  label_logits = jnp.take_along_axis(
      logits, safe_labels[..., None], axis=-1)[..., 0]
  weights = valid.astype(jnp.float32)
  count = weights.sum()
  total = ((log_z - label_logits) * weights).sum()
  return total / jnp.maximum(count, 1.0), count


def loss_fn(
    model: LlamaForCausalLM, batch: Mapping[str, jax.Array]
) -> jax.Array:
  """Mean next-token cross-entropy of a batch (for ``nnx.value_and_grad``).

  Args:
    model: the language model.
    batch: ``input_ids`` and ``labels`` (int ``[batch, seq]``, labels
      already shifted by one). Optional ``attention_mask`` (1 = real token)
      masks padding keys in attention and, unless ``loss_mask`` is given,
      padding targets in the loss. Labels < 0 are ignored.

  Returns:
    Scalar float32 loss.
  """
  attention_mask = batch.get("attention_mask")
  logits = model(batch["input_ids"], attention_mask=attention_mask)
  mask = batch.get("loss_mask", attention_mask)
  loss, _ = cross_entropy(logits, batch["labels"], mask)
  return loss
