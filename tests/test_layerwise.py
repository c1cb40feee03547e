"""Per-layer updates (galore_optax.layerwise) against the ordinary step.

The model is a two-block toy with Hugging Face-like names (``attn``, ``mlp``
are GaLore targets; the embedding, head, norms and bias are not), built
unrolled, as a stacked ``nnx.scan`` model, and as a stacked model run with
``layerwise.scan_layers``, all from the same weights. Steps are compiled with
cheap XLA options to keep the file fast on small CPUs.
"""

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import galore_optax as go
from galore_optax import layerwise as lw

from _layerwise_common import FAST  # pylint: disable=g-bad-import-order
from _layerwise_common import LR
from _layerwise_common import assert_close
from _layerwise_common import jit_init
from _layerwise_common import ordinary_step
from _layerwise_common import run

V, D, F, L = 16, 16, 32, 2
GAP = 2  # projector refreshes at updates 0, 2, 4, ...


class Block(nnx.Module):

  def __init__(self, rngs):
    self.norm = nnx.RMSNorm(D, rngs=rngs)
    self.attn = nnx.Linear(D, D, use_bias=False, rngs=rngs)
    self.mlp = nnx.Linear(D, F, rngs=rngs)
    self.mlp_out = nnx.Linear(F, D, use_bias=False, rngs=rngs)

  def __call__(self, x):
    h = self.norm(x)
    h = h + jnp.tanh(self.attn(h))
    return x + self.mlp_out(jax.nn.gelu(self.mlp(h)))


class Net(nnx.Module):
  """``stacked``: blocks with a leading layer axis (as ``scan_layers=True``)."""

  def __init__(self, rngs, stacked=False):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    if stacked:

      @nnx.split_rngs(splits=L)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return Block(rngs)

      self.blocks = make(rngs)
    else:
      self.blocks = nnx.List([Block(rngs) for _ in range(L)])
    self.head = nnx.Linear(D, V, use_bias=False, rngs=rngs)
    self.stacked = stacked

  def __call__(self, ids, scan_with_layers=False):
    x = self.embed(ids)
    if not self.stacked:
      for block in self.blocks:
        x = block(x)
    elif scan_with_layers:
      block_def, block_params = nnx.split(self.blocks)
      x = lw.scan_layers(lambda c, p: nnx.merge(block_def, p)(c), x,
                         block_params)
    else:

      @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
      def run(block, c):
        return block(c)

      x = run(self.blocks, x)
    return self.head(x)


def _xent(logits, ids):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.roll(ids, -1, axis=1)).mean()


def _models():
  """Abstract models filled from NumPy (no eager jax initialisers: fast)."""
  rng = np.random.default_rng(0)

  def fill(model):
    graphdef, params = nnx.split(model, nnx.Param)
    flat = nnx.to_pure_dict(params)
    return graphdef, params, flat

  graphdef, params, flat = fill(nnx.eval_shape(lambda: Net(nnx.Rngs(0))))
  flat = jax.tree.map(
      lambda s: (rng.normal(0, 0.3, s.shape) if len(s.shape) > 1 else
                 1 + 0.1 * rng.normal(size=s.shape)).astype(np.float32), flat)
  sgraphdef, sparams, sflat = fill(
      nnx.eval_shape(lambda: Net(nnx.Rngs(0), stacked=True)))
  sflat["blocks"] = jax.tree.map(lambda *xs: np.stack(xs),
                                 *[flat["blocks"][i] for i in range(L)])
  sflat["embed"], sflat["head"] = flat["embed"], flat["head"]
  to_jax = lambda tree: jax.tree.map(jnp.asarray, tree)
  nnx.replace_by_pure_dict(params, to_jax(flat))
  nnx.replace_by_pure_dict(sparams, to_jax(sflat))
  return graphdef, params, sgraphdef, sparams


GRAPHDEF, PARAMS, SGRAPHDEF, SPARAMS = _models()
_rng = np.random.default_rng(0)
BATCHES = [jnp.asarray(_rng.integers(0, V, (4, 8))) for _ in range(4)]


def loss_unrolled(params, ids):
  return _xent(nnx.merge(GRAPHDEF, params)(ids), ids)


def loss_scanned(params, ids):
  return _xent(nnx.merge(SGRAPHDEF, params)(ids), ids)


def loss_scan_layers(params, ids):
  return _xent(nnx.merge(SGRAPHDEF, params)(ids, scan_with_layers=True), ids)


OPTIMIZERS = {
    "adamw": lambda: optax.adamw(LR, eps=1e-6, weight_decay=0.1),
    "adamw_8bit": lambda: go.adamw_8bit(LR, eps=1e-6, weight_decay=0.1,
                                        min_size=64, block_size=64),
    "galore_adamw": lambda: go.galore_adamw(
        LR, rank=4, update_proj_gap=GAP, eps=1e-6, weight_decay=0.1,
        target_modules=["attn", "mlp"]),
    "galore_adamw_8bit": lambda: go.galore_adamw_8bit(
        LR, rank=4, update_proj_gap=GAP, eps=1e-6, target_modules=["attn",
                                                                    "mlp"],
        min_size=64),
    "galore_adafactor": lambda: go.galore_adafactor(
        LR, rank=4, update_proj_gap=GAP, target_modules=["attn", "mlp"]),
    "fira_adamw": lambda: go.fira_adamw(
        LR, rank=4, update_proj_gap=GAP, eps=1e-6, weight_decay=0.1,
        target_modules=["attn", "mlp"]),
    "apollo_adamw": lambda: go.apollo_adamw(
        LR, rank=4, update_proj_gap=GAP, eps=1e-6, weight_decay=0.1,
        target_modules=["attn", "mlp"]),
}


def stack_blocks(params):
  flat = nnx.to_pure_dict(params)
  flat["blocks"] = jax.tree.map(lambda *xs: np.stack(xs),
                                *[flat["blocks"][i] for i in range(L)])
  return flat


# ---------------------------------------------------------------------------


# The per-layer scan path is the same code for every optimizer; it is run
# with the two 8-bit ones (quantisation blocks per layer slice) to keep the
# file fast. The nnx.scan test below adds adamw on whole stacked leaves.
PER_LAYER_SCAN = ("adamw_8bit", "galore_adamw_8bit")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_matches_ordinary_step(name):
  """Three updates, across a projector refresh (updates 0 and 2)."""
  tx = OPTIMIZERS[name]()
  eight_bit = "8bit" in name
  ref_params, _, ref_losses = run(ordinary_step(loss_unrolled, tx), PARAMS,
                                  jit_init(tx.init, PARAMS), BATCHES[:3])

  # adamw_8bit is element-wise: also update the embedding and the head in
  # row blocks (64 values = one 8-bit block each), which must not change
  # anything.
  chunks = {"embed": 4, "head": 2} if name == "adamw_8bit" else None
  init, step = lw.make_layerwise_step(loss_unrolled, tx, jit=False,
                                      row_chunks=chunks)
  state = jit_init(init, PARAMS)
  if chunks:
    assert all(x.shape[0] == 2
               for x in jax.tree.leaves(state.leaves["head.kernel"]))
  params, _, losses = run(jax.jit(step, compiler_options=FAST), PARAMS,
                          state, BATCHES[:3])
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  assert_close(params, ref_params, eight_bit)
  if name not in PER_LAYER_SCAN:
    return

  # Stacked weights, one layer's update at a time inside scan_layers: every
  # layer slice has its own state, so this matches the unrolled model.
  init, step = lw.make_layerwise_step(loss_scan_layers, tx, jit=False,
                                      per_layer=["blocks"])
  state = jit_init(init, SPARAMS)
  assert all(x.shape[0] == L
             for x in jax.tree.leaves(state.leaves["blocks.attn.kernel"]))
  params, _, losses = run(jax.jit(step, compiler_options=FAST), SPARAMS,
                          state, BATCHES[:3])
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  assert_close(nnx.to_pure_dict(params), stack_blocks(ref_params), eight_bit)


def test_matches_ordinary_step_on_nnx_scan_model():
  """A model scanned with nnx.scan as is: stacked leaves are hooked whole."""
  tx = OPTIMIZERS["adamw"]()
  ref_params, _, _ = run(ordinary_step(loss_scanned, tx), SPARAMS,
                         jit_init(tx.init, SPARAMS), BATCHES[:3])
  init, step = lw.make_layerwise_step(loss_scanned, tx, jit=False)
  params, _, _ = run(jax.jit(step, compiler_options=FAST), SPARAMS,
                     jit_init(init, SPARAMS), BATCHES[:3])
  assert_close(params, ref_params)


def test_accumulation_matches_multisteps_in_low_rank_space():
  k = 2
  tx = OPTIMIZERS["galore_adamw"]()
  # A window that starts with a refresh gets identical micro-batches (there
  # the SVD sees the first micro-batch, MultiSteps the mean); the others get
  # different ones.
  micro = []
  for window in range(3):
    a, b = BATCHES[window], BATCHES[window + 1]
    micro += [a, a] if window % GAP == 0 else [a, b]
  multi = optax.MultiSteps(tx, k)
  ref_params, _, _ = run(ordinary_step(loss_unrolled, multi), PARAMS,
                         jit_init(multi.init, PARAMS), micro)
  steps = lw.make_layerwise_step(loss_unrolled, tx, accumulate_steps=k,
                                 jit=False)
  state = jit_init(steps.init, PARAMS)
  unpacked = steps.unpack_state(state, PARAMS)
  assert unpacked["blocks.0.attn.kernel"].acc.shape == (D, 4)  # low rank
  assert unpacked["blocks.0.mlp.kernel"].acc.shape == (4, F)
  assert unpacked["head.kernel"].acc.shape == (D, V)  # not a target
  step = jax.jit(steps.step, compiler_options=FAST)
  params = PARAMS
  for i, batch in enumerate(micro):
    before = params
    params, state, _ = step(params, state, batch)
    if i % k == 0:  # mid-window: nothing moves
      assert all(bool(jnp.all(x == y)) for x, y in zip(
          jax.tree.leaves(before), jax.tree.leaves(params)))
  assert_close(params, ref_params)
  assert int(steps.unpack_state(state, PARAMS)["head.kernel"].mini_step) == 0


def test_clip_norm_clips_each_leaf_on_its_own():
  g = {"a": np.full((3, 4), 2.0, np.float32), "b": np.array([0.3, 0.4])}
  clipped, _ = jax.jit(lw.clip_by_leaf_norm(1.0).update)(g, optax.EmptyState())
  np.testing.assert_allclose(np.linalg.norm(clipped["a"]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(clipped["b"], g["b"])  # norm 0.5: untouched

  c = 2.0  # between the leaves' gradient norms here
  grads = jax.jit(jax.grad(loss_unrolled), compiler_options=FAST)(PARAMS,
                                                                  BATCHES[0])
  norms = [float(np.linalg.norm(x)) for x in jax.tree.leaves(grads)]
  assert min(norms) < c < max(norms)
  init, step = lw.make_layerwise_step(loss_unrolled, optax.sgd(1.0),
                                      clip_norm=c, jit=False)
  params, _, _ = jax.jit(step, compiler_options=FAST)(
      PARAMS, jit_init(init, PARAMS), BATCHES[0])
  grads = [np.asarray(x) for x in jax.tree.leaves(grads)]
  per_leaf = [g * min(1.0, c / np.linalg.norm(g)) for g in grads]
  expected = [np.asarray(p) - g for p, g in zip(jax.tree.leaves(PARAMS),
                                               per_leaf)]
  assert_close(jax.tree.leaves(params), expected)
  # Not global-norm clipping, which would scale every leaf alike.
  total = np.sqrt(sum(np.sum(g**2) for g in grads))
  assert max(np.abs(g * c / total - q).max()
             for g, q in zip(grads, per_leaf)) > 1e-3


def test_jit_compiles_once_donates_and_updates_unused_leaves():
  traces = []

  def loss_without_head(params, ids):
    traces.append(1)
    model = nnx.merge(GRAPHDEF, params)
    x = model.embed(ids)
    for block in model.blocks:
      x = block(x)
    return jnp.mean(x.astype(jnp.float32) ** 2)

  wd = 0.1
  init, step = lw.make_layerwise_step(loss_without_head,
                                      optax.adamw(LR, weight_decay=wd))
  params = jax.tree.map(jnp.copy, PARAMS)
  state = jit_init(init, params)
  first = jax.tree.leaves(params)[0]
  params, state, _ = run(step, params, state, BATCHES[:3])
  assert len(traces) == 1  # one trace, one compilation
  assert first.is_deleted()  # donated
  # The head gets a zero gradient: AdamW only decays it, as optax would.
  np.testing.assert_allclose(params["head"]["kernel"][...],
                             PARAMS["head"]["kernel"][...] * (1 - LR * wd)**3,
                             rtol=1e-6)
  moved = [not np.allclose(x, y) for x, y in zip(jax.tree.leaves(params),
                                                 jax.tree.leaves(PARAMS))]
  assert all(moved)


def _weight_copies(hlo: str) -> list[str]:
  """Entry-computation copies of the ``params`` arguments of a step."""
  entry = hlo[hlo.index("\nENTRY"):]
  args = set(re.findall(r"%([\w.\-]+) = \S+ parameter\(", entry))
  copies = re.findall(r"= \S+ copy\(%([\w.\-]+)\)", entry)
  return [c for c in copies if c in args and c.startswith("params")]


def test_call_layer_orders_each_update_after_the_layers_input_gradient():
  k = jax.random.split(jax.random.key(1), 4)
  params = [{"w": jax.random.normal(k[i], (64, 64)) * 0.2} for i in range(3)]
  x = jax.random.normal(k[3], (8, 64))
  scale = jnp.linspace(0.5, 1.5, 64)  # closed over, as rotary tables are
  layer = lambda h, p: jnp.tanh(h @ p["w"]) * scale

  def loss(params, x, ordered=True):
    for p in params:
      x = lw.call_layer(layer, x, p) if ordered else layer(x, p)
    return jnp.mean(x**2)

  # Outside a layer-wise step it is the plain call.
  np.testing.assert_array_equal(lw.call_layer(layer, x, params[0]),
                                layer(x, params[0]))
  tx = optax.adamw(LR, weight_decay=0.1)
  ref, _, ref_losses = run(
      ordinary_step(lambda p, b: loss(p, b, ordered=False), tx), params,
      tx.init(params), [x, x * 0.5, x * 2])
  init, step = lw.make_layerwise_step(loss, tx, jit=False)
  params_lw, _, losses = run(jax.jit(step), params, jit_init(init, params),
                             [x, x * 0.5, x * 2])
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  assert_close(params_lw, ref)

  # The point of it: the donated weights are updated in place, with no copy
  # kept for the input-gradient products (without call_layer XLA:CPU keeps
  # one per weight read in the backward pass).
  state = jax.eval_shape(init, params)
  hlo = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, state, x).compile().as_text()
  assert not _weight_copies(hlo)


def test_errors():
  with pytest.raises(ValueError, match="matches no parameter"):
    lw.make_layerwise_step(loss_scanned, optax.sgd(0.1),
                           per_layer="blocks").init(SPARAMS)
  init, step = lw.make_layerwise_step(loss_scanned, optax.sgd(0.1),
                                      per_layer=["blocks"], jit=False)
  with pytest.raises(ValueError, match="did not go through scan_layers"):
    jax.eval_shape(step, SPARAMS, jax.eval_shape(init, SPARAMS), BATCHES[0])
  with pytest.raises(ValueError, match="accumulate_steps"):
    lw.make_layerwise_step(loss_unrolled, optax.sgd(0.1), accumulate_steps=0)
  with pytest.raises(ValueError, match="not element-wise"):
    lw.make_layerwise_step(loss_unrolled, OPTIMIZERS["galore_adamw"](),
                           row_chunks={"attn": 2}).init(PARAMS)
  with pytest.raises(ValueError, match="cannot be split"):
    lw.make_layerwise_step(loss_unrolled, optax.sgd(0.1),
                           row_chunks={"head": 3}).init(PARAMS)


_SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    import galore_optax as go
    from galore_optax import layerwise as lw

    mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    k = jax.random.split(jax.random.key(0), 3)
    params = {"attn": jax.random.normal(k[0], (32, 16)) * 0.1,
              "mlp": jax.random.normal(k[1], (16, 32)) * 0.1,
              "norm": jnp.ones(32)}
    x = jax.random.normal(k[2], (8, 32))
    def loss(p, x):
      h = jnp.tanh(x @ p["attn"]) @ p["mlp"]
      return jnp.mean((h * p["norm"] - x) ** 2)
    tx = go.galore_adamw_8bit(1e-2, rank=4, update_proj_gap=2, min_size=64)
    def ordinary(p, s, x):
      g = jax.grad(loss)(p, x)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    fast = {"xla_backend_optimization_level": 0,
            "xla_llvm_disable_expensive_passes": True}
    p1, s1 = params, jax.jit(tx.init)(params)
    shard = {"attn": P("d", None), "mlp": P("d", None), "norm": P("d")}
    p2 = {n: jax.device_put(v, NamedSharding(mesh, shard[n]))
          for n, v in params.items()}
    init, step = lw.make_layerwise_step(loss, tx, jit=False)
    step = jax.jit(step, donate_argnums=(0, 1), compiler_options=fast)
    s2 = init(p2)  # eager: the states follow the parameters' shardings
    ordinary = jax.jit(ordinary, compiler_options=fast)
    for _ in range(3):
      p1, s1 = ordinary(p1, s1, x)
      p2, s2, _ = step(p2, s2, x)
    for n in params:
      assert p2[n].sharding.spec == shard[n], (n, p2[n].sharding)
      np.testing.assert_allclose(p1[n], p2[n], atol=2e-6)
    print("OK")
    """)


def test_sharded_parameters_keep_their_sharding():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True,
                       text=True, env=env, timeout=300)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_fira_accumulates_full_gradients_as_multisteps():
  """Fira uses the whole gradient, not only its projection: per-layer
  accumulation keeps it at full size and equals MultiSteps."""
  k = 2
  tx = OPTIMIZERS["fira_adamw"]()
  micro = [BATCHES[0], BATCHES[1], BATCHES[2], BATCHES[3]]
  multi = optax.MultiSteps(tx, k)
  ref_params, _, _ = run(ordinary_step(loss_unrolled, multi), PARAMS,
                         jit_init(multi.init, PARAMS), micro)
  steps = lw.make_layerwise_step(loss_unrolled, tx, accumulate_steps=k,
                                 jit=False)
  state = jit_init(steps.init, PARAMS)
  unpacked = steps.unpack_state(state, PARAMS)
  assert unpacked["blocks.0.attn.kernel"].acc.shape == (D, D)  # full size
  params, _, _ = run(jax.jit(steps.step, compiler_options=FAST), PARAMS,
                     state, micro)
  assert_close(params, ref_params)
