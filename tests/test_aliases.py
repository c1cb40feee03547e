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
             matrix_axes={"attn": ([0], [1])}, seed=11,
             refresh_schedule="lazy", lazy_queue_size=3, lazy_threshold=0.5)


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
