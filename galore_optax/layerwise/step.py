"""``make_layerwise_step``: wires the per-layer step's pieces together.

``init`` packs each leaf's optimizer state (``unit_update``, ``packing``).
``step`` hands the loss function each leaf through an identity hook
(``primitives.hook``) while a ``context.LayerwiseContext`` is active, and
differentiates the hooked loss with respect to the stored leaves and their
packed states: the backward rules update each leaf as its gradient arrives,
so the "gradients" are the new parameters and states. Leaves the loss does
not use are updated with a zero gradient afterwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from galore_optax.layerwise import carrier
from galore_optax.layerwise import context as context_lib
from galore_optax.layerwise import layout as layout_lib
from galore_optax.layerwise import options as options_lib
from galore_optax.layerwise import primitives
from galore_optax.layerwise import unit_update
from galore_optax.layerwise.options import PerLayerSpec
from galore_optax.layerwise.packing import LayerwiseState
from galore_optax.layerwise.packing import LeafState


@dataclasses.dataclass(frozen=True)
class LayerwiseStep:
  """What ``make_layerwise_step`` returns; unpacks as ``(init, step)``.

  Attributes:
    init: ``params -> LayerwiseState`` (eager; wrap it in ``jax.jit`` with
      ``out_shardings`` to place sharded states).
    step: ``(params, opt_state, batch, key=None) -> (params, opt_state,
      loss)``, or ``(params, opt_state, loss, aux)`` with ``has_aux``;
      jit-compiled with ``params`` and ``opt_state`` donated unless asked
      otherwise. ``key`` (a PRNG key, e.g. ``fold_in(base, step)``) is the
      stochastic-rounding key of int8 leaves; without it they round to
      nearest. Float-only parameters ignore it.
    unpack_state: ``(opt_state, params) -> {name: LeafState}``, the ordinary
      (unpacked) optax states, e.g. to read counts or save checkpoints in
      optax form; ``params`` may be abstract.
  """

  init: Callable[[Any], LayerwiseState]
  step: Callable[..., Any]
  unpack_state: Callable[[LayerwiseState, Any], dict[str, LeafState]]

  def __iter__(self):
    return iter((self.init, self.step))


def make_layerwise_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    *,
    clip_norm: float | None = None,
    accumulate_steps: int = 1,
    accumulate_dtype: Any = jnp.float32,
    per_layer: PerLayerSpec = None,
    row_chunks: Mapping[str, int] | None = None,
    weight_dtype: Any = jnp.float32,
    fused: bool = False,
    recompute: bool | Callable[..., bool] = True,
    has_aux: bool = False,
    donate: bool = True,
    jit: bool = True,
) -> LayerwiseStep:
  """Builds a train step whose updates happen inside the backward pass.

  See ``galore_optax.layerwise``'s docstring for the mechanism, what is
  supported and the exact semantics of clipping and accumulation. Without
  clipping and accumulation the new parameters equal those of the ordinary
  step
  ``g = grad(loss)(params); u, s = tx.update(g, s, params);
  params = optax.apply_updates(params, u)`` to float32 rounding.

  Example::

    import jax.numpy as jnp
    from galore_optax import galore_adamw_8bit
    from galore_optax.layerwise import dense

    def loss_fn(params, batch):
      x, y = batch
      return jnp.mean((dense(x, params["w"]) - y) ** 2)

    params = {"w": jnp.ones((16, 8))}
    init, step = make_layerwise_step(loss_fn, galore_adamw_8bit(1e-2, rank=4))
    opt_state = init(params)
    batch = (jnp.ones((4, 16)), jnp.zeros((4, 8)))
    params, opt_state, loss = step(params, opt_state, batch)

  Args:
    loss_fn: ``(params, batch) -> loss`` (or ``(loss, aux)`` with
      ``has_aux``); a scalar floating loss.
    tx: the optimizer, any ``optax.GradientTransformation`` whose update of
      one leaf depends on that leaf only.
    clip_norm: if set, each leaf's (each layer slice's, for ``per_layer``
      leaves) gradient is scaled to Frobenius norm at most ``clip_norm``.
    accumulate_steps: micro-batches per update (``k``).
    accumulate_dtype: dtype of the accumulators.
    per_layer: stacked leaves (leading layer axis) to update one layer at a
      time inside ``scan_layers``: a regex that must match the whole module
      name, a list of names/substrings/regexes (as ``target_modules``: module
      names), or a predicate on leaf names. Their states are built per layer
      slice.
    row_chunks: ``{name: k}`` (module names matched as one ``target_modules``
      entry: equal, substring or regex): update these leaves ``k`` blocks of
      rows at a time, in a loop, so the optimizer's temporaries (e.g. 8-bit
      Adam's dequantised moments) exist for one block at a time. Each block
      has its own state (a leading axis of size ``k``). Only for leaves whose
      update is element-wise (Adam, AdamW, 8-bit Adam with blocks of
      ``block_size`` values that do not straddle row blocks, SGD, Lion; not
      GaLore-projected or Adafactor-factored leaves, which raise or change
      meaning): then the result is the same as updating the leaf whole.
    weight_dtype: dtype that int8 leaves (``weight_quantization.
      QuantizedWeight`` nodes of ``params``) are dequantised to, for the
      model and the optimizer (the model's parameter dtype).
    fused: between refreshes, make the low-rank gradient of every kernel
      that ``dense`` multiplies and ``galore_project`` projects directly from
      the product's inputs (``galore_optax.gradient_supply``), never its
      ``m x n`` gradient; refresh steps take the full gradient as before.
      With ``clip_norm``, such a low-rank gradient is clipped by its own
      norm (the full gradient's is not known without the full gradient).
    recompute: recompute each ``call_layer`` layer's forward pass in its
      backward pass (activation checkpointing: only the layer's inputs are
      kept). ``False`` keeps the residuals of every layer's forward pass
      (activations, and int8 layers' dequantised weights) until its
      backward pass, as an ordinary step's backward pass does: no
      recomputation (about 15% fewer flops for a transformer), the
      activation memory of an ordinary step. A ``jax.checkpoint`` policy
      keeps what it saves and recomputes the rest, e.g.
      ``layerwise.KEEP_DENSE_OUTPUTS``: the ``dense`` products' outputs are kept, so only the cheap
      element-wise work and the attention are recomputed (LLaMA-60M at
      8 x 256: 14% fewer flops than recomputing, 0.3 GB more activations;
      ``BENCHMARKS.md``). Layers run by ``scan_layers`` are always
      recomputed (keeping their residuals would stack a copy of every
      layer's weights).
    has_aux: ``loss_fn`` returns ``(loss, aux)``.
    donate: donate ``params`` and ``opt_state`` to the step, so the new
      ones reuse their buffers.
    jit: return the step jit-compiled (else a traceable function).

  Returns:
    A ``LayerwiseStep`` (unpacks as ``(init, step)``).

  Raises:
    ValueError: for invalid arguments; at trace time if a ``per_layer``
      leaf does not go through ``scan_layers``.
  """
  options = options_lib.make_options(
      clip_norm=clip_norm, accumulate_steps=accumulate_steps,
      accumulate_dtype=accumulate_dtype, per_layer=per_layer,
      row_chunks=row_chunks, weight_dtype=weight_dtype, fused=fused,
      recompute=recompute)
  layouts = layout_lib.LayoutCache(tx, options)

  def updater_of(params: Any) -> unit_update.UnitUpdater:
    return unit_update.UnitUpdater(tx, options, layouts(params))

  def init(params: Any) -> LayerwiseState:
    updater = updater_of(params)
    names = updater.layout.names
    stored = updater.layout.treedef.flatten_up_to(params)
    return LayerwiseState({name: updater.init_leaf(i, p)
                           for i, (name, p) in enumerate(zip(names, stored))})

  def unpack(state: LayerwiseState, params: Any) -> dict[str, LeafState]:
    updater = updater_of(params)
    return {name: updater.unpack_leaf(i, state.leaves[name])
            for i, name in enumerate(updater.layout.names)}

  def step(params: Any, state: LayerwiseState, batch: Any,
           key: jax.Array | None = None) -> tuple[Any, ...]:
    return run_step(loss_fn, updater_of(params), params, state, batch, key,
                    has_aux=has_aux)

  if jit:
    step = jax.jit(step, donate_argnums=(0, 1) if donate else ())
  return LayerwiseStep(init, step, unpack)


def run_step(loss_fn: Callable[..., Any], updater: unit_update.UnitUpdater,
             params: Any, state: LayerwiseState, batch: Any,
             key: jax.Array | None, *, has_aux: bool) -> tuple[Any, ...]:
  """One step (traceable): the body of ``make_layerwise_step``'s ``step``.

  Args:
    loss_fn: ``(params, batch) -> loss`` (or ``(loss, aux)``).
    updater: the units' updater for ``params``' layout.
    params: the stored parameters.
    state: their packed states.
    batch: the loss function's batch.
    key: the rounding key of int8 leaves, or None.
    has_aux: ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``(params, state, loss)``, with ``aux`` appended under ``has_aux``.

  Raises:
    ValueError: if ``state`` lacks a leaf, or at trace time if a
      ``per_layer`` leaf does not go through ``scan_layers``.
  """
  layout = updater.layout
  stored = layout.treedef.flatten_up_to(params)
  missing = [n for n in layout.names if n not in state.leaves]
  if missing:
    raise ValueError(f"opt_state has no state for {missing[:5]}; was it "
                     "made by this step's init for these parameters?")
  packed = [state.leaves[n] for n in layout.names]
  reached: set[int] = set()
  key_impl, leaf_keys = _leaf_keys(layout, key)
  key_data = [None if k is None else jax.random.key_data(k)
              for k in leaf_keys]
  leaves = [carrier.to_carrier(x) if q else x
            for x, q in zip(stored, layout.quantized)]

  def hooked_loss(leaves, packed):
    ctx = context_lib.LayerwiseContext(updater, leaves, packed, key_data,
                                       key_impl, reached)
    ctx.set_hooked([
        x if layout.per_layer[i] else
        primitives.hook(ctx, i, x, packed[i], key_data[i])
        for i, x in enumerate(leaves)])
    with context_lib.activate(ctx):
      out = loss_fn(layout.treedef.unflatten(ctx.hooked), batch)
    lost = ctx.unconsumed_per_layer()
    if lost:
      raise ValueError(
          f"per_layer leaves {lost[:5]} did not go through scan_layers (as "
          "the very arrays passed to the loss): their gradients would be "
          "taken as new parameters. Run the stack with "
          "galore_optax.layerwise.scan_layers or drop them from per_layer.")
    if has_aux:
      loss, aux = out
    else:
      loss, aux = out, None
    return loss, aux

  (loss, aux), (new_leaves, new_packed) = jax.value_and_grad(
      hooked_loss, argnums=(0, 1), has_aux=True)(leaves, packed)
  new_leaves, new_packed = list(new_leaves), list(new_packed)
  for i in range(len(leaves)):
    if layout.quantized[i]:
      new_leaves[i] = carrier.from_carrier(new_leaves[i])
    if i in reached:
      continue
    # The loss does not use this leaf: its hook never ran. Update it with a
    # zero gradient, as an ordinary step would.
    full = stored[i].codes if layout.quantized[i] else stored[i]
    zeros = jnp.zeros(full.shape, layout.unit_avals[i].dtype)
    new_leaves[i], new_packed[i] = updater.update_leaf(
        i, zeros, stored[i], packed[i], leaf_keys[i])
  new_params = layout.treedef.unflatten(new_leaves)
  new_state = LayerwiseState(dict(zip(layout.names, new_packed)))
  if has_aux:
    return new_params, new_state, loss, aux
  return new_params, new_state, loss


def _leaf_keys(layout: layout_lib.Layout, key: jax.Array | None
               ) -> tuple[Any, list[jax.Array | None]]:
  """The PRNG implementation and each leaf's rounding key (int8 leaves).

  The i-th int8 leaf rounds with ``fold_in(key, i)``, as
  ``weight_quantization.apply_updates`` does; key data (not typed keys)
  cross the custom_vjp boundaries, hence the implementation.
  """
  if key is None or not any(layout.quantized):
    return None, [None] * len(layout.names)
  if not jax.dtypes.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  return jax.random.key_impl(key), [
      None if j is None else jax.random.fold_in(key, j)
      for j in layout.qindex]
