"""create_optimizer: Hugging Face optimizer names and the optim_args string."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_optax
from galore_optax import OPTIMIZER_NAMES
from galore_optax import create_optimizer
from galore_optax import names
from galore_optax import optimizer_arguments
from galore_optax import parse_optim_args
from galore_optax import parse_optimizer_name

PARAMS = {"attn": {"kernel": jnp.zeros((8, 6))}, "norm": jnp.zeros((6,))}
GALORE = ("galore_adamw", "galore_adamw_8bit", "galore_adafactor")
# Every optimizer that projects target matrices (needs target_modules).
PROJECTED = GALORE + ("fira_adamw", "apollo_adamw")
DIRECT = {
    "adamw": lambda lr, **kw: optax.adamw(lr, weight_decay=0.0, **kw),
    "adamw_8bit": galore_optax.adamw_8bit,
    "galore_adamw": galore_optax.galore_adamw,
    "galore_adamw_8bit": galore_optax.galore_adamw_8bit,
    "galore_adafactor": galore_optax.galore_adafactor,
    "fira_adamw": galore_optax.fira_adamw,
    "apollo_adamw": galore_optax.apollo_adamw,
}


def _abstract_state(tx):
  """The state's structure, shapes and dtypes, without computing it."""
  return jax.eval_shape(tx.init, PARAMS)


def _targets(name):
  return ["attn"] if parse_optimizer_name(name)[0] in PROJECTED else None


def test_names_cover_hugging_face_and_layerwise_variants():
  for name in ("adamw", "adamw_8bit", *GALORE,
               *(n + "_layerwise" for n in GALORE)):
    assert name in OPTIMIZER_NAMES
  assert "adamw_layerwise" not in OPTIMIZER_NAMES


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_name_builds_its_optimizer(name):
  base, layerwise = parse_optimizer_name(name)
  assert layerwise == name.endswith("_layerwise")
  tx = create_optimizer(name, 1e-3, target_modules=_targets(name),
                        optim_args="rank=4" if base in PROJECTED else None)
  kwargs = ({"target_modules": ["attn"], "rank": 4} if base in PROJECTED
            else {})
  expected = DIRECT[base](1e-3, **kwargs)
  # Same transformation: same state structure, shapes and dtypes.
  assert _abstract_state(tx) == _abstract_state(expected)


@pytest.mark.parametrize("name, expected", [
    ("galore_adamw", ("galore_adamw", False)),
    ("galore_adamw_8bit_layerwise", ("galore_adamw_8bit", True)),
    ("galore_adafactor_layerwise", ("galore_adafactor", True)),
    ("adamw_torch", ("adamw", False)),
    ("adamw_torch_fused", ("adamw", False)),
    ("adamw_bnb_8bit", ("adamw_8bit", False)),
    ("  GaLore_AdamW_Layerwise ", ("galore_adamw", True)),
])
def test_parse_optimizer_name(name, expected):
  assert parse_optimizer_name(name) == expected


@pytest.mark.parametrize("name", ["sgd", "adamw_layerwise",
                                  "adamw_8bit_layerwise", "galore_lion",
                                  "galore_adamw_layerwise_layerwise", "",
                                  None])
def test_unknown_names_list_the_accepted_ones(name):
  with pytest.raises(ValueError, match="galore_adamw") as e:
    create_optimizer(name, 1e-3, target_modules=["attn"])
  if name is not None:
    assert "galore_adafactor_layerwise" in str(e.value)


def test_hugging_face_galore_defaults():
  for name in GALORE:
    args = optimizer_arguments(name)
    assert (args["rank"], args["update_proj_gap"], args["scale"],
            args["proj_type"]) == (128, 200, 0.25, "std")


def test_accepted_keys_come_from_the_signature():
  assert set(optimizer_arguments("galore_adafactor")) >= {
      "rank", "update_proj_gap", "scale", "proj_type", "beta1", "decay_rate",
      "eps", "clip_threshold", "weight_decay_mask", "projector_method"}
  for name in OPTIMIZER_NAMES:
    assert not {"learning_rate", "weight_decay", "target_modules"} & set(
        optimizer_arguments(name))
  assert "nesterov" in optimizer_arguments("adamw")  # optax.adamw's own


class _Recorder:
  """Stands in for a factory and records how it was called."""

  def __init__(self, real):
    self.real = real
    self.calls = []
    self.__signature__ = inspect.signature(real)  # the accepted keys

  def __call__(self, learning_rate, **kwargs):
    self.calls.append((learning_rate, kwargs))
    return self.real(learning_rate, **kwargs)


@pytest.fixture
def recorded(monkeypatch):
  recorders = {}
  for base, factory in dict(names._FACTORIES).items():
    recorders[base] = _Recorder(factory)
    monkeypatch.setitem(names._FACTORIES, base, recorders[base])
  return recorders


def test_hugging_face_optim_args_string_is_forwarded(recorded):
  create_optimizer(
      "galore_adamw_layerwise", 0.01, target_modules=[".*attn.*"],
      optim_args="rank=64, update_proj_gap=100, scale=0.10, proj_type=std",
      weight_decay=0.1)
  (lr, kwargs), = recorded["galore_adamw"].calls
  assert lr == 0.01
  assert kwargs == {"rank": 64, "update_proj_gap": 100, "scale": 0.1,
                    "proj_type": "std", "weight_decay": 0.1,
                    "target_modules": [".*attn.*"]}
  assert type(kwargs["rank"]) is int and type(kwargs["scale"]) is float


def test_defaults_are_not_passed_explicitly(recorded):
  create_optimizer("galore_adafactor", 0.01, target_modules=["attn"])
  (_, kwargs), = recorded["galore_adafactor"].calls
  assert kwargs == {"weight_decay": 0.0, "target_modules": ["attn"]}


def test_adamw_uses_torch_defaults_not_optax_weight_decay(recorded):
  tx = create_optimizer("adamw_torch", 0.01)
  (_, kwargs), = recorded["adamw"].calls
  assert kwargs == {"weight_decay": 0.0}  # optax.adamw's own default is 1e-4
  params = {"w": jnp.ones((3,))}
  grads = {"w": jnp.array([1.0, -2.0, 0.5])}
  ours, _ = tx.update(grads, tx.init(params), params)
  ref = optax.adamw(0.01, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
  theirs, _ = ref.update(grads, ref.init(params), params)
  np.testing.assert_allclose(ours["w"], theirs["w"])


def test_optim_args_values_are_typed_by_the_argument(recorded):
  create_optimizer(
      "galore_adafactor", 0.01, target_modules=["attn"],
      optim_args=" rank = 4 ,scale=1, beta1=0.9, clip_threshold=2, "
      "stagger_refresh=TRUE, projector_dtype='bfloat16', proj_type=left,")
  (_, kwargs), = recorded["galore_adafactor"].calls
  assert kwargs["rank"] == 4 and type(kwargs["rank"]) is int
  assert kwargs["scale"] == 1.0 and type(kwargs["scale"]) is float
  assert kwargs["clip_threshold"] == 2.0
  assert kwargs["beta1"] == 0.9 and kwargs["stagger_refresh"] is True
  assert kwargs["projector_dtype"] == "bfloat16"
  assert kwargs["proj_type"] == "left"


def test_optim_args_dict_and_python_kwargs(recorded):
  create_optimizer("galore_adamw_8bit", 0.01, target_modules="all-linear",
                   optim_args={"rank": "16", "scale": 0.5},
                   projector_method="randomized", b1=0.8)
  (_, kwargs), = recorded["galore_adamw_8bit"].calls
  assert kwargs["rank"] == 16 and kwargs["scale"] == 0.5
  assert kwargs["projector_method"] == "randomized" and kwargs["b1"] == 0.8
  assert kwargs["target_modules"] == "all-linear"


def test_optim_args_reach_the_optimizer():
  """Not only forwarded: rank and proj_type change the state's shapes."""
  tx = create_optimizer("galore_adamw", 0.01, target_modules=["attn"],
                        optim_args="rank=2, proj_type=left")
  state = _abstract_state(tx)
  projector = state[0].inner_states["galore"].inner_state.projectors[
      "attn.kernel"]
  assert projector.left.shape == (8, 2)


@pytest.mark.parametrize("text, expected", [
    ("rank=64, update_proj_gap=100, scale=0.10, proj_type=std",
     {"rank": 64, "update_proj_gap": 100, "scale": 0.1, "proj_type": "std"}),
    ("  rank=64,scale = 1e-3 ,  ", {"rank": 64, "scale": 1e-3}),
    ("a=true, b=False, c=None, d=null, e='x y', f=\"3\", g=-2, h=+.5",
     {"a": True, "b": False, "c": None, "d": None, "e": "x y", "f": "3",
      "g": -2, "h": 0.5}),
    ("rank=1,,scale=2", {"rank": 1, "scale": 2}),
    ("", {}),
    (" , ", {}),
    (None, {}),
    ({"rank": "8", "scale": 0.5, "b": True}, {"rank": 8, "scale": 0.5,
                                               "b": True}),
])
def test_parse_optim_args(text, expected):
  parsed = parse_optim_args(text)
  assert parsed == expected
  for k, v in expected.items():
    assert type(parsed[k]) is type(v)


@pytest.mark.parametrize("text", ["rank", "=3", "rank=", "rank=1, scale",
                                  "ra nk=3", "rank=1, rank=2", "1rank=2"])
def test_malformed_optim_args_raise(text):
  with pytest.raises(ValueError, match=r"key=value|twice"):
    parse_optim_args(text)
  with pytest.raises(ValueError):
    create_optimizer("galore_adamw", 0.01, target_modules=["attn"],
                     optim_args=text)


def test_optim_args_of_a_wrong_type_raise():
  with pytest.raises(ValueError, match="must be None, a string"):
    parse_optim_args(["rank=3"])
  with pytest.raises(ValueError, match="argument names"):
    parse_optim_args({1: 2})


@pytest.mark.parametrize("text, match", [
    ("rank=abc", "expected an integer"),
    ("rank=1.5", "expected an integer"),
    ("rank=true", "expected an integer"),
    ("update_proj_gap=1e2", "expected an integer"),
    ("scale=abc", "expected a number"),
    ("scale=false", "expected a number"),
    ("stagger_refresh=yes", "expected true or false"),
    ("proj_type=diagonal", "proj_type must be one of"),  # the alias' check
    ("rank=0", "rank must be a positive integer"),
    ("scale=nan", "scale must be finite"),
])
def test_malformed_values_raise(text, match):
  with pytest.raises(ValueError, match=match):
    create_optimizer("galore_adamw", 0.01, target_modules=["attn"],
                     optim_args=text)


def test_unknown_keys_list_the_accepted_ones():
  with pytest.raises(ValueError, match=r"\['rnak'\].*accepted keys.*'rank'"):
    create_optimizer("galore_adamw", 0.01, target_modules=["attn"],
                     optim_args="rnak=3")
  # Keys are per optimizer: Adafactor's decay_rate is not AdamW's.
  with pytest.raises(ValueError, match="accepted keys.*'b1'"):
    create_optimizer("galore_adamw", 0.01, target_modules=["attn"],
                     optim_args="decay_rate=-0.8")
  with pytest.raises(ValueError, match="accepted keys.*'beta1'"):
    create_optimizer("galore_adafactor", 0.01, target_modules=["attn"],
                     b1=0.9)
  with pytest.raises(ValueError, match="accepted keys"):
    create_optimizer("adamw", 0.01, optim_args="rank=8")


@pytest.mark.parametrize("key", ["weight_decay", "learning_rate",
                                 "target_modules"])
def test_dedicated_arguments_cannot_come_from_optim_args(key):
  with pytest.raises(ValueError, match="own learning_rate, weight_decay"):
    create_optimizer("galore_adamw", 0.01, target_modules=["attn"],
                     optim_args=f"{key}=1")


def test_key_in_both_optim_args_and_kwargs_raises():
  with pytest.raises(ValueError, match="both in optim_args"):
    create_optimizer("galore_adamw", 0.01, target_modules=["attn"],
                     optim_args="rank=4", rank=8)


@pytest.mark.parametrize("name", [*GALORE, "galore_adamw_layerwise"])
def test_galore_names_require_target_modules(name):
  with pytest.raises(ValueError, match="needs target_modules"):
    create_optimizer(name, 0.01)


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit"])
def test_target_modules_rejected_for_other_optimizers(name):
  with pytest.raises(ValueError, match="only applies to the GaLore"):
    create_optimizer(name, 0.01, target_modules=["attn"])


def test_learning_rate_schedule_is_accepted():
  schedule = optax.cosine_decay_schedule(0.01, 100)
  tx = create_optimizer("galore_adafactor", schedule, target_modules=["attn"],
                        optim_args="rank=2", weight_decay=0.1)
  assert _abstract_state(tx) == _abstract_state(galore_optax.galore_adafactor(
      schedule, rank=2, weight_decay=0.1, target_modules=["attn"]))


def test_hugging_face_apollo_mini_optim_args():
  # transformers' apollo branch: optim_args keys proj, rank, scale,
  # scale_type, update_proj_gap (and proj_type); "proj" is our
  # projector_method. The APOLLO-Mini string builds apollo_mini.
  tx = create_optimizer(
      "apollo_adamw_layerwise", 1e-3, target_modules=["attn"],
      optim_args="proj=random,rank=1,scale=128.0,scale_type=tensor,"
      "update_proj_gap=200,proj_type=std")
  expected = galore_optax.apollo_mini(1e-3, target_modules=["attn"])
  assert _abstract_state(tx) == _abstract_state(expected)
  grads = {"attn": {"kernel": jnp.ones((8, 6))}, "norm": jnp.ones((6,))}
  ours = tx.update(grads, tx.init(PARAMS), PARAMS)[0]
  theirs = expected.update(grads, expected.init(PARAMS), PARAMS)[0]
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)


def test_apollo_defaults_are_hugging_faces():
  args = optimizer_arguments("apollo_adamw")
  assert (args["rank"], args["update_proj_gap"], args["scale"],
          args["scale_type"], args["projector_method"], args["proj_type"]) == (
              128, 200, 1.0, "channel", "random", "std")
