"""state_fields: which leaves of an optax state are second moments."""

from typing import NamedTuple

import jax
import numpy as np
import optax

from galore_optax import ScaleByFactoredRmsHfState
from galore_optax import scale_by_factored_rms_hf
from galore_optax import state_fields


class _SignedV(NamedTuple):
  count: jax.Array
  v: dict


def _flags(state):
  return {jax.tree_util.keystr(p): state_fields.is_second_moment(state, p)
          for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]}


def test_factored_states_are_recognised_by_their_fields():
  params = {"w": np.ones((300, 200))}
  optax_state = jax.eval_shape(optax.scale_by_factored_rms().init, params)
  ours = jax.eval_shape(scale_by_factored_rms_hf().init, params)
  assert isinstance(ours, ScaleByFactoredRmsHfState)
  assert state_fields.is_factored_state(optax_state)
  assert state_fields.is_factored_state(ours)
  assert not state_fields.is_factored_state(_SignedV(np.zeros(()), {}))
  assert not state_fields.is_factored_state(("v_row", "v_col"))


def test_v_is_only_a_second_moment_in_factored_states():
  ours = jax.eval_shape(scale_by_factored_rms_hf().init,
                        {"m": np.ones((4, 3)), "b": np.ones((5,))})
  flags = _flags(ours)
  assert flags[".v_row['m']"] and flags[".v_col['m']"] and flags[".v['b']"]
  assert not flags[".count"]
  signed = _SignedV(np.zeros(()), {"w": np.ones(3)})
  assert not _flags(signed)[".v['w']"]


def test_nu_fields_and_not_parameter_names():
  params = {"nu": np.ones(2), "v_row": np.ones(2)}
  adam = jax.eval_shape(optax.scale_by_adam().init, params)
  flags = _flags(adam)
  assert flags[".nu['nu']"] and flags[".nu['v_row']"]
  assert not flags[".mu['nu']"] and not flags[".mu['v_row']"]
  amsgrad = jax.eval_shape(optax.scale_by_amsgrad().init, params)
  assert _flags(amsgrad)[".nu_max['nu']"]


def test_is_namedtuple():
  assert state_fields.is_namedtuple(optax.EmptyState())
  assert not state_fields.is_namedtuple((1, 2))
  assert not state_fields.is_namedtuple([1])
