"""Target selection with Hugging Face's optim_target_modules semantics."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from galore_optax import targets


def _params():
  layer = {
      "self_attn": {"q_proj": {"kernel": jnp.zeros((8, 8))},
                    "o_proj": {"kernel": jnp.zeros((8, 8))}},
      "mlp": {"up_proj": {"kernel": jnp.zeros((8, 16))},
              "up_bias": {"bias": jnp.zeros((16,))}},
      "input_layernorm": {"scale": jnp.zeros((8,))},
  }
  return {"model": {"embed_tokens": {"embedding": jnp.zeros((32, 8))},
                    "layers": [layer, layer]},
          "lm_head": {"kernel": jnp.zeros((8, 32))}}


def _selected(spec):
  mask = targets.target_mask(_params(), spec)
  leaves = jax.tree_util.tree_flatten_with_path(mask)[0]
  return sorted(targets.path_to_name(p) for p, v in leaves if v)


def test_path_names_read_like_hugging_face_modules():
  names = [targets.path_to_name(p)
           for p, _ in jax.tree_util.tree_flatten_with_path(_params())[0]]
  assert "model.layers.0.self_attn.q_proj.kernel" in names


def test_none_selects_every_matrix():
  assert _selected(None) == sorted([
      "lm_head.kernel", "model.embed_tokens.embedding",
      *[f"model.layers.{i}.{m}.kernel" for i in (0, 1)
        for m in ("mlp.up_proj", "self_attn.o_proj", "self_attn.q_proj")]])


def test_single_string_is_a_full_match_regex():
  with pytest.raises(ValueError, match="matches no parameter"):
    targets.target_mask(_params(), "attn")  # HF: re.fullmatch, no match
  assert _selected(r".*attn.*") == [
      f"model.layers.{i}.self_attn.{p}.kernel" for i in (0, 1)
      for p in ("o_proj", "q_proj")]
  # The module name (path without the parameter key) is matched too.
  assert _selected(r".*\.q_proj") == [
      "model.layers.0.self_attn.q_proj.kernel",
      "model.layers.1.self_attn.q_proj.kernel"]


def test_list_matches_exact_substring_or_regex():
  assert _selected(["attn", "mlp"]) == sorted(
      f"model.layers.{i}.{m}.kernel" for i in (0, 1)
      for m in ("mlp.up_proj", "self_attn.o_proj", "self_attn.q_proj"))
  assert _selected(["model.layers.1.self_attn.q_proj"]) == [
      "model.layers.1.self_attn.q_proj.kernel"]
  assert _selected([r"model\.layers\.0\..*_proj"]) == sorted(
      f"model.layers.0.{m}.kernel"
      for m in ("mlp.up_proj", "self_attn.o_proj", "self_attn.q_proj"))


def test_one_dimensional_leaves_are_never_targets():
  sel = _selected(["mlp"])
  assert not any("bias" in s for s in sel)
  with pytest.raises(ValueError, match="fewer than two dimensions"):
    targets.target_mask(_params(), ["layernorm"])


def test_all_linear_selects_kernels_including_head():
  sel = _selected("all-linear")
  assert "lm_head.kernel" in sel and "model.embed_tokens.embedding" not in sel
  assert _selected("all_linear") == sel


def test_error_lists_available_names():
  with pytest.raises(ValueError, match="q_proj") as e:
    targets.target_mask(_params(), ["nothing_here"])
  assert "r'.*attn.*'" in str(e.value)


@pytest.mark.parametrize("bad", [[], 3, ["ok", 4], "(unclosed"])
def test_malformed_specs_fail_at_construction(bad):
  with pytest.raises(ValueError, match="target_modules"):
    targets.galore_labels(bad)


def test_labels_drive_optax_partition():
  labels = targets.galore_labels(["attn"])(_params())
  assert labels["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"] == (
      targets.GALORE_LABEL)
  assert labels["lm_head"]["kernel"] == targets.FULL_RANK_LABEL
  tx = optax.partition({targets.GALORE_LABEL: optax.sgd(1.0),
                        targets.FULL_RANK_LABEL: optax.set_to_zero()},
                       targets.galore_labels(["attn"]))
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(updates["lm_head"]["kernel"].sum()) == 0.0
  assert float(updates["model"]["layers"][1]["self_attn"]["o_proj"]["kernel"]
               .sum()) == -64.0


def test_nnx_variable_paths_drop_value():

  class Block(nnx.Module):

    def __init__(self, rngs):
      self.self_attn = nnx.Linear(4, 4, rngs=rngs)

  state = nnx.state(Block(nnx.Rngs(0)), nnx.Param)
  names = [targets.path_to_name(p)
           for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  assert sorted(names) == ["self_attn.bias", "self_attn.kernel"]
  mask = targets.target_mask(state, ["self_attn"])
  assert sum(jax.tree.leaves(mask)) == 1


# --- Parity with Hugging Face on the module names of real models ----------
#
# transformers' own matcher (pure Python: no torch needed) decides, module by
# module, as its Trainer's low-rank optimizer setup does (GaLore, APOLLO):
# every module of ``named_modules()`` whose name matches is kept if it is an
# ``nn.Linear`` and ignored otherwise; an empty selection raises. Without
# torch, transformers 5 cannot build the models, so the module lists below
# are derived from the config classes' defaults (layer counts, FFN kind, tied
# head) and each model's known module structure, in its Flax layout: a linear
# layer holds ``kernel`` (and ``bias``), an embedding ``embedding``, a norm
# ``scale`` (and ``bias``); a tied head holds no parameter. GPT-2's
# ``c_attn``/``c_proj``/``c_fc`` are Dense layers in Flax (PyTorch writes them
# as ``Conv1D``, which transformers' setup does not count as linear).

_LINEAR, _LINEAR_BIAS, _EMBED, _NORM, _NORM_BIAS, _OTHER = (
    "linear", "linear+bias", "embedding", "norm", "norm+bias", "other")


def _llama_like_modules(config):
  modules = [("", _OTHER), ("model", _OTHER), ("model.embed_tokens", _EMBED),
             ("model.layers", _OTHER)]
  for i in range(config.num_hidden_layers):
    p = f"model.layers.{i}"
    modules += [(p, _OTHER), (f"{p}.self_attn", _OTHER)]
    modules += [(f"{p}.self_attn.{m}", _LINEAR)
                for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
    modules += [(f"{p}.mlp", _OTHER), (f"{p}.mlp.act_fn", _OTHER)]
    modules += [(f"{p}.mlp.{m}", _LINEAR)
                for m in ("gate_proj", "up_proj", "down_proj")]
    modules += [(f"{p}.input_layernorm", _NORM),
                (f"{p}.post_attention_layernorm", _NORM)]
  modules += [("model.norm", _NORM), ("model.rotary_emb", _OTHER)]
  if not config.tie_word_embeddings:
    modules.append(("lm_head", _LINEAR))
  return modules


def _gpt2_modules(config):
  modules = [("", _OTHER), ("transformer", _OTHER),
             ("transformer.wte", _EMBED), ("transformer.wpe", _EMBED),
             ("transformer.drop", _OTHER), ("transformer.h", _OTHER)]
  for i in range(config.n_layer):
    p = f"transformer.h.{i}"
    modules += [(p, _OTHER), (f"{p}.ln_1", _NORM_BIAS), (f"{p}.attn", _OTHER),
                (f"{p}.attn.c_attn", _LINEAR_BIAS),
                (f"{p}.attn.c_proj", _LINEAR_BIAS),
                (f"{p}.attn.attn_dropout", _OTHER),
                (f"{p}.attn.resid_dropout", _OTHER),
                (f"{p}.ln_2", _NORM_BIAS), (f"{p}.mlp", _OTHER),
                (f"{p}.mlp.c_fc", _LINEAR_BIAS),
                (f"{p}.mlp.c_proj", _LINEAR_BIAS), (f"{p}.mlp.act", _OTHER),
                (f"{p}.mlp.dropout", _OTHER)]
  modules.append(("transformer.ln_f", _NORM_BIAS))
  assert config.tie_word_embeddings  # the head is wte: no parameter of its own
  return modules


def _t5_modules(config):
  modules = [("", _OTHER), ("shared", _EMBED)]
  ffn = ("wi_0", "wi_1", "wo") if config.is_gated_act else ("wi", "wo")
  for stack, n in (("encoder", config.num_layers),
                   ("decoder", config.num_decoder_layers)):
    modules += [(stack, _OTHER), (f"{stack}.block", _OTHER)]
    for i in range(n):
      p = f"{stack}.block.{i}"
      attentions = ["SelfAttention"] + (["EncDecAttention"]
                                        if stack == "decoder" else [])
      modules += [(p, _OTHER), (f"{p}.layer", _OTHER)]
      for j, attention in enumerate(attentions):
        a = f"{p}.layer.{j}.{attention}"
        modules += [(f"{p}.layer.{j}", _OTHER), (a, _OTHER)]
        modules += [(f"{a}.{m}", _LINEAR) for m in ("q", "k", "v", "o")]
        if i == 0 and attention == "SelfAttention":
          modules.append((f"{a}.relative_attention_bias", _EMBED))
        modules += [(f"{p}.layer.{j}.layer_norm", _NORM),
                    (f"{p}.layer.{j}.dropout", _OTHER)]
      f = f"{p}.layer.{len(attentions)}"
      modules += [(f, _OTHER), (f"{f}.DenseReluDense", _OTHER)]
      modules += [(f"{f}.DenseReluDense.{m}", _LINEAR) for m in ffn]
      modules += [(f"{f}.DenseReluDense.dropout", _OTHER),
                  (f"{f}.DenseReluDense.act", _OTHER),
                  (f"{f}.layer_norm", _NORM), (f"{f}.dropout", _OTHER)]
    modules += [(f"{stack}.final_layer_norm", _NORM),
                (f"{stack}.dropout", _OTHER)]
  if not config.tie_word_embeddings:
    modules.append(("lm_head", _LINEAR))
  return modules


def _real_models():
  transformers = pytest.importorskip("transformers")
  return {
      "llama": _llama_like_modules(transformers.LlamaConfig()),
      "mistral": _llama_like_modules(transformers.MistralConfig()),
      "gpt2": _gpt2_modules(transformers.GPT2Config()),
      "t5": _t5_modules(transformers.T5Config()),
      "flan-t5": _t5_modules(transformers.T5Config(
          feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
  }


def _flax_params(modules):
  """The Flax parameter tree of a module list (tiny abstract leaves)."""
  leaves = {_LINEAR: ("kernel",), _LINEAR_BIAS: ("kernel", "bias"),
            _EMBED: ("embedding",), _NORM: ("scale",),
            _NORM_BIAS: ("scale", "bias"), _OTHER: ()}
  matrix = jax.ShapeDtypeStruct((4, 3), jnp.float32)
  vector = jax.ShapeDtypeStruct((3,), jnp.float32)
  params = {}
  for name, kind in modules:
    for key in leaves[kind]:
      node = params
      for part in name.split("."):
        node = node.setdefault(part, {})
      node[key] = matrix if key in ("kernel", "embedding") else vector
  return params


def _hf_selection(spec, modules):
  """transformers' low-rank setup on a module list: the selected modules."""
  from transformers.trainer_utils import check_target_module_exists
  if not isinstance(spec, (list, str)):
    raise TypeError(f"optim_target_modules {spec!r}")
  all_linear = isinstance(spec, str) and spec.replace("_", "-") == "all-linear"
  selected = set()
  for name, kind in modules:
    matched = check_target_module_exists(spec, name)
    if kind not in (_LINEAR, _LINEAR_BIAS):
      continue  # "matched but ignored": only nn.Linear is projected
    if all_linear or matched:
      selected.add(name)
  if not selected:
    raise ValueError("No target modules found")
  return selected


def _our_selection(spec, params):
  mask = targets.target_mask(params, spec)
  leaves = jax.tree_util.tree_flatten_with_path(mask)[0]
  return {targets.module_name(targets.path_to_name(p)) for p, v in leaves if v}


_HF_SPECS = [
    ["attn", "mlp"], ["q_proj", "v_proj"], ["self_attn.q_proj"],
    r".*attn.*", r".*\.(q|v)_proj", r".*mlp\..*", "attn", "all-linear",
    "all_linear", ["proj."], ["q", "k", "v", "o"], ["kernel"],
    ["embed_tokens"], ["wte", "wpe"], ["shared"], ["norm"], ["layernorm"],
    ["c_attn"], ["c_attn", "c_fc"], ["h.0."], ["SelfAttention"],
    ["EncDecAttention"], ["DenseReluDense"], ["wi", "wo"],
    ["relative_attention_bias"], [r".*layers\.1\d\..*"], [r".*\.[qk]"],
    ["model.layers.3.mlp.down_proj"], ["layers.3"], ["block.0.layer.0"],
]


@pytest.mark.parametrize("model", ["llama", "mistral", "gpt2", "t5", "flan-t5"])
def test_selection_equals_hugging_face_on_real_module_names(model):
  modules = _real_models()[model]
  params = _flax_params(modules)
  for spec in _HF_SPECS:
    try:
      expected = _hf_selection(spec, modules)
    except ValueError:
      with pytest.raises(ValueError, match="No target modules found"):
        targets.target_mask(params, spec)
      continue
    assert _our_selection(spec, params) == expected, (model, spec)


def test_module_names_only_not_the_parameter_key():
  # Old behaviour: ["proj."] matched "q_proj.kernel", ["k"] every kernel.
  params = _flax_params(_real_models()["llama"])
  with pytest.raises(ValueError, match="No target modules found"):
    targets.target_mask(params, ["proj."])
  selected = _our_selection(["q", "k", "v", "o"], params)
  assert "lm_head" not in selected and len(selected) == 32 * 7


def test_only_linear_weights_unless_any_matrix():
  with pytest.raises(ValueError, match="any_matrix=True"):
    targets.target_mask(_params(), ["embed_tokens"])
  mask = targets.target_mask(_params(), ["embed_tokens"], any_matrix=True)
  assert mask["model"]["embed_tokens"]["embedding"]
  assert sum(jax.tree.leaves(mask)) == 1
  wide = targets.target_mask(_params(), ["model"], any_matrix=True)
  assert wide["model"]["embed_tokens"]["embedding"]
  assert not wide["model"]["layers"][0]["mlp"]["up_bias"]["bias"]
  # "all-linear" stays linear.
  assert not targets.target_mask(_params(), "all-linear", any_matrix=True)[
      "model"]["embed_tokens"]["embedding"]
  labels = targets.galore_labels(["embed_tokens"], any_matrix=True)(_params())
  assert labels["model"]["embed_tokens"]["embedding"] == targets.GALORE_LABEL


@pytest.mark.parametrize("spec", [("attn", "mlp"), 3, ["attn", 4], {"attn"}])
def test_wrong_types_raise_type_error_as_hugging_face(spec):
  with pytest.raises(TypeError, match="list of strings"):
    targets.galore_labels(spec)
  with pytest.raises(TypeError):
    targets.target_mask(_params(), spec)
  with pytest.raises(TypeError):
    _hf_selection(spec, [("", _OTHER), ("attn", _LINEAR)])


def test_bare_matrices_are_their_own_modules():
  params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((3,)),
            "attn": {"w": jnp.zeros((4, 4)), "kernel": jnp.zeros((4, 4))},
            "stack": {"kernel": jnp.zeros((2, 4, 4))},
            "conv": {"kernel": jnp.zeros((3, 3, 2, 4))}}
  mask = targets.target_mask(params, ["w"])
  assert mask["w"] and mask["attn"]["w"] and not mask["attn"]["kernel"]
  assert not mask["b"]
  mask = targets.target_mask(params, ["attn"])
  assert mask["attn"]["w"] and mask["attn"]["kernel"] and not mask["w"]
  # Stacked (L, m, n) kernels are linear weights; so is a conv kernel.
  assert targets.target_mask(params, ["stack"])["stack"]["kernel"]
  assert targets.target_mask(params, ["conv"])["conv"]["kernel"]
  assert targets.module_name("a.b.kernel") == "a.b"
  assert targets.module_name("a.b.w") == "a.b.w"


def test_library_default_targets_select_attention_and_mlp_kernels():
  from galore_optax import cli
  from galore_optax import memory
  params = memory.llama_abstract_params(memory.LLAMA_SHAPES["60m"])
  # The default of memory_table and of the example's --target-modules.
  mask = targets.target_mask(params, cli.parse_target_modules("attn,mlp"))
  chosen = sorted(targets.path_to_name(p) for p, v in
                  jax.tree_util.tree_flatten_with_path(mask)[0] if v)
  assert all(n.endswith(".kernel") and (".self_attn." in n or ".mlp." in n)
             for n in chosen)
  assert len(chosen) == 7 * memory.LLAMA_SHAPES["60m"].layers
