"""The trace-time context of a per-layer step, and its backward rules.

While the step traces the loss function, a ``LayerwiseContext`` is active
(``activate``/``current``). It holds what the loss function was handed for
each parameter leaf (the output of the leaf's identity hook), each leaf's
stored value, packed optimizer state and rounding key data, and answers the
public primitives' questions (``primitives``): is this array one of the
step's leaves, which one, has it been used already. Its methods are the
backward rules of those primitives: they receive a gradient and return, as
cotangents, the leaf's *new* stored value and packed state
(``unit_update``), ordering the work with ``galore_optax.ordering`` so that
XLA can reuse memory.

Leaves are found by identity against the very objects the step created and
handed to the loss function (never by ``id()``); a ``dense`` product inside
an inner transformation of a layer (a ``lax.scan`` body, ``jax.checkpoint``)
is told apart by comparing JAX's trace state with the layer's.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp

from galore_optax import gradient_supply
from galore_optax import ordering
from galore_optax import weight_quantization
from galore_optax.layerwise import carrier
from galore_optax.layerwise import trees
from galore_optax.layerwise import unit_update

# The contexts of the step(s) being traced, innermost last.
_ACTIVE: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar(
    "galore_optax_layerwise_context", default=())


@contextlib.contextmanager
def activate(ctx: LayerwiseContext) -> Iterator[LayerwiseContext]:
  """Makes ``ctx`` the current context inside the ``with`` block.

  Args:
    ctx: the context.

  Yields:
    ``ctx``.
  """
  token = _ACTIVE.set(_ACTIVE.get() + (ctx,))
  try:
    yield ctx
  finally:
    _ACTIVE.reset(token)


def current() -> LayerwiseContext | None:
  """The innermost active context, or None outside a per-layer step."""
  stack = _ACTIVE.get()
  return stack[-1] if stack else None


def trace_state() -> Any:
  """A token of the trace now running, comparable with ``==``.

  Returns:
    ``jax.extend.core.get_opaque_trace_state()`` (``jax.core``'s before JAX
    0.10).
  """
  get = getattr(jax.extend.core, "get_opaque_trace_state", None)
  if get is None:
    get = jax.core.get_opaque_trace_state
  return get(convention="galore_optax")


def matmul(x: jax.Array, kernel: jax.Array, dtype: Any) -> jax.Array:
  """``x @ kernel`` over ``x``'s last axis, as ``nnx.Linear`` computes it.

  Args:
    x: ``(..., d_in)`` inputs.
    kernel: ``(d_in, d_out)`` weight.
    dtype: both operands are cast to it (None: their promoted dtype).

  Returns:
    ``(..., d_out)``.
  """
  if dtype is None:
    dtype = jnp.result_type(x, kernel)
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


@dataclasses.dataclass(frozen=True, eq=False)
class LayerCall:
  """One ``call_layer`` inside a step: the layer and where its leaves are.

  Attributes:
    fn: ``(carry, params, *consts) -> carry``: ``f`` itself, or its
      copy made by ``jax.closure_convert`` when ``f`` closes over traced values.
    treedef: the structure of the layer's ``params``.
    hooked: per leaf of ``params``, whether it is one of the step's leaves.
    leaf_ids: the step's leaf index of each of those.
  """

  fn: Callable[..., Any]
  treedef: Any
  hooked: tuple[bool, ...]
  leaf_ids: tuple[int, ...]


class LayerwiseContext:
  """Trace-time registry of a step's leaves and the primitives' rules.

  Args:
    updater: updates the leaves' units (holds the layout).
    leaves: each leaf's stored value as the loss trace sees it (int8 leaves
      as carriers).
    packed: each leaf's packed state.
    key_data: each int8 leaf's rounding key data, or None.
    key_impl: the PRNG implementation of the key data.
    reached: the step's set of updated leaves, filled in by the rules.
  """

  def __init__(self, updater: unit_update.UnitUpdater, leaves: list[Any],
               packed: list[Any], key_data: list[Any], key_impl: Any,
               reached: set[int]):
    self.updater = updater
    self.layout = updater.layout
    self.leaves = leaves
    self.packed = packed
    self.key_data = key_data
    self.key_impl = key_impl
    self.reached = reached
    # What the loss function received for each leaf (the hook's output, or
    # the leaf itself for a per_layer leaf), found again by identity.
    self.hooked: list[Any] = []
    self.consumed: set[int] = set()  # per_layer leaves run by scan_layers
    self.taken: set[int] = set()  # leaves consumed by dense & co.
    # Inside a call_layer's layer: (weight seen by the layer, leaf index,
    # its (stored, packed, key data)) per leaf, the trace the layer runs in,
    # and the leaves that a dense product has updated.
    self.local: list[tuple[Any, int, Any]] | None = None
    self.local_trace: Any = None
    self.local_dense: set[int] = set()
    # In a layer's backward pass, what the next dense product's backward
    # rule waits for (the layer's output gradient, then the last kernel
    # update), so the layer's weight gradients exist one at a time.
    self.wait_for: Any = None
    # Per call_layer layer run without recomputation, the leaves that its
    # dense products update (found when its forward pass was traced).
    self.dense_leaves: dict[LayerCall, frozenset[int]] = {}

  # -- finding the step's leaves ----------------------------------------------

  def set_hooked(self, hooked: list[Any]) -> None:
    """Records what the loss function receives for each leaf."""
    self.hooked = list(hooked)

  def hooked_index(self, x: Any) -> int | None:
    """The leaf whose hook output ``x`` is, or None."""
    return next((i for i, h in enumerate(self.hooked) if h is x), None)

  def per_layer_index(self, x: Any) -> int | None:
    """The ``per_layer`` leaf ``x`` is, or None."""
    return next((i for i, leaf in enumerate(self.leaves)
                 if self.layout.per_layer[i] and leaf is x), None)

  def consume_per_layer(self, i: int) -> None:
    """Marks ``per_layer`` leaf ``i`` as run through ``scan_layers``."""
    if i in self.consumed:
      raise ValueError(f"per_layer leaf {self.layout.names[i]!r} goes "
                       "through scan_layers twice.")
    self.consumed.add(i)

  def unconsumed_per_layer(self) -> list[str]:
    """Names of ``per_layer`` leaves that no ``scan_layers`` ran."""
    return [name for i, name in enumerate(self.layout.names)
            if self.layout.per_layer[i] and i not in self.consumed]

  def take(self, i: int) -> tuple[Any, Any, Any]:
    """Leaf ``i``'s (stored value, packed state, key data), consumed once."""
    if i in self.taken:
      raise ValueError(
          f"Parameter {self.layout.names[i]!r} is used by more than one "
          "layerwise.call_layer/dense/embedding_lookup call; each must "
          "be the only use of its int8 weight or dense kernel.")
    self.taken.add(i)
    return self.leaves[i], self.packed[i], self.key_data[i]

  def reach_directly(self, i: int) -> None:
    """Marks leaf ``i`` as updated by its hook (used directly by the loss)."""
    if i in self.taken:
      raise ValueError(
          f"Parameter {self.layout.names[i]!r} is used by "
          "layerwise.call_layer/dense/embedding_lookup and also elsewhere "
          "in the loss (e.g. tied embeddings); its update would be split. "
          "Use it in one place, or keep it in floating point.")
    self.reached.add(i)

  @property
  def recompute(self) -> bool:
    """Whether ``call_layer`` layers are recomputed whole in the backward
    pass (else their forward pass keeps residuals: all, or a policy's)."""
    return self.updater.options.recompute is True

  @property
  def inside_layer(self) -> bool:
    """Whether a ``call_layer``'s layer function is being traced."""
    return self.local is not None

  @contextlib.contextmanager
  def layer_scope(self, weights: list[Any], ids: tuple[int, ...],
                  inputs: list[Any]) -> Iterator[set[int]]:
    """Registers a layer's weights for ``dense`` while it is traced.

    Args:
      weights: the values the layer function receives for its leaves.
      ids: their leaf indices.
      inputs: their (stored value, packed state, key data).

    Yields:
      The set of leaves that ``dense`` products consumed.
    """
    saved = self.local, self.local_trace, self.local_dense
    self.local = list(zip(weights, ids, inputs))
    self.local_trace = trace_state()
    self.local_dense = set()
    try:
      # The recomputation runs in the backward pass, after the loss's
      # trace has left the step's context: enter it again.
      with activate(self):
        yield self.local_dense
    finally:
      self.local, self.local_trace, self.local_dense = saved

  def dense_target(self, kernel: jax.Array) -> tuple[int, Any] | None:
    """The leaf a ``dense`` product updates and its inputs, or None.

    Args:
      kernel: the product's kernel.

    Returns:
      ``(leaf index, (stored, packed, key data))`` when ``kernel`` is a
      leaf of the step (inside a layer: one of the layer's weights, used at
      the layer's own trace level); None for a plain product.
    """
    if self.inside_layer:
      found = [(i, inp) for w, i, inp in self.local if w is kernel]
      if not found or trace_state() != self.local_trace:
        # Not a weight of this layer, or a product inside an inner
        # transformation of the layer (scan, checkpoint): a plain product
        # whose gradient goes to the weight's update at the layer's end.
        return None
      ((i, inputs),) = found
      if i in self.local_dense:
        raise ValueError(
            f"Parameter {self.layout.names[i]!r} is multiplied by more "
            "than one layerwise.dense call in its layer; each kernel must "
            "be used by one dense product only.")
      self.local_dense.add(i)
      return i, inputs
    i = self.hooked_index(kernel)
    if i is None or self.layout.per_layer[i]:
      return None
    return i, self.take(i)

  def lookup_target(self, table: jax.Array) -> int | None:
    """The int8 or row-chunked leaf ``table`` is, or None."""
    i = self.hooked_index(table)
    if i is None or not (self.layout.quantized[i] or
                         self.layout.chunks[i] > 1):
      return None
    return i

  # -- values and updates ------------------------------------------------------

  def leaf_key(self, key_data: Any) -> jax.Array | None:
    """A typed PRNG key from a leaf's key data (None stays None)."""
    if key_data is None:
      return None
    return jax.random.wrap_key_data(key_data, impl=self.key_impl)

  def values(self, ids: Any, stored: list[Any], after: Any = None
             ) -> list[jax.Array]:
    """The float values of leaves ``ids`` from their stored values.

    Args:
      ids: leaf indices.
      stored: their stored values (int8 leaves as carriers).
      after: arrays to wait for, or None: int8 leaves are dequantised only
        once they exist (``ordering.after`` on their scales).

    Returns:
      The values the model sees.
    """
    qs = [carrier.from_carrier(x) if self.layout.quantized[i] else x
          for i, x in zip(ids, stored)]
    q_pos = [j for j, i in enumerate(ids) if self.layout.quantized[i]]
    if after is not None and q_pos:
      scales = ordering.after([qs[j].scale for j in q_pos], after)
      for j, scale in zip(q_pos, scales):
        qs[j] = qs[j]._replace(scale=scale)
    return [self.updater.leaf_value(i, q) for i, q in zip(ids, qs)]

  def update(self, i: int, g: unit_update.Gradient, stored: Any, packed: Any,
             key_data: Any) -> tuple[Any, Any, Any]:
    """Cotangents (new stored value, new packed state, key) of leaf ``i``.

    Args:
      i: the leaf index.
      g: its gradient, or a function making row blocks of it.
      stored: its stored value (int8 leaves as carriers).
      packed: its packed state.
      key_data: its rounding key data, or None.

    Returns:
      The new stored value (as a carrier for int8 leaves), the new packed
      state and ``float0`` cotangents for the key data.
    """
    self.reached.add(i)
    if self.layout.quantized[i]:
      new_q, new_s = self.updater.update_leaf(
          i, g, carrier.from_carrier(stored), packed,
          self.leaf_key(key_data))
      return carrier.to_carrier(new_q), new_s, trees.float0_tree(key_data)
    new_p, new_s = self.updater.update_leaf(i, g, stored, packed)
    return new_p, new_s, trees.float0_tree(key_data)

  # -- backward rule of a leaf's hook -----------------------------------------

  def hook_backward(self, i: int, res: tuple[Any, Any, Any],
                    g: jax.Array) -> tuple[Any, Any, Any]:
    """A leaf used directly by the loss: update it with its gradient."""
    self.reach_directly(i)
    return self.update(i, g, *res)

  # -- call_layer --------------------------------------------------------------

  def layer_apply(self, call: LayerCall, c: Any, others: list[Any],
                  weights: list[Any], h_in: list[Any], cs: list[Any],
                  by_dense: set[int] | None = None) -> Any:
    """Runs the layer on its weights' values (``dense`` can find them).

    ``by_dense``, if given, receives the leaves that ``dense`` updated.
    """
    with self.layer_scope(weights, call.leaf_ids, h_in) as used:
      p = call.treedef.unflatten(trees.interleave(call.hooked, weights,
                                                  others))
      out = call.fn(c, p, *cs)
    if by_dense is not None:
      by_dense.update(used)
    return out

  def layer_weights(self, call: LayerCall, h_in: list[Any],
                    c: Any) -> list[jax.Array]:
    """The layer's weight values, made once the carry ``c`` exists."""
    return self.values(call.leaf_ids, [stored for stored, _, _ in h_in],
                       after=c)

  def layer_forward(self, call: LayerCall, c: Any, others: list[Any],
                    h_in: list[Any], cs: list[Any]) -> Any:
    """The layer's output (its forward pass)."""
    return self.layer_apply(call, c, others, self.layer_weights(call, h_in, c),
                            h_in, cs)

  def check_layer(self, call: LayerCall, c: Any, others: list[Any],
                  h_in: list[Any], cs: list[Any]) -> None:
    """Raises if a leaf updated by ``dense`` is also used directly by the
    layer (its update would miss that gradient)."""
    by_dense: set[int] = set()
    weights = self.layer_weights(call, h_in, c)
    jaxpr = jax.make_jaxpr(functools.partial(self.layer_apply, call,
                                             by_dense=by_dense))(
                                                 c, others, weights, h_in,
                                                 cs).jaxpr
    n_c, n_o = len(jax.tree.leaves(c)), len(jax.tree.leaves(others))
    w_vars = jaxpr.invars[n_c + n_o:n_c + n_o + len(weights)]
    read = {v for eqn in jaxpr.eqns for v in eqn.invars
            if isinstance(v, jax.extend.core.Var)} | set(jaxpr.outvars)
    for i, v in zip(call.leaf_ids, w_vars):
      if i in by_dense and v in read:
        raise ValueError(
            f"Parameter {self.layout.names[i]!r} is multiplied by "
            "layerwise.dense and also used otherwise in its layer; its "
            "update would miss part of its gradient. Use it in one place.")

  def layer_forward_saved(self, call: LayerCall, c: Any, others: list[Any],
                          h_in: list[Any], cs: list[Any]
                          ) -> tuple[Any, tuple[Any, ...]]:
    """The layer's output and the residuals of ``layer_backward_saved``.

    Without whole-layer recomputation the layer's backward function is made
    here, in the forward pass, and kept until the output gradient arrives:
    with all its residuals (``recompute=False``, as an ordinary backward
    pass keeps them), or, under a ``jax.checkpoint`` policy, with those the
    policy saves (the rest is recomputed in the backward pass).
    """
    by_dense: set[int] = set()
    apply = functools.partial(self.layer_apply, call, by_dense=by_dense)
    policy = self.updater.options.checkpoint_policy
    if policy is not None:
      apply = jax.checkpoint(apply, policy=policy)
    out, vjp = jax.vjp(apply, c, others, self.layer_weights(call, h_in, c),
                       h_in, cs)
    self.dense_leaves[call] = frozenset(by_dense)
    return out, (vjp, h_in)

  def layer_backward(self, call: LayerCall, res: tuple[Any, ...],
                     ct: Any) -> tuple[Any, ...]:
    """The layer's backward pass: recompute it, update its leaves.

    Kernels multiplied through ``dense`` are updated inside their
    products' backward rules (one after another); the other leaves get
    their gradients at the end, updated after the layer's input gradient.
    """
    c, others, h_in, cs = res
    # Recompute from an input that waits for the output cotangent: XLA
    # would otherwise schedule every layer's recomputation early (as soon
    # as its saved input exists) and keep all of them live at once.
    c = ordering.after(c, ct)
    weights = self.layer_weights(call, h_in, c)
    by_dense: set[int] = set()
    _, vjp = jax.vjp(functools.partial(self.layer_apply, call,
                                       by_dense=by_dense), c, others,
                     weights, h_in, cs)
    return self.backprop_layer(call, vjp, h_in, by_dense, ct)

  def layer_backward_saved(self, call: LayerCall, res: tuple[Any, ...],
                           ct: Any) -> tuple[Any, ...]:
    """``layer_backward`` from ``layer_forward_saved``'s residuals."""
    vjp, h_in = res
    if self.updater.options.checkpoint_policy is not None:
      vjp = self.residuals_after(vjp, h_in, ct)
    return self.backprop_layer(call, vjp, h_in, self.dense_leaves[call], ct)

  def residuals_after(self, vjp: Any, h_in: list[Any], ct: Any) -> Any:
    """``vjp`` with its residuals waiting for the output cotangent ``ct``.

    Under a checkpoint policy the backward pass recomputes from the saved
    residuals; XLA would otherwise start every layer's recomputation early
    and keep all of them live (LLaMA-60M, 8 x 256: 1.77 GB of temporaries
    instead of 0.89), as ``layer_backward``'s comment says. The leaves'
    stored values, packed states and key data (``h_in``) are left as they
    are: ``ordering.after`` would flush those bit-cast integers.
    """
    inputs = jax.tree.leaves(h_in)
    leaves, treedef = jax.tree.flatten(vjp)
    own = [not any(x is y for y in inputs) for x in leaves]
    tied = iter(ordering.after([x for x, o in zip(leaves, own) if o], ct))
    return treedef.unflatten([next(tied) if o else x
                              for x, o in zip(leaves, own)])

  def backprop_layer(self, call: LayerCall, vjp: Callable[..., Any],
                     h_in: list[Any], by_dense: set[int] | frozenset[int],
                     ct: Any) -> tuple[Any, ...]:
    """Runs a layer's backward function ``vjp`` and updates its leaves.

    Args:
      call: the layer.
      vjp: the backward function of ``layer_apply`` at the layer's inputs.
      h_in: the layer's leaves' (stored value, packed state, key data).
      by_dense: the leaves that ``dense`` products update (in ``vjp``).
      ct: the layer output's cotangent.

    Returns:
      Cotangents of the carry, the other parameters, the leaves (their new
      values and states) and the consts.
    """
    self.wait_for = ct
    ct_c, ct_others, ct_w, ct_h, ct_cs = vjp(ct)
    self.wait_for = None
    direct = [j for j, i in enumerate(call.leaf_ids) if i not in by_dense]
    ct_others, grads = ordering.after(
        (ct_others, [ct_w[j] for j in direct]), ct_c)
    new_h = list(ct_h)
    for j, g in zip(direct, grads):
      new_h[j] = self.update(call.leaf_ids[j], g, *h_in[j])
    return ct_c, ct_others, new_h, ct_cs

  # -- dense -------------------------------------------------------------------

  def dense_forward(self, i: int, dtype: Any, x: jax.Array,
                    stored: Any) -> jax.Array:
    """``x @ kernel`` for leaf ``i`` (an int8 kernel dequantised once ``x``
    exists)."""
    return matmul(x, self.values([i], [stored], after=x)[0], dtype)

  def dense_backward(self, i: int, dtype: Any, res: tuple[Any, ...],
                     dy: jax.Array) -> tuple[Any, ...]:
    """The input gradient from the old kernel, then the kernel's update.

    The kernel's gradient ``x^T dy`` is made one row block at a time inside
    the update's loop (``row_chunks``), so the whole gradient never exists;
    what follows in the backward pass waits for the update.
    """
    x, stored, packed, key_data = res
    if self.wait_for is not None:
      dy = ordering.after(dy, self.wait_for)
    w = self.values([i], [stored], after=dy)[0]
    (dx,) = jax.vjp(lambda x_: matmul(x_, w, dtype), x)[1](dy)
    dy = ordering.after(dy, dx)

    def grad_rows(start, rows):
      # x_rows^T dy written as the (rows, d_out) product itself (the
      # transpose rule of the product makes XLA:CPU compute its transpose
      # in float32 and copy it back: two more weight-sized buffers).
      x_rows = jax.lax.dynamic_slice_in_dim(x, start, rows, axis=x.ndim - 1)
      lead = tuple(range(x.ndim - 1))
      cd = dtype or jnp.result_type(x, w)
      g = jax.lax.dot_general(x_rows.astype(cd), dy.astype(cd),
                              ((lead, lead), ((), ())))
      return g.astype(w.dtype)

    plan = self.layout.fused[i]
    if plan is None:
      new = self.update(i, grad_rows, stored, packed, key_data)
    else:
      # Between refreshes the optimizer takes the low-rank gradient made
      # from x and dy; only a refresh makes the full one.
      rows = self.layout.unit_avals[i].shape[0]
      supply = gradient_supply.GradientSupply(
          full=lambda: grad_rows(0, rows),
          lowrank=lambda projector: gradient_supply.project_product(
              x, dy, projector, plan),
          ready=dy)
      new = self.update(i, supply, stored, packed, key_data)
    # What comes next waits for the update (so only this kernel's gradient
    # and update buffers are live): the input gradient, and in a layer's
    # backward pass the next dense product.
    done = ordering.zero_after(new[0])
    if self.wait_for is not None:
      self.wait_for = done
    return (ordering.after(dx, done), *new)

  # -- embedding_lookup --------------------------------------------------------

  def lookup_forward(self, i: int, stored: Any, ids: jax.Array) -> jax.Array:
    """``table[ids]``, reading (and dequantising) only those rows."""
    if not self.layout.quantized[i]:
      return jnp.take(stored, ids, axis=0)
    q = carrier.from_carrier(stored)
    rows = weight_quantization.QuantizedWeight(
        jnp.take(q.codes, ids, axis=0), jnp.take(q.scale, ids, axis=0))
    return weight_quantization.dequantize_weight(
        rows, self.layout.unit_avals[i].dtype)

  def lookup_backward(self, i: int, res: tuple[Any, ...],
                      ct: jax.Array) -> tuple[Any, ...]:
    """The table's update; its gradient is scattered one row block at a
    time inside the update, never as a whole table."""
    stored, packed, key_data, ids = res
    dtype = self.layout.unit_avals[i].dtype
    ct = ct.astype(dtype)
    width = self.layout.unit_avals[i].shape[1:]
    zero = ordering.zero_after(ct)

    def grad_rows(start, rows):
      inside = (ids >= start) & (ids < start + rows)
      local = jnp.where(inside, ids - start, rows)  # row `rows` is dropped
      zeros = ordering.after(jnp.zeros((rows, *width), dtype), zero)
      return zeros.at[local].add(ct, mode="drop")

    new = self.update(i, grad_rows, stored, packed, key_data)
    return (*new, trees.float0_like(ids))
