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
