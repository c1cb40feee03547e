"""GaLore aliases: the shared GaLore keyword arguments, declared once."""

import inspect
import typing

import optax
import pytest

import galore_optax
from galore_optax import aliases
from galore_optax.aliases import GaLoreOptions

GALORE_ALIASES = (galore_optax.galore_adamw, galore_optax.galore_adamw_8bit,
                  galore_optax.galore_adafactor)


def _keyword_defaults(function, skip=()):
  return {
      p.name: p.default
      for p in inspect.signature(function).parameters.values()
      if p.kind == p.KEYWORD_ONLY and p.name not in skip
  }


def test_options_are_galore_projects_keyword_arguments():
  assert GaLoreOptions()._asdict() == _keyword_defaults(
      galore_optax.galore_project)


@pytest.mark.parametrize("alias", GALORE_ALIASES, ids=lambda f: f.__name__)
def test_aliases_take_every_option_with_its_default(alias):
  defaults = _keyword_defaults(alias)
  assert {k: defaults[k] for k in GaLoreOptions._fields} == (
      GaLoreOptions()._asdict())


@pytest.mark.parametrize("alias", GALORE_ALIASES, ids=lambda f: f.__name__)
def test_aliases_document_every_option(alias):
  for name in GaLoreOptions._fields:
    assert f"\n    {name}: " in alias.__doc__
  assert "{GaLoreOptions}" not in alias.__doc__
  assert "int8" in alias.__doc__  # projector_dtype, the drifted entry


@pytest.mark.parametrize("alias", GALORE_ALIASES, ids=lambda f: f.__name__)
def test_aliases_forward_every_option(alias, monkeypatch):
  given = GaLoreOptions(
      rank=3, update_proj_gap=7, scale=0.5, proj_type="left",
      projector_method="randomized", projector_dtype="int8",
      stagger_refresh=True, moments="project",
      matrix_axes={"attn": ([0], [1])}, seed=11)
  calls = []

  def recording_galore_project(inner, **kwargs):
    calls.append(kwargs)
    return inner

  monkeypatch.setattr(aliases, "galore_project", recording_galore_project)
  alias(1e-3, target_modules=["attn"], **given._asdict())
  assert calls == [given._asdict()]


def _options_signature(**changes):
  """A stand-in alias' keyword arguments, ``changes`` applied."""
  parameters = [inspect.Parameter("learning_rate",
                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)]
  annotations = typing.get_type_hints(GaLoreOptions)
  for name, default in {**GaLoreOptions()._asdict(), **changes}.items():
    parameters.append(inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default))
  return inspect.Signature(parameters), annotations


def _stand_in(doc="Args:\n    {GaLoreOptions}\n", **changes):
  signature, annotations = _options_signature(**changes)

  def alias(learning_rate, **kwargs):
    return optax.identity()

  alias.__signature__ = signature
  alias.__annotations__ = annotations
  alias.__doc__ = doc
  return alias


def test_stand_in_alias_is_accepted_and_documented():
  alias = aliases._takes_galore_options(_stand_in())
  assert alias.__doc__.startswith("Args:\n    rank: GaLore rank")


@pytest.mark.parametrize("changes", [{"rank": 64}, {"seed": 1},
                                     {"projector_dtype": "bfloat16"}])
def test_drifted_default_raises(changes):
  with pytest.raises(TypeError, match=next(iter(changes))):
    aliases._takes_galore_options(_stand_in(**changes))


def test_drifted_type_raises():
  alias = _stand_in()
  alias.__annotations__ = {**alias.__annotations__, "rank": float}
  with pytest.raises(TypeError, match="rank"):
    aliases._takes_galore_options(alias)


def test_missing_placeholder_raises():
  with pytest.raises(TypeError, match="GaLoreOptions"):
    aliases._takes_galore_options(_stand_in(doc="Args:\n    rank: r.\n"))
