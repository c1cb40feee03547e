"""Unusual but legal inputs: empty leaves, complex leaves, extreme arguments.

Empty leaves (a dimension of 0) get empty updates of their dtype and leave
the other leaves' results unchanged, in every optimizer and the per-layer
step. Complex leaves are refused at ``init`` where they would be projected
or go through Adafactor, and follow optax's complex Adam elsewhere.
Arguments are range-checked when an optimizer or step is built, and no
argument sizes an allocation. Huge gradients keep Adafactor finite, and
float16 leaves are projected and optimised in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_optax as go
from galore_optax import layerwise as lw

FAST = {"xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True}

# Leaf names as in a model (module, then kernel or bias), flattened here.
FULL = {"w.kernel": (8, 6), "s.kernel": (2, 6, 8), "b.bias": (6,)}
EMPTY = {"e0.kernel": (0, 8), "e1.kernel": (8, 0), "e2.kernel": (3, 0, 5),
         "e3.kernel": (0, 4, 5), "e4.bias": (0,), "e5.kernel": (0, 0)}


def _tree(shapes, dtypes=None):
  """A nested tree {module: {leaf: zeros}} from dotted names."""
  dtypes = dtypes or {}
  tree = {}
  for name, shape in shapes.items():
    module, leaf = name.split(".")
    tree.setdefault(module, {})[leaf] = jnp.zeros(
        shape, dtypes.get(name, jnp.float32))
  return tree


def _flat(tree):
  return {go.path_to_name(p): x
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _grads(t, params):
  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten([
      jax.random.normal(jax.random.fold_in(jax.random.key(t), i), p.shape,
                        p.dtype) for i, p in enumerate(leaves)])


def _run(tx, params, steps=3):
  """Updates of ``steps`` jitted steps (gap 2: two refreshes)."""
  step = jax.jit(lambda g, s: tx.update(g, s, params), compiler_options=FAST)
  state, out = jax.jit(tx.init)(params), []
  for t in range(steps):
    # The same gradients for the non-empty leaves, with or without empties.
    grads = {k: g for k, g in _flat(_grads(t, _tree(FULL))).items()
             if k in _flat(params)}
    grads = jax.tree.map(jnp.zeros_like, params) | {
        m: {**jax.tree.map(jnp.zeros_like, params[m]),
            **{k.split(".")[1]: g for k, g in grads.items()
               if k.split(".")[0] == m}} for m in params}
    updates, state = step(grads, state)
    out.append(_flat(updates))
  return out, state


GALORE = {"rank": 3, "update_proj_gap": 2}
ZERO_SIZE_CASES = {
    "adamw_std_svd_f32_moments_project": lambda: go.galore_adamw(
        1e-2, **GALORE, moments="project"),
    "adamw_reverse_randomized_bf16_staggered": lambda: go.galore_adamw(
        1e-2, **GALORE, proj_type="reverse_std", projector_method="randomized",
        projector_dtype="bfloat16", stagger_refresh=True),
    "adamw_8bit_left_svd_int8_matrix_axes": lambda: go.galore_adamw_8bit(
        1e-2, **GALORE, min_size=1, proj_type="left", projector_dtype="int8",
        matrix_axes={"s": ([1], [0, 2])}),
    "adafactor_full_randomized": lambda: go.galore_adafactor(
        1e-2, **GALORE, proj_type="full", projector_method="randomized"),
    "adamw_8bit_full_size": lambda: go.adamw_8bit(1e-2, min_size=1),
}


@pytest.mark.parametrize("name", list(ZERO_SIZE_CASES))
def test_empty_leaves_get_empty_updates_and_change_nothing_else(name):
  dtypes = {"e1.kernel": jnp.bfloat16, "e5.kernel": jnp.float16}
  params = _tree({**FULL, **EMPTY}, dtypes)
  flat = _flat(params)
  with_empty, state = _run(ZERO_SIZE_CASES[name](), params)
  without, _ = _run(ZERO_SIZE_CASES[name](), _tree(FULL))
  for updates, reference in zip(with_empty, without):
    for k in EMPTY:
      assert updates[k].shape == flat[k].shape
      assert updates[k].dtype == flat[k].dtype
    for k in FULL:
      np.testing.assert_array_equal(updates[k], reference[k])
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state)
             if jnp.issubdtype(x.dtype, jnp.floating))


def test_empty_leaves_with_moments_reset():
  # "reset" needs every leaf projected; an empty leaf has nothing to reset.
  make = lambda: go.galore_project(optax.scale_by_adam(), **GALORE,
                                   moments="reset", stagger_refresh=False)
  full = {k: s for k, s in FULL.items() if len(s) >= 2}
  with_empty, _ = _run(make(), _tree({**full, **EMPTY}))
  without, _ = _run(make(), _tree(full))
  for updates, reference in zip(with_empty, without):
    assert all(updates[k].shape == EMPTY[k] for k in EMPTY)
    for k in full:
      np.testing.assert_array_equal(updates[k], reference[k])


def _layerwise_loss(params, x):
  p = {module: leaves["kernel"] for module, leaves in params.items()}
  h = lw.dense(x, p["w"])  # (3, 6)
  h = h + jnp.sum(p["e0"]) + jnp.sum(lw.dense(x[:, :0], p["e1"]))
  h = lw.scan_layers(lambda c, q: c @ q["k"], h, {"k": p["stack"]})
  h = lw.scan_layers(lambda c, q: c + jnp.sum(q), h, p["no_layers"])
  h = lw.scan_layers(lambda c, q: c + jnp.sum(q), h, p["empty_layers"])
  return jnp.mean(h ** 2) + jnp.sum(p["e2"])


@pytest.mark.parametrize("name,accumulate_steps", [
    ("galore_adamw_8bit", 1), ("galore_adafactor", 2)])
def test_empty_leaves_in_the_per_layer_step(name, accumulate_steps):
  tx = {"galore_adamw_8bit": lambda: go.galore_adamw_8bit(
            1e-2, **GALORE, min_size=1),
        "galore_adafactor": lambda: go.galore_adafactor(1e-2, **GALORE)}[name]
  full = {"w": jnp.full((8, 6), 0.1), "stack": jnp.full((2, 6, 6), 0.1)}
  empty = {"e0": jnp.zeros((0, 8)), "e1": jnp.zeros((0, 8), jnp.bfloat16),
           "e2": jnp.zeros((3, 0, 5)), "unused": jnp.zeros((4, 0)),
           "no_layers": jnp.zeros((0, 4, 5)),
           "empty_layers": jnp.zeros((2, 0, 5))}

  def run(params, loss_fn):
    params = {module: {"kernel": x} for module, x in params.items()}
    init, step = lw.make_layerwise_step(
        loss_fn, tx(), per_layer=["stack", "no_layers",
                                  "empty_layers"],
        accumulate_steps=accumulate_steps, jit=False)
    step = jax.jit(step, compiler_options=FAST)
    state = init(params)
    for t in range(3):
      x = jax.random.normal(jax.random.key(t), (3, 8))
      params, state, _ = step(params, state, x)
    return {module: leaves["kernel"] for module, leaves in params.items()}

  with_empty = run({**full, **empty}, _layerwise_loss)
  without = run(dict(full), lambda p, x: _layerwise_loss(
      {**p, **{k: {"kernel": jnp.zeros_like(v)} for k, v in empty.items()}},
      x))
  for k, p in empty.items():
    assert with_empty[k].shape == p.shape and with_empty[k].dtype == p.dtype
  for k in full:
    np.testing.assert_array_equal(with_empty[k], without[k])


# Complex parameters.
COMPLEX = {"c": {"kernel": (1 + 1j) * jnp.ones((4, 4), jnp.complex64)},
           "v": {"scale": (1 - 2j) * jnp.ones((6,), jnp.complex64)},
           "w": {"kernel": jnp.ones((8, 6))}}


def _complex_grads(t):
  leaves, treedef = jax.tree.flatten(COMPLEX)
  return treedef.unflatten([
      jax.random.normal(jax.random.fold_in(jax.random.key(t), i), p.shape,
                        p.dtype) for i, p in enumerate(leaves)])


@pytest.mark.parametrize("make", [
    lambda: go.galore_adamw(1e-2, rank=2),
    lambda: go.galore_adamw_8bit(1e-2, rank=2),
    lambda: go.galore_adafactor(1e-2, rank=2, target_modules=["c", "w"]),
    lambda: go.galore_project(optax.scale_by_adam(), rank=2),
    lambda: go.create_optimizer("galore_adamw", 1e-2, target_modules=["c"]),
], ids=["galore_adamw", "galore_adamw_8bit", "galore_adafactor",
        "galore_project", "create_optimizer"])
def test_complex_leaves_that_would_be_projected_are_refused_at_init(make):
  with pytest.raises(ValueError, match=r"Parameter 'c\.kernel' has dtype "
                     r"complex64: "
                     r"galore_project projects real matrices only"):
    make().init(COMPLEX)


def test_complex_leaves_are_refused_by_adafactor_and_the_per_layer_step():
  with pytest.raises(ValueError, match=r"Parameter 'v\.scale' has dtype "
                     r"complex64: Adafactor"):
    go.galore_adafactor(1e-2, rank=2, target_modules=["w"]).init(
        {"v": COMPLEX["v"], "w": COMPLEX["w"]})
  init, _ = lw.make_layerwise_step(
      lambda p, b: jnp.sum(jnp.abs(p["c"]["kernel"])), optax.adamw(1e-2))
  with pytest.raises(ValueError, match=r"'c\.kernel' has dtype complex64"):
    init({"c": COMPLEX["c"]})


@pytest.mark.parametrize("make", [
    lambda: go.galore_adamw(1e-2, rank=2, target_modules=["w"]),
    lambda: go.galore_adamw_8bit(1e-2, rank=2, target_modules=["w"],
                                 min_size=1),
    lambda: go.adamw_8bit(1e-2, min_size=1),
], ids=["galore_adamw", "galore_adamw_8bit", "adamw_8bit"])
def test_complex_leaves_outside_the_projection_follow_optax(make):
  tx, reference = make(), optax.adamw(1e-2, weight_decay=0.0)
  state, ref_state = tx.init(COMPLEX), reference.init(COMPLEX)
  step = jax.jit(tx.update, compiler_options=FAST)
  for t in range(3):
    grads = _complex_grads(t)
    updates, state = step(grads, state, COMPLEX)
    expected, ref_state = reference.update(grads, ref_state, COMPLEX)
    for k in ("c", "v"):
      (u,), (e,) = jax.tree.leaves(updates[k]), jax.tree.leaves(expected[k])
      assert u.dtype == jnp.complex64 and float(jnp.max(jnp.abs(u.imag))) > 0
      np.testing.assert_allclose(u, e, rtol=1e-6, atol=1e-9)


# Argument ranges.
def _galore(**kwargs):
  return lambda: go.galore_project(optax.scale_by_adam(), **kwargs)


BAD_ARGUMENTS = [
    (_galore(update_proj_gap=2**31), r"update_proj_gap must be at most "
     r"2\*\*31 - 1 = 2147483647.*got 2147483648"),
    (lambda: go.galore_adamw(1e-2, update_proj_gap=2**40),
     r"update_proj_gap must be at most"),
    (lambda: go.create_optimizer("galore_adamw_8bit", 1e-2,
                                 target_modules=["attn"],
                                 optim_args="update_proj_gap=2147483648"),
     r"update_proj_gap must be at most"),
    (_galore(seed=2**63), r"seed must be an integer in \[-2\*\*63, 2\*\*63\)"),
    (_galore(seed=1.5), r"seed must be an integer"),
    (_galore(scale=-0.5), r"scale must be in \[0\.0, inf\), got -0\.5"),
    (_galore(stagger_refresh="yes"), r"stagger_refresh must be True or False"),
    (lambda: go.galore_adamw(1e-2, b1=1.0), r"b1 must be in \[0\.0, 1\.0\)"),
    (lambda: go.galore_adamw_8bit(1e-2, b2=1.5), r"b2 must be in"),
    (lambda: go.adamw_8bit(1e-2, eps=float("nan")), r"eps must be finite"),
    (lambda: go.adamw_8bit(1e-2, weight_decay=-1.0),
     r"weight_decay must be in \[0\.0, inf\)"),
    (lambda: go.galore_adamw(float("nan")), r"learning_rate must be finite"),
    (lambda: go.galore_adamw_8bit(-1e-3), r"learning_rate must be in"),
    (lambda: go.galore_adamw(1e-2, mu_dtype=jnp.int8),
     r"mu_dtype must be a floating dtype or None"),
    (lambda: go.galore_adafactor(1e-2, clip_threshold=0.0),
     r"clip_threshold must be in \(0\.0, inf\)"),
    (lambda: go.galore_adafactor(-1.0), r"learning_rate must be in"),
    (lambda: lw.make_layerwise_step(lambda p, b: 0.0, optax.sgd(0.1),
                                    accumulate_steps=2**31),
     r"accumulate_steps must be at most 2\*\*31 - 1"),
    (lambda: lw.make_layerwise_step(lambda p, b: 0.0, optax.sgd(0.1),
                                    clip_norm=True),
     r"clip_norm must be a real number"),
    (lambda: lw.make_layerwise_step(lambda p, b: 0.0, optax.sgd(0.1),
                                    accumulate_dtype=jnp.int32),
     r"accumulate_dtype must be a floating dtype"),
]


@pytest.mark.parametrize("make,match", BAD_ARGUMENTS)
def test_bad_arguments_fail_at_construction_naming_them(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_extreme_legal_arguments_cost_what_the_data_costs():
  params = {"w": {"kernel": jnp.zeros((8, 6))}, "b": {"bias": jnp.zeros(6)}}
  small = go.galore_adamw(1e-2, rank=6, update_proj_gap=2**31 - 1,
                          projector_method="randomized", seed=-2**63)
  huge = go.galore_adamw(1e-2, rank=2**62, update_proj_gap=2**31 - 1,
                         projector_method="randomized", seed=2**63 - 1)
  assert (go.optimizer_state_bytes(huge, params) ==
          go.optimizer_state_bytes(small, params))
  for tx in (small, huge):
    state = tx.init(params)
    for t in range(2):
      updates, state = jax.jit(tx.update)(_grads(t, params), state, params)
      assert all(bool(jnp.all(jnp.isfinite(u)))
                 for u in jax.tree.leaves(updates))
  init, step = lw.make_layerwise_step(
      lambda p, x: jnp.sum(p["w"] * x), optax.adamw(1e-2),
      accumulate_steps=2**31 - 1)
  p, state = {"w": jnp.ones((4, 4))}, None
  state = init(p)
  new_p, state, _ = step(p, state, jnp.ones((4, 4)))
  np.testing.assert_array_equal(new_p["w"], jnp.ones((4, 4)))  # mid-window


def _spiked(shape, dtype, magnitude, spike, seed):
  g = magnitude * np.random.default_rng(seed).standard_normal(shape)
  g.flat[5 % g.size] = spike
  return jnp.asarray(g, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_huge_gradients_keep_adafactor_finite_and_clipped(dtype):
  # Squares of these overflow float32: the factored statistics used to be
  # Inf, their normalisation Inf / Inf, and the whole matrix NaN.
  largest = float(jnp.finfo(dtype).max)
  params = {"q_proj": {"kernel": jnp.zeros((16, 4), dtype)},
            "embed": {"embedding": jnp.zeros((12, 4), dtype)},
            "norm": {"scale": jnp.zeros((6,), dtype)}}
  lr = 1e-2
  for tx in (go.galore_adafactor(lr, rank=2, update_proj_gap=2),
             go.scale_by_adafactor(lr, beta1=0.9)):
    state = tx.init(params)
    for t, (magnitude, spike) in enumerate(
        [(1.0, largest), (1.0, 1e30), (1e30, 1e30), (1.0, -largest)]):
      grads = jax.tree.map(
          lambda p, t=t, m=magnitude, s=spike: _spiked(p.shape, dtype, m, s, t),
          params)
      updates, state = jax.jit(tx.update)(grads, state, params)
      for u in jax.tree.leaves(updates):
        u = np.asarray(u, np.float32)
        assert np.isfinite(u).all(), f"update {t}"
        assert np.abs(u).max() > 0, f"update {t}: clipped to nothing"
        # Each update matrix's RMS is clipped to 1 before the learning rate.
        assert np.sqrt(np.mean(np.square(u))) <= 1.01 * lr, f"update {t}"


def test_float16_leaves_are_projected_and_optimised_in_float32():
  params = {"q_proj": {"kernel": jnp.zeros((16, 4), jnp.float16)},
            "embed": {"embedding": jnp.zeros((12, 4), jnp.float16)}}
  largest = float(jnp.finfo(jnp.float16).max)
  grads = jax.tree.map(
      lambda p: _spiked(p.shape, jnp.float16, 1.0, largest, 0), params)
  clean = jax.tree.map(
      lambda p: _spiked(p.shape, jnp.float16, 1.0, 1.0, 1), params)
  for tx in (
      # A row sum of the spiked row exceeds float16's largest value.
      go.galore_adamw(1e-2, rank=2, update_proj_gap=2),
      # P^T G Q^T is nearly diagonal: its off-diagonal entries' second
      # moments underflow in float16 while their first moments do not.
      go.galore_project(optax.scale_by_adam(), rank=2, update_proj_gap=2,
                        proj_type="full", projector_method="randomized")):
    state = tx.init(params)
    for g in (grads, clean):
      updates, state = jax.jit(tx.update)(g, state, params)
      for u in jax.tree.leaves(updates):
        assert u.dtype == jnp.float16
        assert bool(jnp.all(jnp.isfinite(u)))
    galore_state, = [x for x in jax.tree.leaves(
        state, is_leaf=lambda x: isinstance(x, go.GaLoreState))
                     if isinstance(x, go.GaLoreState)]
    moments = [x for x in jax.tree.leaves(galore_state.inner_state)
               if x.ndim == 2]
    assert len(moments) == 4  # mu and nu of both leaves, low-rank
    assert all(x.dtype == jnp.float32 for x in moments)
