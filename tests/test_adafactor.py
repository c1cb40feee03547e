"""galore_adafactor and its primitives against galore_torch.GaLoreAdafactor.

The fixture comes from ``tests/fixtures/generate_galore_torch.py`` running the
real reference (torch 2.13, galore-torch 1.0): one optimizer with a GaLore
matrix ``w`` (rank 8, gap 4, scale 0.25, std), a plain matrix ``mat`` and a
plain vector ``vec``; lr 0.01, eps 1e-30, clip 1.0, decay_rate -0.8,
beta1 None or 0.9, 10 steps; parameters and states after every step.

What is comparable, and how:

* ``canonical/`` cases ran the reference with our singular-vector sign
  convention: parameters, states and projectors at every step.
* Raw (LAPACK-sign) cases: without ``beta1`` Adafactor only keeps statistics
  of *squared* projected gradients, and its update ``g * r * c`` flips with
  ``g``, so a sign flip of a singular vector cancels exactly, across
  refreshes too: all steps are compared. With ``beta1`` the first moment
  carried into the next window remembers the old signs: the GaLore
  parameter is compared in the first window (steps 0-3) only.
* ``mat`` and ``vec`` never see a projector: all steps, every case.

Tolerances are float32 rounding: the measured worst parameter error is
1.2e-7 (4.8e-7 with weight decay) on parameters of size ~1.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from galore_optax import ScaleByFactoredRmsHfState
from galore_optax import clip_by_matrix_rms
from galore_optax import galore_adafactor
from galore_optax import quantization
from galore_optax import quantize_state_8bit
from galore_optax import scale_by_adafactor
from galore_optax import scale_by_factored_rms_hf
from galore_optax.state_fields import is_second_moment

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
RTOL, ATOL = 1e-6, 1e-6  # a few float32 ulps of parameters ~1
STATE_RTOL = 1e-5  # second moments are ~1e3: relative float32 rounding
STEPS = 10
REFRESHES = (0, 4, 8)


@pytest.fixture(scope="module")
def ref():
  with np.load(FIXTURES / "galore_torch_adafactor.npz") as f:
    return {k: f[k] for k in f.keys() if k != "__meta__"}


# Everything that fixes shapes or the program structure; the numeric
# hyper-parameters are traced (optax.inject_hyperparams), and both GaLore
# shapes train side by side in one parameter tree (their projectors and
# states are per leaf), so that all runs with or without beta1 share one
# compilation (compiling the chain takes seconds on two cores, running it
# milliseconds).
_STATIC = ("rank", "update_proj_gap", "proj_type", "target_modules",
           "projector_method", "projector_dtype", "stagger_refresh", "seed")
_REFERENCE_SETTINGS = {"scale": 0.25, "decay_rate": -0.8, "eps": 1e-30,
                       "clip_threshold": 1.0, "weight_decay": 0.0}
_TARGETS = "tall|wide"


@functools.lru_cache(maxsize=None)
def _optimizer(with_beta1):
  tx = optax.inject_hyperparams(galore_adafactor, static_args=_STATIC)(
      learning_rate=0.01, rank=8, update_proj_gap=4, proj_type="std",
      beta1=0.9 if with_beta1 else None, target_modules=_TARGETS,
      **_REFERENCE_SETTINGS)
  return tx, jax.jit(tx.update)


def _params0(ref, shapes=("tall", "wide")):
  return {k: jnp.asarray(ref[f"params0/{k}"]) for k in (*shapes, "mat", "vec")}


def _grads(ref, t, shapes=("tall", "wide")):
  return {k: ref[f"grads/{k}"][t] for k in (*shapes, "mat", "vec")}


def _snapshot(chain_state, shape):
  """The states the fixture stores, in its names, from our chain's state."""
  partition = chain_state[0]
  galore = partition.inner_states["galore"].inner_state
  full = partition.inner_states["full_rank"].inner_state
  out = {
      "exp_avg_sq_row": galore.inner_state[0].v_row[shape],
      "exp_avg_sq_col": galore.inner_state[0].v_col[shape],
      "mat/exp_avg_sq_row": full[0].v_row["mat"],
      "mat/exp_avg_sq_col": full[0].v_col["mat"],
      "vec/exp_avg_sq": full[0].v["vec"],
  }
  if len(galore.inner_state) > 3:  # with beta1
    out["exp_avg"] = galore.inner_state[3].ema[shape]
    out["mat/exp_avg"] = full[3].ema["mat"]
    out["vec/exp_avg"] = full[3].ema["vec"]
  return out, galore.projectors[shape]


def _record(out, params, chain_state):
  """Appends the fixture's per-step arrays, per GaLore shape, to ``out``."""
  for shape in out:
    states, projector = _snapshot(chain_state, shape)
    rows = {"params": params[shape], "mat/params": params["mat"],
            "vec/params": params["vec"], **states}
    for k, v in rows.items():
      out[shape].setdefault(k, []).append(np.asarray(v))
    out[shape].setdefault("projectors", []).append(projector)


_CACHE = {}


def _run(ref, shape, beta1=None, **settings):
  """Our trajectory: params, states and projectors after each step.

  Cached: the raw and canonical cases see the same gradients, so ours is the
  same run compared against both.
  """
  key = (beta1, tuple(sorted(settings.items())))
  if key not in _CACHE:
    tx, update = _optimizer(beta1 is not None)
    params = _params0(ref)
    state = tx.init(params)
    hyper = dict(state.hyperparams)
    for k, v in {**settings, **({"beta1": beta1} if beta1 else {})}.items():
      hyper[k] = jnp.asarray(v, hyper[k].dtype)
    state = state._replace(hyperparams=hyper)
    out = {"tall": {}, "wide": {}}
    for t in range(STEPS):
      updates, state = update(_grads(ref, t), state, params)
      params = optax.apply_updates(params, updates)
      _record(out, params, state.inner_state)
    _CACHE[key] = {
        s: ({k: np.stack(v) for k, v in rows.items() if k != "projectors"},
            rows["projectors"]) for s, rows in out.items()}
  return _CACHE[key][shape]


def _assert_case(ref, case, ours, galore_steps=STEPS, signed_moments=True):
  for key, values in ours.items():
    expected = ref[f"{case}/{key}"]
    steps = STEPS if "/" in key else galore_steps  # mat/..., vec/...
    tol = (dict(rtol=RTOL, atol=ATOL) if key.endswith("params")
           else dict(rtol=STATE_RTOL, atol=1e-6))
    if key == "exp_avg" and not signed_moments:
      # The low-rank first moment's columns carry the singular vectors'
      # signs; only magnitudes are comparable with LAPACK's signs.
      values, expected = np.abs(values), np.abs(expected)
    np.testing.assert_allclose(values[:steps], expected[:steps],
                               err_msg=f"{case}/{key}", **tol)


def _beta1(name):
  return None if name == "none" else 0.9


@pytest.mark.parametrize("shape", ["tall", "wide"])
@pytest.mark.parametrize("b1name", ["none", "0.9"])
def test_canonical_trajectory_matches_reference(ref, b1name, shape):
  case = f"canonical/beta1_{b1name}/{shape}"
  ours, projectors = _run(ref, shape, _beta1(b1name))
  _assert_case(ref, case, ours)
  side = "right" if shape == "tall" else "left"  # std keeps the larger side
  for window, step in enumerate(REFRESHES):
    np.testing.assert_allclose(getattr(projectors[step], side),
                               ref[f"{case}/ortho_{side}"][window], atol=2e-5)


@pytest.mark.parametrize("shape", ["tall", "wide"])
@pytest.mark.parametrize("b1name", ["none", "0.9"])
def test_raw_sign_trajectory_matches_reference(ref, b1name, shape):
  beta1 = _beta1(b1name)
  ours, _ = _run(ref, shape, beta1)
  # See the module docstring: without a first moment signs cancel for good.
  _assert_case(ref, f"beta1_{b1name}/{shape}", ours,
               galore_steps=STEPS if beta1 is None else REFRESHES[1],
               signed_moments=False)


def test_weight_decay_matches_reference(ref):
  ours, _ = _run(ref, "tall", 0.9, weight_decay=0.1)
  _assert_case(ref, "canonical/wd/beta1_0.9/tall", ours)


@pytest.mark.parametrize("wrong", [{"decay_rate": -0.5},
                                   {"clip_threshold": 2.0},
                                   {"clip_threshold": 1e9},
                                   {"scale": 0.5},
                                   {"beta1": 0.8},
                                   {"weight_decay": 0.1}])
def test_wrong_setting_is_detected(ref, wrong):
  """The comparison can fail: each deliberately wrong setting makes it.

  ``clip_threshold=1e9`` (no clipping) differing shows that the reference's
  clipping is active on these gradients.
  """
  settings = {"beta1": 0.9, **wrong}
  ours, _ = _run(ref, "tall", **settings)
  expected = ref["canonical/beta1_0.9/tall/params"]
  assert not np.allclose(ours["params"], expected, rtol=RTOL, atol=ATOL)


def test_plain_alias_with_schedule_matches_reference_and_jits_once(ref):
  """The plain alias (Python-float settings; the runs above go through
  inject_hyperparams), a schedule for the learning rate (so ``lr * wd`` is a
  schedule too), and one compilation for all steps, refreshes included."""
  traces = []
  tx = galore_adafactor(lambda count: 0.01, rank=8, update_proj_gap=4,
                        beta1=0.9, weight_decay=0.1, target_modules=_TARGETS)

  @jax.jit
  def step(params, state, grads):
    traces.append(None)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = _params0(ref, ["tall"])  # one GaLore leaf: half the compile time
  state = tx.init(params)
  out = {"tall": {}}
  for t in range(STEPS):
    params, state = step(params, state, _grads(ref, t, ["tall"]))
    _record(out, params, state)
  assert len(traces) == 1
  ours = {k: np.stack(v) for k, v in out["tall"].items() if k != "projectors"}
  _assert_case(ref, "canonical/wd/beta1_0.9/tall", ours)


def _jit_run(tx, params, grads_list):
  """Final params after applying ``tx`` for each gradient tree; one jit."""

  @jax.jit
  def run(params, grads):
    def step(carry, g):
      params, state = carry
      updates, state = tx.update(g, state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), grads)
    return params

  return run(params, jax.tree.map(lambda *g: jnp.stack(g), *grads_list))


def test_weight_decay_follows_a_learning_rate_schedule():
  """With zero gradients only the decay acts: p <- p (1 - wd * lr_t)."""
  tx = galore_adafactor(lambda count: 0.1 * (count + 1), rank=2,
                        update_proj_gap=2, beta1=0.9, weight_decay=0.5,
                        target_modules="w")
  params = {"w": jnp.ones((6, 4)), "b": jnp.ones((3,))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  params = _jit_run(tx, params, [zeros] * 3)
  expected = (1 - 0.05) * (1 - 0.1) * (1 - 0.15)
  for leaf in jax.tree.leaves(params):
    np.testing.assert_allclose(leaf, expected, rtol=1e-6)


def test_learning_rate_is_averaged_by_the_first_moment():
  """With beta1 the EMA mixes lr-scaled updates (lr inside, as upstream)."""
  g = jnp.array([[3.0, -1.0], [0.5, 2.0]])
  plain = scale_by_adafactor(1.0)
  tx = scale_by_adafactor(lambda count: 1.0 + count, beta1=0.5)  # lr 1, 2

  @jax.jit
  def two_steps(g):
    plain_state, state = plain.init(g), tx.init(g)
    u1, plain_state = plain.update(g, plain_state)
    u2, _ = plain.update(g, plain_state)
    _, state = tx.update(g, state)
    out, _ = tx.update(g, state)
    return u1, u2, out

  u1, u2, out = two_steps(g)
  # m1 = 0.5 * (1 * u1); m2 = 0.5 * m1 + 0.5 * (2 * u2)
  np.testing.assert_allclose(out, 0.25 * u1 + u2, rtol=1e-6)


def test_stacked_leaf_equals_separate_leaves():
  """A (3, m, n) leaf is three (m, n) leaves: row/col statistics, clipping
  and the first moment are per matrix. The matrices' gradient scales differ
  by 1e5, so per-leaf clipping would not agree by accident."""
  tx_apply = optax.chain(scale_by_adafactor(0.01, beta1=0.9),
                         optax.scale(-1.0))
  rng = np.random.default_rng(0)
  p0 = rng.standard_normal((3, 6, 5), np.float32)
  scales = np.array([1.0, 100.0, 1e-3], np.float32)[:, None, None]
  grads = [rng.standard_normal((3, 6, 5), np.float32) * scales
           for _ in range(4)]

  stacked = _jit_run(tx_apply, {"w": p0}, [{"w": g} for g in grads])
  separate = _jit_run(tx_apply, {f"w{i}": p0[i] for i in range(3)},
                      [{f"w{i}": g[i] for i in range(3)} for g in grads])
  for i in range(3):
    np.testing.assert_allclose(stacked["w"][i], separate[f"w{i}"],
                               rtol=1e-6, atol=1e-7)


def test_clip_by_matrix_rms_is_per_matrix_and_per_vector():
  u = {"m": jnp.stack([jnp.full((2, 3), 4.0), jnp.full((2, 3), 0.5)]),
       "v": jnp.full((4,), 3.0)}
  m = np.random.default_rng(0).standard_normal((5, 7), np.float32) * 3

  @jax.jit
  def clip(u, m):
    out, _ = clip_by_matrix_rms(2.0).update(u, optax.EmptyState())
    ours, _ = clip_by_matrix_rms(1.0).update(m, optax.EmptyState())
    theirs, _ = optax.clip_by_block_rms(1.0).update(m, optax.EmptyState())
    return out, ours, theirs

  out, ours, theirs = clip(u, m)
  np.testing.assert_allclose(out["m"][0], 2.0)  # RMS 4 -> 2
  np.testing.assert_allclose(out["m"][1], 0.5)  # under the threshold
  np.testing.assert_allclose(out["v"], 2.0)
  # On 2-D leaves it is optax's per-leaf clipping.
  np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_factored_state_shapes_and_dtypes():
  params = {"m": jnp.zeros((2, 6, 5), jnp.bfloat16), "v": jnp.zeros((4,)),
            "s": jnp.zeros(())}
  tx = scale_by_factored_rms_hf()
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = jax.jit(lambda g: tx.update(g, tx.init(g)))(grads)
  assert isinstance(state, ScaleByFactoredRmsHfState)
  assert state.v_row["m"].shape == (2, 6)
  assert state.v_col["m"].shape == (2, 5)
  assert isinstance(state.v["m"], optax.MaskedNode)
  assert isinstance(state.v_row["v"], optax.MaskedNode)
  assert state.v["v"].shape == (4,) and state.v["s"].shape == ()
  assert all(x.dtype == jnp.float32 for x in
             (state.v_row["m"], state.v_col["m"], state.v["v"]))
  assert updates["m"].dtype == jnp.bfloat16
  # First step: beta2 = 0, so v = g^2 + eps and the update is g / |g| = 1.
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_allclose(np.asarray(leaf, np.float32), 1.0, rtol=1e-2)


def test_8bit_state_uses_the_unsigned_map_for_second_moments():
  inner = scale_by_adafactor(0.01, beta1=0.9)
  tx = quantize_state_8bit(inner, min_size=1)
  params = {"m": jnp.ones((64, 48)), "v": jnp.ones((300,))}
  state = inner.init(params)
  kinds = {jax.tree_util.keystr(path): is_second_moment(state, path)
           for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]}
  second = sorted(n for n, is_second in kinds.items() if is_second)
  assert second == ["[0].v['v']", "[0].v_col['m']", "[0].v_row['m']"], kinds
  # The wrapper builds and traces with this state (MaskedNode placeholders
  # included): its second moments become 8-bit codes.
  qstate = jax.eval_shape(tx.init, params)
  _, qstate = jax.eval_shape(tx.update, params, qstate)
  quantized = qstate.inner_state[0]
  assert all(isinstance(x, quantization.QuantizedArray) for x in (
      quantized.v_row["m"], quantized.v_col["m"], quantized.v["v"]))
  assert quantized.v_row["m"].codes.dtype == jnp.uint8


@pytest.mark.parametrize("factory, kwargs", [
    (scale_by_factored_rms_hf, {"decay_rate": 0.5}),
    (scale_by_factored_rms_hf, {"eps": -1.0}),
    (clip_by_matrix_rms, {"threshold": 0.0}),
    (scale_by_adafactor, {"learning_rate": 0.1, "beta1": 1.0}),
    (scale_by_adafactor, {"learning_rate": 0.1, "clip_threshold": -1.0}),
    (scale_by_adafactor, {"learning_rate": float("nan")}),
    (galore_adafactor, {"learning_rate": 0.1, "weight_decay": "x"}),
    (galore_adafactor, {"learning_rate": 0.1, "rank": 0}),
])
def test_bad_arguments_fail_at_construction(factory, kwargs):
  with pytest.raises(ValueError):
    factory(**kwargs)
