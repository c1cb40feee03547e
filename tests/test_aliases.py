"""The ready optimizers: the shared GaLore keyword arguments, declared once;
update dtypes; 8-bit moments against their float twins on huge gradients."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
             refresh_schedule="lazy", lazy_queue_size=3, lazy_threshold=0.5,
             output="fira")


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


def _public_optimizers():
  """Every public optimizer factory, by name: the aliases through every
  ``create_optimizer`` name, and the exported transformations."""
  made = {}
  for name in galore_optax.OPTIMIZER_NAMES:
    kwargs = {}
    base, _ = galore_optax.names.parse_optimizer_name(name)
    if base in galore_optax.names.PROJECTED_NAMES:
      kwargs = dict(target_modules=["attn"], optim_args={"rank": 4})
    if "8bit" in name:  # every state leaf here quantised
      kwargs["optim_args"] = {**kwargs.get("optim_args", {}), "min_size": 16}
    made[name] = functools.partial(galore_optax.create_optimizer, name, 1e-3,
                                   **kwargs)
  made["galore_adamw_8bit(projector_dtype=int8)"] = functools.partial(
      galore_optax.galore_adamw_8bit, 1e-3, rank=4, min_size=16,
      projector_dtype="int8", target_modules=["attn"])
  made["quantize_state_8bit"] = lambda: galore_optax.quantize_state_8bit(
      optax.scale_by_adam(), min_size=16)
  made["galore_project"] = lambda: galore_optax.galore_project(
      optax.scale_by_adam(), rank=4)
  made["scale_by_adafactor"] = lambda: galore_optax.scale_by_adafactor(1e-3)
  return made


PUBLIC_OPTIMIZERS = _public_optimizers()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", list(PUBLIC_OPTIMIZERS))
def test_updates_come_back_in_the_parameter_dtype(name, dtype):
  # A projected matrix, a full-rank vector and a small bias (abstract: the
  # dtypes are fixed by tracing).
  params = {"attn": jax.ShapeDtypeStruct((32, 16), dtype),
            "embed": jax.ShapeDtypeStruct((4096,), dtype),
            "bias": jax.ShapeDtypeStruct((16,), dtype)}
  tx = PUBLIC_OPTIMIZERS[name]()
  state = jax.eval_shape(tx.init, params)
  updates, _ = jax.eval_shape(tx.update, params, state, params)
  assert {k: u.dtype for k, u in updates.items()} == {
      k: jnp.dtype(dtype) for k in params}


# One gradient entry far beyond the others: Adam's g**2 overflows to inf from
# ~1.8e19 on; inf and NaN are the non-finite cases.
SPIKES = [1e20, 1e30, 3e38, np.inf, -np.inf, np.nan]
EIGHT_BIT_AND_FLOAT = {
    "adamw_8bit": (lambda: galore_optax.adamw_8bit(1e-3, min_size=256),
                   lambda: optax.adamw(1e-3)),
    "galore_adamw_8bit": (
        lambda: galore_optax.galore_adamw_8bit(1e-3, rank=8, min_size=256),
        lambda: galore_optax.galore_adamw(1e-3, rank=8)),
}


@functools.lru_cache(maxsize=None)
def _spiked_runs(name):
  """Two steps of the 8-bit optimizer and its float twin (and of
  ``optax.adamw``) from the same gradients, the first with one spike."""
  txs = [make() for make in EIGHT_BIT_AND_FLOAT[name]] + [optax.adamw(1e-3)]

  @jax.jit
  def run(spike):
    finals = []
    for tx in txs:
      params = {"w": jnp.zeros((64, 128))}
      state = tx.init(params)
      for t in range(2):  # the second step reads the spike's 8-bit state
        g = {"w": jax.random.normal(jax.random.key(t), (64, 128))}
        if t == 0:
          g = {"w": g["w"].at[0, 5].set(spike)}
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
      finals.append(params["w"])
    return finals

  return run


@pytest.mark.parametrize("spike", SPIKES)
@pytest.mark.parametrize("name", list(EIGHT_BIT_AND_FLOAT))
def test_a_huge_gradient_entry_spoils_no_8bit_block(name, spike):
  eight_bit, twin, adamw = map(np.asarray,
                               _spiked_runs(name)(jnp.float32(spike)))
  # Non-finite exactly where the float optimizer is; for a finite spike
  # nowhere, as optax.adamw.
  np.testing.assert_array_equal(np.isfinite(eight_bit), np.isfinite(twin))
  if np.isfinite(spike):
    assert np.isfinite(adamw).all() and np.isfinite(eight_bit).all()
  if name == "adamw_8bit":
    # Blocks other than the spike's move as optax.adamw's, to 8-bit
    # precision. (In the spike's block, the finite moments are scaled by
    # the spike's mu; in GaLore its projected column reaches every block.)
    rest, rest_twin = eight_bit.reshape(-1)[256:], twin.reshape(-1)[256:]
    moved = np.mean(np.abs(rest_twin))
    assert np.mean(np.abs(rest - rest_twin)) < 0.02 * moved
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
