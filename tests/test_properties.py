"""Property-based checks of every public optimizer on unusual but legal inputs.

Each case is one optimizer (an alias, ``galore_project`` over Adam, a few
``create_optimizer`` names, or a per-layer step), one tree layout and one
parameter dtype; hypothesis draws the gradients of three updates (projector
refreshes at updates 0 and 2): per leaf and update a magnitude (0, subnormal,
1e-30, 1, 1e30) and optionally one entry replaced by a spike (the dtype's
largest finite value, +-1e30, a subnormal, NaN, +-Inf). Gradients are built
in float64 and rounded once to the parameter dtype, so every optimizer and
the reference see the same bits (1e30 is Inf in float16, 1e-30 is 0). The
properties, checked after every update:

1. No crash (``init`` and ``update``, zero-size leaves included).
2. No non-finite parameter that ``optax.adamw`` (same b1, b2, eps, learning
   rate) does not also produce on the same gradients. Element-wise
   optimizers (8-bit AdamW, non-projected Adam leaves) are compared entry by
   entry: a non-finite gradient entry or block maximum must not poison its
   neighbours. An update that mixes the entries of a matrix cannot keep a
   non-finite gradient entry in its own entry (a projection sums a row or a
   column of the gradient; Adafactor's factored second moment and its RMS
   clipping reduce over the matrix), so for GaLore-projected and Adafactor
   leaves the unit is each matrix (each matrix of a stacked leaf on its own;
   a 1-D Adafactor leaf as a whole): a unit where ``optax.adamw`` is finite
   everywhere must be finite everywhere.
3. Updates and new parameters have the parameter dtype exactly.

The tree is fixed (jit caches hit across examples): ordinary, stacked
(``(L, m, n)``), one-sized and zero-size leaves, two of equal shape
(refreshed in one batch). Steps are compiled once per (optimizer, layout,
dtype) with cheap XLA options.

Complex parameters are either refused at ``init`` with a message that says
so, or supported: complex updates whose imaginary part is not dropped.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_optax
from galore_optax import layerwise

FAST = {"xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True}
LR = 1e-2
STEPS = 3  # refreshes at updates 0 and 2 (update_proj_gap=2)
GALORE = {"rank": 2, "update_proj_gap": 2}
EIGHT_BIT = {"min_size": 16, "block_size": 16}  # several blocks per leaf
TARGETS = ["q_proj", "k_proj", "mlp", "layers"]  # exact module names

# One tree (jit caches hit across examples): ordinary, stacked ``(L, m, n)``
# and one-sized leaves, two of equal shape (refreshed in one batch), and
# zero-size leaves, whose module names contain the targets' names.
LAYOUTS = {
    "mixed": {
        "q_proj": {"kernel": (16, 4)},   # equal shapes: one refresh batch
        "k_proj": {"kernel": (16, 4)},
        "mlp": {"kernel": (2, 8, 4), "bias": (4,)},  # stacked matrices
        "layers": {"kernel": (3, 1, 5)},  # stacked 1 x n
        "o_proj": {"kernel": (1, 6)},
        "v_proj": {"kernel": (6, 1)},
        "gate_proj": {"kernel": (1, 1)},
        "norm": {"scale": (1,)},
        "embed": {"embedding": (12, 4)},
        "empty": {
            "q_proj": {"kernel": (0, 4)},
            "k_proj": {"kernel": (4, 0)},
            "mlp": {"kernel": (2, 0, 4), "bias": (0,)},
            "layers": {"kernel": (0, 4, 3)},
            "norm": {"scale": (0,)},
        },
    },
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "float16": jnp.float16}

# How far a non-finite input may spread, per leaf (see the docstring).
ENTRY, MATRIX, LEAF = "entry", "matrix", "leaf"


def _targeted(params, target_modules):
  mask = galore_optax.target_mask(params, target_modules)
  return lambda path, leaf: bool(_at(mask, path))


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def _element_wise(params):
  del params
  return lambda path, leaf: ENTRY


def _projected(target_modules):
  """GaLore over Adam: targets mix their matrix, other leaves are Adam."""

  def units(params):
    targeted = _targeted(params, target_modules)
    return lambda path, leaf: MATRIX if targeted(path, leaf) else ENTRY

  return units


def _adafactor(params):
  del params
  return lambda path, leaf: MATRIX if leaf.ndim >= 2 else LEAF


class Optimizer:
  """An optimizer under test: its factory and how far inputs may spread."""

  def __init__(self, make: Callable[[], optax.GradientTransformation],
               units: Callable, per_layer: bool = False):
    self.make = make
    self.units = units
    self.per_layer = per_layer


def _galore_project():
  return galore_optax.galore_project(
      optax.scale_by_adam(), proj_type="full", projector_method="randomized",
      **GALORE)


OPTIMIZERS = {
    "adamw_8bit": Optimizer(
        lambda: galore_optax.adamw_8bit(LR, **EIGHT_BIT), _element_wise),
    "galore_adamw": Optimizer(
        lambda: galore_optax.galore_adamw(LR, **GALORE), _projected(None)),
    "galore_adamw_8bit": Optimizer(
        lambda: galore_optax.galore_adamw_8bit(LR, **GALORE, **EIGHT_BIT),
        _projected(None)),
    "galore_adafactor": Optimizer(
        lambda: galore_optax.galore_adafactor(LR, **GALORE), _adafactor),
    "galore_project(scale_by_adam)": Optimizer(_galore_project,
                                               _projected(None)),
    "create_optimizer(adamw_bnb_8bit)": Optimizer(
        lambda: galore_optax.create_optimizer(
            "adamw_bnb_8bit", LR, optim_args="min_size=16, block_size=16"),
        _element_wise),
    "create_optimizer(galore_adamw_8bit)": Optimizer(
        lambda: galore_optax.create_optimizer(
            "galore_adamw_8bit", LR, target_modules=TARGETS,
            optim_args="rank=2, update_proj_gap=2, proj_type=reverse_std, "
                       "projector_dtype=int8, min_size=16, block_size=16"),
        _projected(TARGETS)),
    "create_optimizer(galore_adamw)": Optimizer(
        lambda: galore_optax.create_optimizer(
            "galore_adamw", LR, target_modules=TARGETS,
            optim_args="rank=2, update_proj_gap=2, proj_type=left, "
                       "projector_dtype=bfloat16, stagger_refresh=true"),
        _projected(TARGETS)),
    "create_optimizer(galore_adafactor)": Optimizer(
        lambda: galore_optax.create_optimizer(
            "galore_adafactor", LR, target_modules=TARGETS,
            optim_args="rank=2, update_proj_gap=2, beta1=0.9, "
                       "proj_type=right"),
        _adafactor),
    "fira_adamw": Optimizer(
        lambda: galore_optax.fira_adamw(LR, **GALORE), _projected(None)),
    "apollo_adamw": Optimizer(
        lambda: galore_optax.apollo_adamw(LR, **GALORE), _projected(None)),
    "apollo_mini(state_8bit)": Optimizer(
        lambda: galore_optax.apollo_mini(LR, update_proj_gap=2,
                                         state_8bit=True, **EIGHT_BIT),
        _projected(None)),
    "layerwise(galore_adamw_8bit)": Optimizer(
        lambda: galore_optax.galore_adamw_8bit(LR, **GALORE, **EIGHT_BIT),
        _projected(None), per_layer=True),
    "layerwise(galore_adafactor)": Optimizer(
        lambda: galore_optax.galore_adafactor(LR, **GALORE), _adafactor,
        per_layer=True),
    "layerwise(adamw_8bit)": Optimizer(
        lambda: galore_optax.adamw_8bit(LR, **EIGHT_BIT), _element_wise,
        per_layer=True),
}


def _params(layout, dtype):
  """Fixed, distinct parameter values of the layout's shapes."""
  shapes = LAYOUTS[layout]
  leaves, treedef = jax.tree.flatten(
      shapes, is_leaf=lambda x: isinstance(x, tuple))
  rng = np.random.default_rng(0)
  return treedef.unflatten([
      np.asarray(0.1 * rng.standard_normal(s), DTYPES[dtype]) for s in leaves])


def _linear_term(p, g):
  if jnp.iscomplexobj(p):
    return jnp.sum(jnp.real(p * g))  # jax.grad of Re(g p) is g
  return jnp.sum(p.astype(jnp.float32) * g.astype(jnp.float32))


def _linear_loss(params, grads):
  """A loss whose gradient with respect to ``params`` is exactly ``grads``."""
  return sum(jax.tree.leaves(jax.tree.map(_linear_term, params, grads)))


@functools.lru_cache(maxsize=None)
def _run_reference(layout, dtype):
  """optax.adamw's parameters after each update, compiled once."""
  tx = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)

  def run(params, grads_per_step):
    state, out = tx.init(params), []
    for grads in grads_per_step:
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      out.append(params)
    return out

  return jax.jit(run, compiler_options=FAST)


@functools.lru_cache(maxsize=None)
def _run(name, layout, dtype):
  """Our (updates, parameters) after each update, compiled once."""
  optimizer = OPTIMIZERS[name]
  tx = optimizer.make()
  if optimizer.per_layer:
    init, step = layerwise.make_layerwise_step(_linear_loss, tx, jit=False,
                                               donate=False)

    def run(params, grads_per_step):
      state, out = init(params), []
      for grads in grads_per_step:
        new_params, state, _ = step(params, state, grads)
        out.append((None, new_params))
        params = new_params
      return out
  else:

    def run(params, grads_per_step):
      state, out = tx.init(params), []
      for grads in grads_per_step:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append((updates, params))
      return out

  return jax.jit(run, compiler_options=FAST)


# Gradient values, named so that a failing example reads as the input.
# Hypothesis shrinks towards the first magnitude and towards no spikes.
MAGNITUDES = ("one", "zero", "subnormal", "1e-30", "1e30")
SPIKES = ("max", "1e30", "-1e30", "subnormal", "nan", "inf", "-inf")


class Spike(NamedTuple):
  """One gradient entry replaced by ``value`` at ``update``."""
  update: int
  leaf: str
  index: int  # into the flattened leaf, modulo its size
  value: str


def _value(kind, dtype):
  finfo = jnp.finfo(dtype)
  named = {"one": 1.0, "zero": 0.0, "subnormal": float(finfo.tiny) / 4,
           "max": float(finfo.max), "nan": np.nan, "inf": np.inf,
           "-inf": -np.inf}
  return named[kind] if kind in named else float(kind)


def _names(params):
  return [jax.tree_util.keystr(path, simple=True, separator=".")
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _gradients(params, magnitudes, spikes):
  """One tree of gradients per update: ``magnitudes[t]`` times a fixed
  standard normal sample, with the ``spikes`` written in; rounded once to
  the parameter dtype (ml_dtypes: no flush to zero)."""
  leaves, treedef = jax.tree.flatten(params)
  names = _names(params)
  out = []
  for t, magnitude in enumerate(magnitudes):
    grads = []
    for i, (name, p) in enumerate(zip(names, leaves)):
      g = (_value(magnitude, p.dtype)
           * np.random.default_rng(100 * t + i).standard_normal(p.shape))
      for spike in spikes:
        if spike.update == t and spike.leaf == name and g.size:
          g.flat[spike.index % g.size] = _value(spike.value, p.dtype)
      with np.errstate(over="ignore"):  # 1e30 is Inf in float16
        grads.append(np.asarray(g, p.dtype))
    out.append(treedef.unflatten(grads))
  return out


def _spread(nonfinite, unit):
  """Entries a non-finite input may reach, given the optimizer's unit."""
  if unit == ENTRY or nonfinite.size == 0:
    return nonfinite
  if unit == MATRIX and nonfinite.ndim >= 2:
    return np.broadcast_to(nonfinite.any(axis=(-2, -1), keepdims=True),
                           nonfinite.shape)
  return np.broadcast_to(nonfinite.any(), nonfinite.shape)


def _check(name, params0, updates, params, expected, t):
  """Properties 2 and 3 for update ``t``."""
  units = OPTIMIZERS[name].units(params0)
  flat = jax.tree_util.tree_flatten_with_path(params0)[0]
  new = jax.tree.leaves(params)
  ref = jax.tree.leaves(expected)
  ups = (jax.tree.leaves(updates) if updates is not None
         else [None] * len(new))
  for (path, p0), u, p, r in zip(flat, ups, new, ref):
    where = (f"update {t}, {jax.tree_util.keystr(path, simple=True, separator='.')}"
             f" {p0.shape} {p0.dtype}")
    assert p.dtype == p0.dtype, f"{where}: parameter dtype {p.dtype}"
    assert p.shape == p0.shape, f"{where}: parameter shape {p.shape}"
    if u is not None:
      assert u.dtype == p0.dtype, f"{where}: update dtype {u.dtype}"
    allowed = _spread(~np.isfinite(np.asarray(r, np.float32)),
                      units(path, p0))
    poisoned = ~np.isfinite(np.asarray(p, np.float32)) & ~allowed
    count = int(poisoned.sum())
    assert count == 0, (
        f"{where}: {count} non-finite parameters where optax.adamw's are "
        f"finite (first at {np.argwhere(poisoned)[0].tolist()})")


SETTINGS = hypothesis.settings(
    max_examples=6, deadline=None, derandomize=True, database=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow,
                           hypothesis.HealthCheck.data_too_large])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@SETTINGS
@hypothesis.given(data=st.data())
def test_edge_inputs(name, layout, dtype, data):
  params = _params(layout, dtype)
  magnitudes = data.draw(
      st.lists(st.sampled_from(MAGNITUDES), min_size=STEPS, max_size=STEPS),
      label="magnitude of each update's gradients")
  spikes = data.draw(st.lists(st.builds(
      Spike, update=st.integers(0, STEPS - 1),
      leaf=st.sampled_from(_names(params)), index=st.integers(0, 63),
      value=st.sampled_from(SPIKES)), max_size=3), label="spikes")
  grads = _gradients(params, magnitudes, spikes)
  expected = _run_reference(layout, dtype)(params, grads)
  ours = _run(name, layout, dtype)(params, grads)
  for t, ((updates, new_params), ref) in enumerate(zip(ours, expected)):
    _check(name, params, updates, new_params, ref, t)


COMPLEX_PARAMS = {"q_proj": {"kernel": (8, 4)}, "mlp": {"bias": (4,)}}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_complex_parameters_are_refused_at_init_or_supported(name):
  optimizer = OPTIMIZERS[name]
  rng = np.random.default_rng(1)
  params = jax.tree.map(
      lambda s: jnp.asarray(0.1 * rng.standard_normal(s), jnp.complex64),
      COMPLEX_PARAMS, is_leaf=lambda x: isinstance(x, tuple))
  # Purely imaginary gradients: dropping the imaginary part leaves nothing.
  grads = jax.tree.map(
      lambda p: jnp.asarray(1j * rng.standard_normal(p.shape), p.dtype),
      params)
  tx = optimizer.make()
  init = tx.init
  if optimizer.per_layer:
    init, step = layerwise.make_layerwise_step(_linear_loss, tx,
                                               donate=False)
  try:
    state = init(params)
  except (TypeError, ValueError) as e:
    assert "complex" in str(e).lower(), f"unclear refusal: {e}"
    return
  if optimizer.per_layer:
    new_params, _, _ = step(params, state, grads)
    updates = jax.tree.map(lambda a, b: a - b, new_params, params)
  else:
    updates, _ = jax.jit(tx.update)(grads, state, params)
  for u in jax.tree.leaves(updates):
    assert u.dtype == jnp.complex64
    assert bool(jnp.all(jnp.isfinite(u)))
    assert bool(jnp.any(jnp.imag(u) != 0)), "imaginary part dropped"
