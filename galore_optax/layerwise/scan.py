"""``scan_layers`` inside a step: one layer's gradient at a time.

The forward pass is a ``lax.scan`` over the layers that saves each layer's
input. The backward pass is a reverse loop that recomputes layer ``l`` from
its saved input and runs ``call_layer``'s backward pass on it, updating layer
``l``'s slices of the ``per_layer`` leaves and of their packed states in
place (the loop carries the whole stacks), so only one layer's gradients
exist at a time. Gradients of the other inputs (leaves not in ``per_layer``,
arrays ``f`` closes over) are accumulated over the layers as in an ordinary
scan.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from galore_optax.layerwise import context as context_lib
from galore_optax.layerwise import trees

Context = context_lib.LayerwiseContext


@dataclasses.dataclass(frozen=True, eq=False)
class ScanCall:
  """One ``scan_layers`` call inside a step.

  Attributes:
    layer: one layer as a ``call_layer`` layer (its ``hooked`` marks the
      ``per_layer`` leaves among the layer's leaves).
    num_layers: the length of the layer axis.
  """

  layer: context_lib.LayerCall
  num_layers: int

  def forward(self, reg_p: list[Any], oth_p: list[Any], carry: Any,
              consts: list[Any], save: bool) -> tuple[Any, Any]:
    """The scan over the layers: (final carry, each layer's input or
    None)."""
    layer = self.layer

    def body(c, sl):
      out = layer.fn(c, layer.treedef.unflatten(sl), *consts)
      return out, (c if save else None)

    return jax.lax.scan(body, carry,
                        trees.interleave(layer.hooked, reg_p, oth_p))


def scan_layerwise(ctx: Context, f: Callable[..., Any], carry: Any,
                   leaves: list[Any], ldef: Any, args: tuple[Any, ...] = ()
                   ) -> Any:
  """``scan_layers`` over a stack holding ``per_layer`` leaves of ``ctx``.

  Args:
    ctx: the step's context.
    f: ``(carry, layer, *args) -> carry``.
    carry: the initial carry.
    leaves: the flattened stacked layers.
    ldef: their structure.
    args: the layer's other inputs, the same for every layer.

  Returns:
    The final carry; the backward pass updates the ``per_layer`` leaves.

  Raises:
    ValueError: for leaves without a common layer axis, a leaf scanned
      twice, or ``f`` closing over a ``per_layer`` leaf.
  """
  sizes = {x.shape[0] if x.ndim else None for x in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError("scan_layers: every leaf of `layers` needs the same "
                     f"leading layer axis, got sizes {sizes}.")
  (num_layers,) = sizes
  found = [ctx.per_layer_index(x) for x in leaves]
  registered = tuple(i is not None for i in found)
  leaf_ids = tuple(i for i in found if i is not None)
  for i in leaf_ids:
    ctx.consume_per_layer(i)
  if num_layers == 0:
    # Nothing to run or update: the stacks' zero cotangents are their
    # (empty) new values and states.
    ctx.reached.update(leaf_ids)
    return carry
  reg_states = [ctx.packed[i] for i in leaf_ids]
  example = ldef.unflatten([x[0] for x in leaves])
  f_conv, consts = jax.closure_convert(f, carry, example, *args)
  if any(ctx.per_layer_index(c) is not None for c in consts):
    raise ValueError("scan_layers: `f` closes over a per_layer stacked leaf; "
                     "it must only see its layer slice.")
  # As in call_layer, ``f`` itself (not its traced copy) must run for
  # ``dense`` to find the layer's kernels; it can when it closes over no
  # traced value.
  call = ScanCall(
      context_lib.LayerCall(f_conv if consts else f, ldef, registered,
                            leaf_ids), num_layers)
  return _scan_update(ctx, call, trees.select(leaves, registered), reg_states,
                      trees.select(leaves, [not r for r in registered]),
                      carry, [*args, *consts])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scan_update(ctx: Context, call: ScanCall, reg_p: list[Any],
                 reg_s: list[Any], oth_p: list[Any], carry: Any,
                 cs: list[Any]) -> Any:
  """The scan, whose backward rule (``backward``) updates the stacks."""
  del ctx, reg_s
  return call.forward(reg_p, oth_p, carry, cs, False)[0]


def _scan_update_fwd(ctx: Context, call: ScanCall, reg_p: list[Any],
                     reg_s: list[Any], oth_p: list[Any], carry: Any,
                     cs: list[Any]) -> tuple[Any, tuple[Any, ...]]:
  first = lambda x: x[0]
  ctx.check_layer(call.layer, carry, [first(x) for x in oth_p],
                  [(first(p), jax.tree.map(first, s), None)
                   for p, s in zip(reg_p, reg_s)], cs)
  out, saved = call.forward(reg_p, oth_p, carry, cs, True)
  return out, (reg_p, reg_s, oth_p, saved, cs)


def _scan_update_bwd(ctx: Context, call: ScanCall, res: tuple[Any, ...],
                     ct_out: Any) -> tuple[Any, ...]:
  return backward(ctx, call, res, ct_out)


_scan_update.defvjp(_scan_update_fwd, _scan_update_bwd)


def backward(ctx: Context, call: ScanCall, res: tuple[Any, ...],
             ct_out: Any) -> tuple[Any, ...]:
  """The reverse loop: recompute, differentiate and update each layer.

  Layer ``l``'s backward pass is ``call_layer``'s
  (``LayerwiseContext.layer_backward``) on its slices: kernels multiplied
  through ``dense`` are updated inside their products' backward rules (with
  ``fused=True`` from their low-rank gradients between refreshes), the
  other ``per_layer`` slices at the layer's end.

  Args:
    ctx: the step's context.
    call: the scan.
    res: the forward pass's residuals (``per_layer`` stacks and their
      packed states, the other stacked leaves, each layer's input, the
      consts).
    ct_out: the final carry's cotangent.

  Returns:
    Cotangents of ``(reg_p, reg_s, oth_p, carry, cs)``: the new stacks and
    states, then the ordinary gradients.
  """
  reg_p, reg_s, oth_p, saved, cs = res
  c_leaves0, cdef = jax.tree.flatten(saved)
  c_float = [trees.is_float(x) for x in c_leaves0]
  k_float = [trees.is_float(jnp.asarray(x)) for x in cs]
  o_float = [trees.is_float(x) for x in oth_p]
  ct_c = trees.select(jax.tree.leaves(ct_out), c_float)
  c_zero = [trees.float0_like(x[0]) for x in c_leaves0]

  def body(step, loop):
    reg_p, reg_s, ct_oth, ct_c, ct_k = loop
    l = call.num_layers - 1 - step
    take = lambda x: jax.lax.dynamic_index_in_dim(x, l, 0, keepdims=False)
    put = lambda x, v: jax.lax.dynamic_update_index_in_dim(x, v, l, 0)
    c_l = cdef.unflatten([take(x) for x in c_leaves0])
    h_in = [(take(p), jax.tree.map(take, s), None)
            for p, s in zip(reg_p, reg_s)]
    ct_l = cdef.unflatten(trees.merge(c_zero, c_float, ct_c))
    ct_c, g_oth, new_h, g_k = ctx.layer_backward(
        call.layer, (c_l, [take(x) for x in oth_p], h_in, list(cs)), ct_l)
    reg_p = [put(x, new_p) for x, (new_p, _, _) in zip(reg_p, new_h)]
    reg_s = [jax.tree.map(put, s, new_s)
             for s, (_, new_s, _) in zip(reg_s, new_h)]
    ct_oth = [put(a, g.astype(a.dtype))
              for a, g in zip(ct_oth, trees.select(g_oth, o_float))]
    ct_k = [a + g for a, g in zip(ct_k, trees.select(g_k, k_float))]
    return (reg_p, reg_s, ct_oth,
            trees.select(jax.tree.leaves(ct_c), c_float), ct_k)

  loop = (list(reg_p), list(reg_s),
          [jnp.zeros_like(x) for x in trees.select(oth_p, o_float)], ct_c,
          [jnp.zeros_like(x) for x in trees.select(list(cs), k_float)])
  reg_p, reg_s, ct_oth, ct_c, ct_k = jax.lax.fori_loop(
      0, call.num_layers, body, loop)
  ct_oth_all = trees.merge([trees.float0_like(x) for x in oth_p], o_float,
                           ct_oth)
  ct_carry = cdef.unflatten(trees.merge(c_zero, c_float, ct_c))
  ct_cs = trees.merge([trees.float0_like(x) for x in cs], k_float, ct_k)
  return reg_p, reg_s, ct_oth_all, ct_carry, ct_cs
