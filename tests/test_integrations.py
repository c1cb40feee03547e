"""galore_adamw where users put it: each integration trains a small model."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from galore_optax import apollo_adamw
from galore_optax import apollo_mini
from galore_optax import fira_adamw
from galore_optax import galore_adamw


class Block(nnx.Module):
  """A toy residual block whose paths contain ``self_attn`` and ``mlp``."""

  def __init__(self, dim: int, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.self_attn = nnx.Linear(dim, dim, use_bias=False, rngs=rngs,
                                param_dtype=param_dtype)
    self.mlp = nnx.Linear(dim, dim, rngs=rngs, param_dtype=param_dtype)
    self.norm = nnx.RMSNorm(dim, rngs=rngs, param_dtype=param_dtype)

  def __call__(self, x):
    return x + self.mlp(jax.nn.gelu(self.self_attn(self.norm(x))))


DIM = 16
X = jax.random.normal(jax.random.key(1), (64, DIM))
Y = jnp.tanh(X @ jax.random.normal(jax.random.key(2), (DIM, DIM)) / 4)


def _loss(model, x=X, y=Y):
  return jnp.mean((model(x).astype(jnp.float32) - y) ** 2)


def _tx(**kwargs):
  defaults = dict(learning_rate=5e-2, rank=4, update_proj_gap=5,
                  target_modules=["attn", "mlp"])
  return galore_adamw(**{**defaults, **kwargs})


def _train_pure(tx, params, steps=40, loss_of=None, donate=False):
  """A functional (params, opt_state) loop; returns the loss history."""
  graphdef, _ = nnx.split(Block(DIM, nnx.Rngs(0)))
  loss_of = loss_of or (lambda p: _loss(nnx.merge(graphdef, p)))

  def step(params, state):
    loss, grads = jax.value_and_grad(loss_of)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  step = jax.jit(step, donate_argnums=(0, 1) if donate else ())
  state = tx.init(params)
  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return losses


def _params(dtype=jnp.float32):
  return nnx.state(Block(DIM, nnx.Rngs(0), param_dtype=dtype), nnx.Param)


def _assert_learns(losses, factor=0.7):
  assert all(jnp.isfinite(jnp.asarray(losses)))
  assert losses[-1] < factor * losses[0], (losses[0], losses[-1])


def test_plain_jit():
  _assert_learns(_train_pure(_tx(), _params()))


def test_chain_with_global_norm_clipping():
  tx = optax.chain(optax.clip_by_global_norm(1.0), _tx())
  _assert_learns(_train_pure(tx, _params()))


# Lazy refresh: a traced threshold, int4 projectors (gap 5 over 40 steps
# fills the queue); its queue size fixes a shape, so it is static.
@pytest.mark.parametrize("options,static", [
    ({}, ()),
    ({"refresh_schedule": "lazy", "lazy_threshold": 0.4,
      "projector_dtype": "int4"}, ("lazy_queue_size",))],
    ids=["fixed", "lazy"])
def test_inject_hyperparams_with_schedule(options, static):
  schedule = optax.warmup_cosine_decay_schedule(0.0, 5e-2, 5, 40, 5e-3)
  tx = optax.inject_hyperparams(galore_adamw, static_args=(
      "rank", "update_proj_gap", *static))(
                                    learning_rate=schedule, rank=4,
                                    update_proj_gap=5,
                                    target_modules=["attn", "mlp"],
                                    **options)
  params = _params()
  state = tx.init(params)
  assert float(state.hyperparams["learning_rate"]) == 0.0
  _assert_learns(_train_pure(tx, params))


@pytest.mark.parametrize("alias", [fira_adamw, apollo_adamw, apollo_mini],
                         ids=lambda f: f.__name__)
def test_inject_hyperparams_successors(alias):
  # Fira and APOLLO: the schedule, weight decay and (APOLLO) the sqrt(scale)
  # of a traced scale are hyperparameters like GaLore's.
  schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-2, 5, 40, 2e-3)
  tx = optax.inject_hyperparams(alias, static_args=("rank",
                                                    "update_proj_gap"))(
      learning_rate=schedule, update_proj_gap=5, weight_decay=0.01,
      target_modules=["attn", "mlp"],
      **({} if alias is apollo_mini else {"rank": 4}))
  state = tx.init(_params())
  assert "scale" in state.hyperparams
  _assert_learns(_train_pure(tx, _params()))


@pytest.mark.parametrize("options", [
    {"rank": 4}, {"refresh_schedule": "lazy", "lazy_queue_size": 3}],
    ids=["rank", "lazy_queue_size"])
def test_inject_hyperparams_without_static_args_explains_fix(options):
  with pytest.raises(ValueError, match="static_args"):
    optax.inject_hyperparams(galore_adamw, static_args=(
        () if "rank" in options else ("rank",)))(
            learning_rate=1e-2, **options).init(_params())


def test_multi_steps_accumulates():
  tx = optax.MultiSteps(_tx(), every_k_schedule=2)
  losses = _train_pure(tx, _params(), steps=60)
  _assert_learns(losses)
  # Parameters only move on every second call.
  assert losses[0] == losses[1]


def test_apply_if_finite_skips_bad_steps():
  tx = optax.apply_if_finite(_tx(), max_consecutive_errors=3)
  params = _params()
  state = tx.init(params)
  bad = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
  _, state = tx.update(bad, state, params)
  assert int(state.notfinite_count) == 1
  finite = jax.tree.leaves(state.inner_state)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in finite
             if jnp.issubdtype(x.dtype, jnp.floating))
  _assert_learns(_train_pure(tx, params))


def test_nnx_optimizer():
  model = Block(DIM, nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(_loss)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(40)]
  _assert_learns(losses)


def test_donated_buffers():
  _assert_learns(_train_pure(_tx(), _params(), donate=True))


def test_bf16_parameters():
  params = _params(jnp.bfloat16)
  losses = _train_pure(_tx(learning_rate=5e-2), params)
  _assert_learns(losses)


def test_weight_decay_matches_optax_adamw_without_targets():
  """Non-target leaves get exactly optax.adamw (decoupled decay)."""
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  ours = galore_adamw(1e-2, weight_decay=0.1, target_modules=["mlp"])
  ref = optax.adamw(1e-2, weight_decay=0.1, eps=1e-8)
  u1, _ = ours.update(grads, ours.init(params), params)
  u2, _ = ref.update(grads, ref.init(params), params)
  assert jnp.allclose(u1["norm"]["scale"].value, u2["norm"]["scale"].value)
  assert jnp.allclose(u1["self_attn"]["kernel"].value,
                      u2["self_attn"]["kernel"].value)
