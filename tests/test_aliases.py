"""GaLore aliases: the shared GaLore keyword arguments, declared once."""

import inspect

import pytest

import galore_optax
from galore_optax import aliases
from galore_optax.aliases import GaLoreOptions

GALORE_ALIASES = (galore_optax.galore_adamw, galore_optax.galore_adamw_8bit,
                  galore_optax.galore_adafactor)
GIVEN = dict(rank=3, update_proj_gap=7, scale=0.5, proj_type="left",
             projector_method="randomized", projector_dtype="int8",
             stagger_refresh=True, moments="project",
             matrix_axes={"attn": ([0], [1])}, seed=11, output="fira")


def test_options_are_galore_projects_keyword_arguments():
  keyword_only = [
      p.name for p in inspect.signature(
          galore_optax.galore_project).parameters.values()
      if p.kind == p.KEYWORD_ONLY]
  assert list(GaLoreOptions.__annotations__) == keyword_only
  assert set(GIVEN) == set(keyword_only)


def test_option_defaults_are_hugging_faces():
  defaults = aliases.galore_option_defaults()
  assert {k: defaults[k] for k in ("rank", "update_proj_gap", "scale",
                                   "proj_type")} == dict(
      rank=128, update_proj_gap=200, scale=0.25, proj_type="std")


@pytest.mark.parametrize("alias", GALORE_ALIASES, ids=lambda f: f.__name__)
def test_aliases_take_the_options_as_galore_options(alias):
  assert "galore_options: Unpack[GaLoreOptions]" in str(
      alias.__annotations__["galore_options"]) or (
          alias.__annotations__["galore_options"] == "Unpack[GaLoreOptions]")
  assert "**galore_options: ``GaLoreOptions``" in alias.__doc__


@pytest.mark.parametrize("alias", GALORE_ALIASES, ids=lambda f: f.__name__)
def test_aliases_list_every_option_in_their_signature(alias):
  # What help(), optax.inject_hyperparams and create_optimizer read.
  parameters = inspect.signature(alias).parameters
  assert "galore_options" not in parameters
  assert {name: parameters[name].default for name in GaLoreOptions.__annotations__
          } == aliases.galore_option_defaults()
  assert all(parameters[name].kind == inspect.Parameter.KEYWORD_ONLY
             for name in GaLoreOptions.__annotations__)


@pytest.mark.parametrize("alias", GALORE_ALIASES, ids=lambda f: f.__name__)
def test_aliases_forward_every_option(alias, monkeypatch):
  calls = []

  def recording_galore_project(inner, **kwargs):
    calls.append(kwargs)
    return inner

  monkeypatch.setattr(aliases, "galore_project", recording_galore_project)
  alias(1e-3, target_modules=["attn"], **GIVEN)
  assert calls == [GIVEN]


@pytest.mark.parametrize("alias", GALORE_ALIASES, ids=lambda f: f.__name__)
def test_an_unknown_option_raises_at_construction(alias):
  with pytest.raises(TypeError, match=r"\['rnak'\]"):
    alias(1e-3, rnak=4)


# Fira and APOLLO: the same options, forwarded with their ``output`` rule;
# APOLLO's defaults are Hugging Face's apollo_adamw / the paper's Mini.
SUCCESSORS = {
    galore_optax.fira_adamw: ("fira", {}),
    galore_optax.apollo_adamw: ("apollo_channel",
                                dict(scale=1.0, projector_method="random")),
    galore_optax.apollo_mini: ("apollo_tensor",
                               dict(rank=1, scale=128.0,
                                    projector_method="random")),
}


@pytest.mark.parametrize("alias", SUCCESSORS, ids=lambda f: f.__name__)
def test_successors_forward_every_option_and_their_rule(alias, monkeypatch):
  calls = []

  def recording_galore_project(inner, **kwargs):
    calls.append(kwargs)
    return inner

  output, defaults = SUCCESSORS[alias]
  listed = {**aliases.galore_option_defaults(), **defaults}
  del listed["output"]  # set by the alias
  given = {k: v for k, v in GIVEN.items() if k != "output"}
  monkeypatch.setattr(aliases, "galore_project", recording_galore_project)
  alias(1e-3, target_modules=["attn"], **given)
  assert calls == [{**given, "output": output}]
  calls.clear()
  alias(1e-3)
  assert calls == [{**defaults, "output": output}]
  parameters = inspect.signature(alias).parameters
  assert {name: parameters[name].default for name in listed} == listed
  assert "output" not in parameters
  with pytest.raises(TypeError, match=r"\['rnak'\]"):
    alias(1e-3, rnak=4)
  with pytest.raises(TypeError, match="output"):
    alias(1e-3, output="galore")
