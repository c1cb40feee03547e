"""When and how ``galore_project`` recomputes its projectors.

Every ``update_proj_gap`` updates each projected leaf's projector is
recomputed from that update's gradient, inside the compiled step:

* Batches: with the randomized method, leaves of equal shape, dtype and
  sharding are refreshed together by one loop, whose body compiles once
  instead of once per leaf (its per-leaf power iterations dominated compile
  time). A batch's loop needs all of its gradients, so batches are bounded
  by ``REFRESH_BATCH_BYTES`` of float32 gradient (``refresh_batches``). The
  exact SVD refreshes each leaf in a cond of its own, which made ordinary
  steps faster (``RefreshPolicy.schedule``).
* Phases: by default every batch refreshes at updates ``0, T, 2T, ...``;
  ``stagger_refresh`` spreads the batches over the window
  (``refresh_offsets``), so that no single step recomputes every projector.
* Loops: a batch's loop runs ``len(batch)`` times when due and zero times
  otherwise, so refresh and ordinary steps share one compilation
  (``RefreshPolicy.refresh_batch``).
* Moments: ``moments="keep"`` leaves the inner state alone, ``"project"``
  re-expresses its moments in the new bases (``projection.carry_moment``),
  ``"reset"`` re-initialises it.
* Sketches: the randomized method's test matrices are drawn once per update
  and shape (``step_sketches``).

References:
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
  Projection", ICML 2024, arXiv 2403.03507.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galore_optax import lazy_refresh
from galore_optax import projection
from galore_optax import projector_storage
from galore_optax import quantization
from galore_optax import state_fields

# A batch's loop needs all of its gradients, so the bound limits how many
# stay alive until it can start (measured when the exact SVD was batched too:
# unbounded, per-shape batches had 1304 MiB of temporaries at LLaMA-350M
# against 1170 MiB).
REFRESH_BATCH_BYTES = 256 * 2**20


def refresh_batches(keys: list[Any], sizes: list[int],
                    max_leaves: int | None = None) -> list[list[int]]:
  """Splits positions ``0..len(keys)-1`` into batches refreshed together.

  Args:
    keys: per projected leaf, what must be equal to batch it with another
      (shape, dtype, sharding); equal keys have equal sizes.
    sizes: per projected leaf, its number of values.
    max_leaves: at most this many leaves per batch (None: no limit).

  Returns:
    Lists of positions, each of equal keys and at most
    ``REFRESH_BATCH_BYTES`` of float32 (or a single leaf), ordered by their
    first position. The leaves of one key are split into as few batches as
    the bounds allow, of sizes differing by at most one (no small remainder
    batch, whose loop would compile on its own).
  """
  positions: dict[Any, list[int]] = {}
  for i, key in enumerate(keys):
    positions.setdefault(key, []).append(i)
  batches = []
  for members in positions.values():
    limit = max(1, REFRESH_BATCH_BYTES // (4 * max(sizes[members[0]], 1)))
    if max_leaves is not None:
      limit = min(limit, max_leaves)
    count = -(-len(members) // limit)
    small, extra = divmod(len(members), count)
    start = 0
    for j in range(count):
      end = start + small + (j < extra)
      batches.append(members[start:end])
      start = end
  return sorted(batches, key=lambda batch: batch[0])


def refresh_offsets(num_batches: int, gap: int, stagger: bool) -> list[int]:
  """Per refresh batch, the phase of its refresh within the gap window.

  Args:
    num_batches: the number of refresh batches.
    gap: ``update_proj_gap``.
    stagger: spread the batches evenly over the window.

  Returns:
    Per batch, the update count modulo ``gap`` at which it refreshes.
  """
  if not stagger:
    return [0] * num_batches
  return [(i * gap) // num_batches for i in range(num_batches)]


def is_due(count: jax.Array, offset: int, gap: int) -> jax.Array:
  """Whether a batch of phase ``offset`` refreshes at update ``count``.

  Args:
    count: the update count (int32 scalar).
    offset: the batch's phase (see ``refresh_offsets``).
    gap: ``update_proj_gap``.

  Returns:
    A boolean scalar: true at update 0 (every leaf) and whenever ``count``
    is ``offset`` modulo ``gap``.
  """
  return (count == 0) | ((count - offset) % gap == 0)


def step_sketches(plans: Iterable[projection.LeafPlan], count: jax.Array,
                  seed: int) -> dict[tuple[int, int], jax.Array]:
  """The randomized method's test matrices of this update, one per shape.

  Drawn once per update and shared by every leaf whose sketch has that
  shape: the random draw compiles once instead of once per refresh, and
  every leaf still gets fresh columns at each of its refreshes.

  Args:
    plans: the projected leaves' plans.
    count: the update count.
    seed: ``galore_project``'s seed.

  Returns:
    ``{(cols, extra): float32 standard-normal matrix}`` per sketch shape
    (see ``projection.sketch_dims``).
  """
  key = jax.random.fold_in(jax.random.key(seed), count)
  shapes = sorted({dims for plan in plans
                   for dims in projection.sketch_dims(plan)
                   if dims is not None})
  return {dims: jax.random.normal(
      jax.random.fold_in(jax.random.fold_in(key, dims[0]), dims[1]), dims,
      jnp.float32) for dims in shapes}


class Refreshed(NamedTuple):
  """What ``RefreshPolicy.refresh_due`` returns.

  Attributes:
    projectors: by leaf index, each projected leaf's stored projector,
      refreshed where due.
    inner_state: the inner state, with its moments carried (``"project"``)
      or re-initialised (``"reset"``) where a refresh happened.
    gradients_ready: one array per refresh batch that XLA computes only
      once every gradient of that batch exists (a loop or cond returns its
      results only when all its operands exist, due or not).
    schedule_states: by leaf index, each projected leaf's
      ``lazy_refresh.LazyRefreshState`` (empty for the fixed schedule).
  """

  projectors: dict[int, projection.Projector]
  inner_state: optax.OptState
  gradients_ready: list[jax.Array]
  schedule_states: dict[int, lazy_refresh.LazyRefreshState] = {}


@dataclasses.dataclass(frozen=True)
class RefreshPolicy:
  """The static refresh settings of one ``galore_project``.

  Attributes:
    inner: the inner transformation (its state is carried or reset).
    gap: ``update_proj_gap``, updates between a leaf's refreshes.
    stagger: ``stagger_refresh``, spread the batches over the window.
    method: ``projector_method``, ``"svd"`` or ``"randomized"``.
    projector_dtype: one of ``projector_storage.PROJECTOR_DTYPES``.
    moments: ``"keep"``, ``"project"`` or ``"reset"``.
    seed: seed of the randomized method's test matrices.
    lazy: the lazy schedule (``refresh_schedule="lazy"``), or None for the fixed
      one.
  """

  inner: optax.GradientTransformationExtraArgs
  gap: int
  stagger: bool
  method: str
  projector_dtype: str
  moments: str
  seed: int
  lazy: lazy_refresh.LazySchedule | None = None

  def schedule(self, grads: list[jax.Array],
               plans: dict[int, projection.LeafPlan]
               ) -> tuple[list[list[int]], list[int]]:
    """The refresh batches (as leaf indices) and their phases.

    Args:
      grads: every leaf's gradient, as matrices.
      plans: by leaf index, the projected leaves' plans.

    Returns:
      ``(batches, offsets)``, see ``refresh_batches`` and
      ``refresh_offsets``.
    """
    projected = list(plans)
    # Staggering spreads batches over the window, as finely as it allows:
    # one leaf per batch while there are no more leaves than steps.
    max_leaves = -(-len(projected) // self.gap) if self.stagger else None
    batches = [[projected[j] for j in batch] for batch in refresh_batches(
        [(plans[i], grads[i].dtype, jax.typeof(grads[i]).sharding.spec)
         for i in projected], [grads[i].size for i in projected], max_leaves)]
    offsets = refresh_offsets(len(batches), self.gap, self.stagger)
    if self.method == "svd":
      # The exact SVD compiles cheaply, so each leaf gets a cond of its own
      # (at its batch's phase). At LLaMA-350M (4 x 256) loops over several
      # leaves cost the ordinary step 4-6% against optax.contrib.galore and
      # 127 MB of temporaries (also with loops over one layer's leaves
      # only); one cond per leaf: at par, the same temporaries, compile
      # 12.7 s against 8.5 s. The randomized method's leaves stay batched:
      # one cond each took 28.7 s to compile against 15.4 s.
      offsets = [o for batch, o in zip(batches, offsets) for _ in batch]
      batches = [[i] for batch in batches for i in batch]
    return batches, offsets

  def compute_leaf(self, grad: jax.Array, stored: projection.Projector,
                   plan: projection.LeafPlan,
                   sketches: dict[Any, jax.Array]) -> projection.Projector:
    """One leaf's new float32 projector (its old one where not finite)."""
    sketch = None
    if self.method == "randomized":
      sketch = projection.Projector(*(
          optax.MaskedNode() if dims is None else sketches[dims]
          for dims in projection.sketch_dims(plan)))
    return projection.refresh_projector(
        grad, plan, projector_storage.load(stored), method=self.method,
        sketch=sketch)

  def refresh_leaf(self, grad: jax.Array, stored: projection.Projector,
                   plan: projection.LeafPlan,
                   sketches: dict[Any, jax.Array]) -> projection.Projector:
    """One leaf's new stored projector (its old one where not finite)."""
    return projector_storage.store_refreshed(
        self.compute_leaf(grad, stored, plan, sketches), stored,
        self.projector_dtype)

  def refresh_batch(self, grads: list[jax.Array],
                    stored: list[projection.Projector],
                    plan: projection.LeafPlan,
                    sketches: dict[Any, jax.Array],
                    due: jax.Array | None = None,
                    refresh_leaf: Callable[[jax.Array, Any], Any] | None = None
                    ) -> list[Any]:
    """New projectors of one batch of equal-shape leaves, by one loop.

    Args:
      grads: the batch's gradients (all of plan ``plan``).
      stored: their stored projectors.
      plan: the batch's common plan.
      sketches: ``step_sketches``' test matrices (randomized method).
      due: if given, refresh only where it is true (the projectors are
        returned as they are otherwise).
      refresh_leaf: ``(grad, stored) -> new stored``, where ``stored`` is
        any per-leaf tree (the lazy schedule's is a projector and its
        state); ``self.refresh_leaf`` by default.

    Returns:
      The batch's new stored projectors, in order.
    """
    if refresh_leaf is None:
      refresh_leaf = lambda g, p: self.refresh_leaf(g, p, plan, sketches)
    if len(grads) == 1:
      if due is None:
        return [refresh_leaf(grads[0], stored[0])]
      # Not a loop: XLA hoists a single leaf's refresh, invariant in the
      # loop, out of it, so it would run at every update.
      return [jax.lax.cond(due, lambda: refresh_leaf(grads[0], stored[0]),
                           lambda: stored[0])]
    # A loop, not vmap: the body compiles once, and each decomposition stays
    # unbatched (jaxlib's batched CPU LAPACK kernels wait on the intra-op
    # thread pool they run in, which deadlocks when several devices of one
    # process decompose at once). Nothing is stacked: iteration i picks
    # gradient i by a switch, refreshes the projector at the head of the
    # carry (leaf i's) and appends the new one, so after the loop the
    # projectors are back in order. Every kernel then has the shapes of one
    # leaf and is shared by all batches of that shape (XLA:CPU compiles each
    # distinct kernel once), where slicing a stacked result compiled one
    # kernel per position and batch size. A trip count of zero when not due
    # replaces a ``lax.cond`` around the loop (less for XLA to compile).

    def body(i, carry):
      g = jax.lax.switch(i, [lambda g=g: g for g in grads])
      return carry[1:] + [refresh_leaf(g, carry[0])]

    trips = len(grads) if due is None else jnp.where(due, len(grads), 0)
    return jax.lax.fori_loop(0, trips, body, list(stored))

  def moment_leaf_ids(self, inner_state: optax.OptState, tree: Any) -> Any:
    """Per leaf of ``inner_state``: the index of the parameter leaf whose
    moment it is, or -1 for leaves not shaped like parameters (counts,
    factored statistics).

    Args:
      inner_state: the inner state.
      tree: a tree shaped like the inner transformation's parameters.

    Returns:
      A tree of ints with ``inner_state``'s structure.

    Raises:
      ValueError: if the moments cannot be found, or are 8-bit.
    """
    leaves, treedef = jax.tree.flatten(tree)
    ids = treedef.unflatten(list(range(len(leaves))))
    as_leaf = lambda x: isinstance(x, quantization.QuantizedArray)
    try:
      out = optax.tree_map_params(
          self.inner, lambda _, i: i, inner_state, ids,
          transform_non_params=lambda x: jax.tree.map(
              lambda _: -1, x, is_leaf=as_leaf),
          is_leaf=as_leaf)
    except Exception as err:  # init cannot run on placeholders
      raise ValueError(
          "moments='project' needs an inner transformation whose moments "
          "are trees shaped like the parameters (e.g. optax.scale_by_adam); "
          f"could not find them in {type(inner_state).__name__}: {err}"
      ) from err
    state_leaves = jax.tree.leaves(inner_state, is_leaf=as_leaf)
    id_leaves = jax.tree.leaves(out)
    for x, i in zip(state_leaves, id_leaves):
      if i >= 0 and as_leaf(x):
        raise ValueError(
            "moments='project' needs float moments; 8-bit moments would be "
            "re-quantised in the new basis. Use moments='keep' or 'reset' "
            "with quantize_state_8bit.")
    return out

  def check_inner_state(self, inner_state: optax.OptState, params: Any,
                        num_projected: int) -> None:
    """Raises at ``init`` if ``moments`` cannot work with this state.

    Args:
      inner_state: the inner state built for the low-rank shapes.
      params: the parameter tree.
      num_projected: how many of its leaves are projected.

    Raises:
      ValueError: ``"reset"`` with leaves that are not projected (the inner
        state's step count is shared), or ``"project"`` without float
        moments shaped like the parameters.
    """
    # An empty leaf has no moment values to lose at a reset.
    num_leaves = sum(x.size > 0 for x in jax.tree.leaves(params))
    if self.moments == "reset" and num_projected != num_leaves:
      raise ValueError(
          "moments='reset' re-initialises the inner state at each refresh, "
          "so every leaf must be projected (>= 2 dimensions); got "
          f"{num_leaves - num_projected} leaves with fewer. Select the "
          "matrices with optax.partition or galore_optax.galore_labels.")
    if self.moments == "project":
      self.moment_leaf_ids(inner_state, params)  # or raises

  def carry_moments(self, inner_state: optax.OptState, lowrank_tree: Any,
                    plans: dict[int, projection.LeafPlan],
                    old: dict[int, projection.Projector],
                    new: dict[int, projection.Projector]) -> optax.OptState:
    """Re-expresses the moments of the leaves in ``plans`` in their new
    bases (``plans``, ``old``, ``new``: by leaf index; float32 factors)."""
    ids = self.moment_leaf_ids(inner_state, lowrank_tree)

    def carry(path, x, i):
      if i not in plans:
        return x
      return projection.carry_moment(
          x, old[i], new[i], plans[i],
          second=state_fields.is_second_moment(inner_state, path))

    return jax.tree_util.tree_map_with_path(carry, inner_state, ids)

  def refresh_by_phase(self, batches: list[list[int]], offsets: list[int],
                       grads: list[jax.Array],
                       plans: dict[int, projection.LeafPlan],
                       stored: dict[int, projection.Projector],
                       inner_state: optax.OptState, count: jax.Array,
                       sketches: dict[Any, jax.Array], lowrank_tree: Any
                       ) -> tuple[dict[int, Any], optax.OptState]:
    """``moments="project"``: one cond per refresh phase over the batches of
    that phase, which also carries their moments into the new bases (so it
    needs the whole inner state, not one batch's gradients).

    Returns:
      The stored projectors by leaf index and the inner state.
    """

    def refresh_phase(operand, group_batches):
      old_stored, inner_state = operand
      group = [i for batch in group_batches for i in batch]
      old = dict(zip(group, old_stored))
      new_stored = [p for batch in group_batches for p in self.refresh_batch(
          [grads[i] for i in batch], [old[i] for i in batch],
          plans[batch[0]], sketches)]
      inner_state = self.carry_moments(
          inner_state, lowrank_tree, {i: plans[i] for i in group},
          {i: projector_storage.load(p) for i, p in zip(group, old_stored)},
          {i: projector_storage.load(p) for i, p in zip(group, new_stored)})
      return new_stored, inner_state

    new = dict(stored)
    for offset in sorted(set(offsets)):
      group_batches = [b for b, o in zip(batches, offsets) if o == offset]
      group = [i for batch in group_batches for i in batch]
      refreshed, inner_state = jax.lax.cond(
          is_due(count, offset, self.gap),
          lambda operand, g=group_batches: refresh_phase(operand, g),
          lambda operand: operand,
          ([stored[i] for i in group], inner_state),
      )
      new.update(zip(group, refreshed))
    return new, inner_state

  def refresh_due(self, grads: list[jax.Array],
                  plans: dict[int, projection.LeafPlan],
                  stored: dict[int, projection.Projector],
                  inner_state: optax.OptState, count: jax.Array,
                  treedef: Any,
                  schedule_states: dict[int, Any] | None = None
                  ) -> Refreshed:
    """Refreshes the projectors due at update ``count``.

    Args:
      grads: every leaf's gradient, as matrices.
      plans: by leaf index, the projected leaves' plans.
      stored: by leaf index, their stored projectors.
      inner_state: the inner transformation's state.
      count: the update count.
      treedef: the structure of the gradients' tree.
      schedule_states: by leaf index, the lazy schedule's states (with
        ``lazy`` only).

    Returns:
      The new projectors, the inner state after the refresh's ``moments``
      policy, and per batch an array that stands for all its gradients.
    """
    batches, offsets = self.schedule(grads, plans)
    sketches = (step_sketches(plans.values(), count, self.seed)
                if self.method == "randomized" else {})
    # Only "project" (to find the moments) and "reset" (to re-init) use it.
    lowrank_tree = None if self.moments == "keep" else treedef.unflatten([
        projection.lowrank_placeholder(g, plans.get(i))
        for i, g in enumerate(grads)])
    if self.moments == "project":
      new, inner_state = self.refresh_by_phase(
          batches, offsets, grads, plans, stored, inner_state, count,
          sketches, lowrank_tree)
    else:
      # One loop (or cond) per batch, so that each batch's projections can
      # start as soon as its gradients exist and free them (one over every
      # gradient keeps them all alive at once).
      new, schedule_states = dict(stored), dict(schedule_states or {})
      for batch, offset in zip(batches, offsets):
        if self.lazy is None:
          new.update(zip(batch, self.refresh_batch(
              [grads[i] for i in batch], [stored[i] for i in batch],
              plans[batch[0]], sketches, is_due(count, offset, self.gap))))
          continue
        plan = plans[batch[0]]
        projectors, states = self.lazy.refresh_batch(
            self.refresh_batch, [grads[i] for i in batch],
            [stored[i] for i in batch], [schedule_states[i] for i in batch],
            plan, count, offset,
            lambda g, p, plan=plan: self.compute_leaf(g, p, plan, sketches),
            self.projector_dtype)
        new.update(zip(batch, projectors))
        schedule_states.update(zip(batch, states))
    if self.moments == "reset":
      inner_state = jax.lax.cond(
          (count > 0) & (count % self.gap == 0),
          lambda s: self.inner.init(lowrank_tree), lambda s: s, inner_state)
    return Refreshed(new, inner_state,
                     [jax.tree.leaves(new[batch[0]])[0] for batch in batches],
                     schedule_states or {})
