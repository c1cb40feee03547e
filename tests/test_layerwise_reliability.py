"""Failure modes of the per-layer step, as tests/test_reliability.py and
tests/test_checkpoint.py check them for the ordinary optimizers: non-finite
gradients (with and without ``optax.apply_if_finite``), exact Orbax resume,
determinism, one compilation, and parameter dtypes.

The loss is ``sum_k <p_k, b_k>``, so each leaf's gradient is the batch's
entry for it: tests choose gradients exactly (a NaN in one leaf, say).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import galore_optax as go
from galore_optax import layerwise as lw

from _layerwise_common import FAST  # pylint: disable=g-bad-import-order

SHAPES = {"attn": {"kernel": (16, 8)}, "mlp": {"kernel": (8, 16)},
          "norm": {"scale": (16,)}, "layers": {"kernel": (2, 8, 8)}}
TARGETS = ["attn", "mlp", "layers"]
GAP = 3  # refreshes at updates 0, 3, 6, ...

OPTIMIZERS = {
    "galore_adamw": lambda: go.galore_adamw(
        1e-2, rank=4, update_proj_gap=GAP, target_modules=TARGETS),
    "galore_adamw_8bit": lambda: go.galore_adamw_8bit(
        1e-2, rank=4, update_proj_gap=GAP, min_size=64,
        projector_dtype="int8", target_modules=TARGETS),
    "galore_adafactor": lambda: go.galore_adafactor(
        1e-2, rank=4, update_proj_gap=GAP, projector_method="randomized",
        target_modules=TARGETS),
    "adamw_8bit": lambda: go.adamw_8bit(1e-2, min_size=64),
}


def loss_fn(params, batch):
  """``sum_k <p_k, b_k>``: the gradient of leaf ``k`` is ``b_k``."""
  dot = lambda p, b: jnp.sum(p.astype(jnp.float32) * b)
  flat = sum(dot(params[m][k], batch[m][k])
             for m in ("attn", "mlp", "norm") for k in params[m])
  return lw.scan_layers(
      lambda c, q: c + dot(q["p"], q["b"]), flat,
      {"p": params["layers"]["kernel"], "b": batch["layers"]["kernel"]})


def _shapes_map(fn):
  leaves, treedef = jax.tree.flatten(
      SHAPES, is_leaf=lambda x: isinstance(x, tuple))
  return treedef.unflatten([fn(i, s) for i, s in enumerate(leaves)])


def _params(dtype=jnp.float32):
  return _shapes_map(lambda i, s: (0.1 * jax.random.normal(
      jax.random.key(i), s)).astype(dtype))


def _batch(t):
  return _shapes_map(lambda i, s: jax.random.normal(
      jax.random.fold_in(jax.random.key(t), i), s))


def _make(tx, **kwargs):
  steps = lw.make_layerwise_step(loss_fn, tx, per_layer=["layers"],
                                 jit=False, **kwargs)
  return steps, jax.jit(steps.step, donate_argnums=(0, 1),
                        compiler_options=FAST)


def _run(step, params, state, start, stop, batch=_batch):
  for t in range(start, stop):
    params, state, _ = step(params, state, batch(t))
  return params, state


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _projectors(steps, state, params, name):
  (galore,) = [s for s in jax.tree.leaves(
      steps.unpack_state(state, params)[name].opt_state,
      is_leaf=lambda x: isinstance(x, go.GaLoreState))
               if isinstance(s, go.GaLoreState)]
  return galore.projectors[name]


def _finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.inexact))


def test_nonfinite_gradient_with_and_without_apply_if_finite():
  params = _params()
  nan_batch = lambda t: {**_batch(t), "attn": {
      "kernel": _batch(t)["attn"]["kernel"].at[0, 0].set(jnp.nan)}}
  # Without a guard: the NaN of update 3 (a refresh) reaches attn's moments
  # and weights, as in any optax optimizer, but not its projector, which
  # stays the one of update 0; the other leaves do not see it.
  steps, step = _make(OPTIMIZERS["galore_adamw"]())
  p, s = _run(step, _copy(params), steps.init(params), 0, GAP)
  before = jax.tree.map(np.array, _projectors(steps, s, params, "attn.kernel"))
  p, s = _run(step, p, s, GAP, GAP + 1, nan_batch)
  jax.tree.map(np.testing.assert_array_equal,
               _projectors(steps, s, params, "attn.kernel"), before)
  assert not _finite(p["attn"])
  assert _finite({k: v for k, v in p.items() if k != "attn"})
  # Wrapped in apply_if_finite, each leaf is guarded on its own: attn keeps
  # its weights and inner state bit for bit, the others update as usual.
  steps, step = _make(optax.apply_if_finite(OPTIMIZERS["galore_adamw"](), 5))
  p, s = _run(step, _copy(params), steps.init(params), 0, GAP)
  old_p = jax.tree.map(np.array, p)
  old_s = jax.tree.map(np.array, steps.unpack_state(s, params))
  p, s = _run(step, p, s, GAP, GAP + 1, nan_batch)
  new_s = steps.unpack_state(s, params)
  np.testing.assert_array_equal(p["attn"]["kernel"], old_p["attn"]["kernel"])
  jax.tree.map(np.testing.assert_array_equal,
               new_s["attn.kernel"].opt_state.inner_state,
               old_s["attn.kernel"].opt_state.inner_state)
  assert int(new_s["attn.kernel"].opt_state.notfinite_count) == 1
  assert int(new_s["mlp.kernel"].opt_state.notfinite_count) == 0
  assert not np.array_equal(p["mlp"]["kernel"], old_p["mlp"]["kernel"])
  assert _finite(p)


# Stopping after 3 updates saves the state right before a refresh (gap 3);
# after 2, in the middle of a window.
@pytest.mark.parametrize("name,stop_at", [("galore_adamw_8bit", 3),
                                          ("galore_adafactor", 2)])
def test_orbax_resume_is_bit_exact_and_runs_are_deterministic(
    tmp_path, name, stop_at):
  params = _params()
  steps, step = _make(OPTIMIZERS[name](), accumulate_steps=1)
  full = _run(step, _copy(params), steps.init(params), 0, 5)
  again = _run(step, _copy(params), steps.init(params), 0, stop_at)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"params": again[0],
                                        "opt_state": again[1]})
  checkpointer.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          {"params": again[0], "opt_state": again[1]})
  del again
  restored = checkpointer.restore(tmp_path / "ckpt", abstract)
  # A fresh step, as in a new process.
  steps, step = _make(OPTIMIZERS[name](), accumulate_steps=1)
  resumed = _run(step, restored["params"], restored["opt_state"], stop_at, 5)
  jax.tree.map(np.testing.assert_array_equal, resumed, full)


def test_compiles_once_across_refresh_and_ordinary_steps():
  traces = []

  def counted(params, batch):
    traces.append(1)
    return loss_fn(params, batch)

  params = _params()
  steps = lw.make_layerwise_step(counted, OPTIMIZERS["galore_adamw_8bit"](),
                                 per_layer=["layers"],
                                 accumulate_steps=2,
                                 jit=False)
  step = jax.jit(steps.step, compiler_options=FAST)
  state = steps.init(params)
  for t in range(2 * GAP + 1):  # micro-batches over two refresh windows
    new_params, new_state, _ = step(params, state, _batch(t))
    jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype)
                 or pytest.fail("state changed"), state, new_state)
    params, state = new_params, new_state
    if t == 0:
      first = len(traces)
  assert len(traces) == first


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_parameter_dtypes(name):
  dtypes = (jnp.float32, jnp.bfloat16, jnp.float16)
  params = {jnp.dtype(d).name: _params(d) for d in dtypes}

  def loss(p, batch):
    return sum(loss_fn(p[jnp.dtype(d).name], batch) for d in dtypes)

  steps = lw.make_layerwise_step(
      loss, OPTIMIZERS[name](), jit=False,
      per_layer=[f"{jnp.dtype(d).name}.layers" for d in dtypes])
  step = jax.jit(steps.step, compiler_options=FAST)
  state = steps.init(params)
  for t in range(GAP + 1):
    new_params, new_state, _ = step(params, state, _batch(t))
    for a, b in zip(jax.tree.leaves((params, state)),
                    jax.tree.leaves((new_params, new_state))):
      assert (a.shape, a.dtype) == (b.shape, b.dtype)
    params, state = new_params, new_state
  # float16 Adam moments underflow (g**2 below 6e-8 is 0, and so is eps
  # 1e-8), which makes optax.adamw's float16 updates infinite too: only the
  # dtypes are checked for float16.
  assert _finite([params["float32"], params["bfloat16"]])
  assert _finite({n: x for n, x in steps.unpack_state(state, params).items()
                  if not n.startswith("float16")})
