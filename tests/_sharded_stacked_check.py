"""Run by test_sharding.py in a subprocess with 8 simulated CPU devices.

Stacked ``(L, m, n)`` leaves (as from ``nn.scan`` or a per-layer stack),
each sharded differently on a 2 x 4 mesh: the layer, row or column axis
alone (over all 8 devices), and two axes at once. One tree holds every
sharding, so each optimizer compiles once per mesh axis type. Three updates
with ``update_proj_gap=2``: refresh, ordinary step, refresh.

Shapes are small enough that every batched LAPACK call stays below jaxlib's
threshold for splitting a batch over its intra-op thread pool, which
deadlocks when several simulated devices of one process decompose at once.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import galore_optax
from galore_optax import layerwise as lw
from galore_optax import sharding

AB = ("a", "b")  # both mesh axes: one array axis over all 8 devices
SPECS = {
    "layer": P(AB, None, None), "row": P(None, AB, None),
    "col": P(None, None, AB), "layer_row": P("a", "b", None),
    "layer_col": P("a", None, "b"), "row_col": P(None, "a", "b"),
    # Same shape and sharding as "layer": refreshed together by one loop
    # (the other leaves, alone, by a cond) on Explicit meshes.
    "layer_again": P(AB, None, None),
    # Tall (m > n): projected on the right, where the others are on the left.
    "tall_layer": P(AB, None, None),
}
SHAPES = {k: (8, 16, 8) if k.startswith("tall") else (8, 8, 16) for k in SPECS}
# Cheap XLA options (both layouts compile with them).
FAST = {"xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True}
_rng = np.random.default_rng(0)


def decaying(shape: tuple[int, ...]) -> np.ndarray:
  """Random matrices whose singular values decay by 0.6 (a clear gap at
  any rank, as real gradients have).

  With plain Gaussian matrices the top-4 subspace of one 8 x 16 matrix had a
  tiny gap: perturbing the gradients by one float32 rounding (relative
  2**-24 noise) moved that leaf's parameters by 1.5e-6 on one device
  alone, as much as the tolerance below. The check would then test the
  luck of each method's rounding, not the sharding.
  """
  *batch, m, n = shape
  k = min(m, n)
  u = np.linalg.qr(_rng.standard_normal((*batch, m, k)))[0]
  v = np.linalg.qr(_rng.standard_normal((*batch, n, k)))[0]
  return ((u * 0.6 ** np.arange(k)) @ np.swapaxes(v, -1, -2) * 3
          ).astype(np.float32)


GRADS = [{k: decaying(s) for k, s in SHAPES.items()} for _ in range(3)]


def meshes():
  for axis_type in (AxisType.Auto, AxisType.Explicit):
    yield axis_type, jax.make_mesh((2, 4), AB, axis_types=(axis_type,) * 2)


def placer(mesh, specs):
  return lambda tree: {k: jax.device_put(v, NamedSharding(mesh, specs[k]))
                       for k, v in tree.items()}


def compare(name, axis_type, mesh, specs, single, sharded):
  for k, spec in specs.items():
    assert sharded[k].sharding.is_equivalent_to(
        NamedSharding(mesh, spec), 3), (name, k, sharded[k].sharding)
    diff = float(np.abs(np.asarray(sharded[k]) - np.asarray(single[k])).max())
    # Only the order of float32 reductions differs between layouts.
    assert diff < 2e-6, (name, axis_type, k, diff)
  print("ok", name, axis_type)


def run(tx, place):
  params = place({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
  state = jax.jit(tx.init)(params)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)), donate_argnums=(0, 1), compiler_options=FAST)
  for grads in GRADS:
    params, state = step(params, state, place(grads))
  return params


def check_optimizers():
  common = dict(learning_rate=1e-2, rank=4, update_proj_gap=2)
  # Each optimizer and each projector method at least once (8-bit moments
  # with the exact SVD run in _sharded_check.py).
  optimizers = {
      "galore_adamw-svd": lambda: galore_optax.galore_adamw(**common),
      # Moments carried into the new bases: one cond over the whole state.
      "galore_adamw-randomized-project": lambda: galore_optax.galore_adamw(
          **common, projector_method="randomized", moments="project"),
      "galore_adamw_8bit-randomized": lambda: galore_optax.galore_adamw_8bit(
          **common, min_size=256, projector_method="randomized"),
  }
  for name, make in optimizers.items():
    single = run(make(), lambda tree: tree)
    for axis_type, mesh in meshes():
      with jax.set_mesh(mesh):
        sharded = run(make(), placer(mesh, SPECS))
      compare(name, axis_type, mesh, SPECS, single, sharded)


def replicated(w):
  # The loss itself must be valid under Explicit axes (a product over a
  # sharded axis, or a scan carry, needs its sharding told); the gradient
  # comes back sharded like the parameter all the same.
  if sharding.is_explicitly_sharded(w):
    return jax.sharding.reshard(w, P())
  return w


def layer_loss(w, x):
  return jnp.mean((jnp.tanh(x @ replicated(w)) - x) ** 2)


def loss_whole(p, x):
  """Each stack as a whole (its layers as a batch)."""
  return sum(jnp.sum(jax.vmap(layer_loss, (0, None))(w, x))
             for k, w in sorted(p.items()))


def loss_per_layer(p, x):
  """The stacks one layer at a time, through ``scan_layers``."""
  return lw.scan_layers(
      lambda total, ws: total + sum(layer_loss(ws[k], x) for k in sorted(ws)),
      jnp.zeros([]), p)


def check_layerwise():
  """``make_layerwise_step`` with stacked sharded leaves: whole, and per
  layer (``per_layer``; not over the layer axis on Explicit meshes, where
  JAX refuses to scan over, or slice one layer of, a sharded axis)."""
  x = _rng.standard_normal((16, 8)).astype(np.float32)
  square = lambda specs: {
      k: (_rng.standard_normal((8, 8, 8)) * 0.3).astype(np.float32)
      for k in specs}
  cases = {
      "whole": (loss_whole, None, {k: SPECS[k] for k in (
          "layer", "row", "col", "layer_row", "layer_col", "row_col")}),
      "per_layer": (loss_per_layer, ["row", "col", "row_col"], {
          k: SPECS[k] for k in ("row", "col", "row_col")}),
  }
  tx = galore_optax.galore_adamw(1e-2, rank=4, update_proj_gap=2)

  def run_layerwise(loss, per_layer, params, place):
    init, step = lw.make_layerwise_step(loss, tx, per_layer=per_layer,
                                        jit=False)
    step = jax.jit(step, donate_argnums=(0, 1), compiler_options=FAST)
    params = place(params)
    state = init(params)
    for _ in range(3):
      params, state, _ = step(params, state, x)
    return params

  for name, (loss, per_layer, specs) in cases.items():
    params = square(specs)
    single = run_layerwise(loss, per_layer, params, lambda tree: tree)
    for axis_type, mesh in meshes():
      with jax.set_mesh(mesh):
        sharded = run_layerwise(loss, per_layer, params, placer(mesh, specs))
      compare("layerwise-" + name, axis_type, mesh, specs, single, sharded)


def loss_layers(p, x):
  """Unrolled layers through ``call_layer`` and ``dense``."""

  def layer(h, w):
    return replicated(jnp.tanh(lw.dense(h, w)))

  h = x
  for k in sorted(p):
    h = lw.call_layer(layer, h, p[k])
  return jnp.mean((h - x) ** 2)


def check_layerwise_layers():
  """Unrolled sharded layers, fused and with kept residuals
  (``recompute=False``), over their kernels' column axis."""
  x = _rng.standard_normal((16, 8)).astype(np.float32)
  specs = {"l0": P(None, AB), "l1": P(None, "a"), "l2": P(None, "b")}
  params = {k: (_rng.standard_normal((8, 8)) * 0.3).astype(np.float32)
            for k in specs}
  tx = galore_optax.galore_adamw(1e-2, rank=4, update_proj_gap=2)

  def run_layers(place):
    init, step = lw.make_layerwise_step(loss_layers, tx, fused=True,
                                        recompute=False, jit=False)
    p = place(params)
    # Under Auto axes the compiler picks the outputs' shardings (here it
    # moved one kernel to both mesh axes) unless told: keep the parameters'.
    shardings = jax.tree.map(lambda a: getattr(a, "sharding", None), p)
    step = jax.jit(step, donate_argnums=(0, 1), compiler_options=FAST,
                   out_shardings=(shardings, None, None))
    state = init(p)
    for _ in range(3):
      p, state, _ = step(p, state, x)
    return p

  single = run_layers(lambda tree: tree)
  for axis_type, mesh in meshes():
    with jax.set_mesh(mesh):
      sharded = run_layers(placer(mesh, specs))
    compare("layerwise-layers-kept", axis_type, mesh, specs, single, sharded)


def main():
  assert jax.device_count() == 8
  check_optimizers()
  check_layerwise()
  check_layerwise_layers()


if __name__ == "__main__":
  main()
