"""``galore_project``: run any optax transformation in a low-rank subspace.

References:
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
  Projection", ICML 2024, arXiv 2403.03507.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galore_optax import ordering
from galore_optax import projection
from galore_optax import projector_storage
from galore_optax import quantization
from galore_optax import state_8bit
from galore_optax._checks import check_choice
from galore_optax._checks import check_finite_number
from galore_optax._checks import check_positive_int
from galore_optax import targets
from galore_optax.targets import path_to_name

# ``{name: (row_axes, col_axes)}``: which axes of a leaf form its matrix.
MatrixAxes = Mapping[str, tuple[Sequence[int], Sequence[int]]]

MOMENT_POLICIES = ("keep", "project", "reset")


class GaLoreState(NamedTuple):
  """State of ``galore_project``.

  Attributes:
    count: number of updates so far (int32, saturating).
    projectors: a dict from each projected leaf's dotted path name (see
      ``galore_optax.path_to_name``) to its ``projection.Projector``. Keyed
      by name rather than shaped like the parameters so that container types
      (e.g. Flax NNX variables) never wrap it.
    inner_state: the inner transformation's state, built for the low-rank
      shapes of the projected leaves and the full shapes of the others.
  """

  count: jax.Array
  projectors: Any
  inner_state: optax.OptState


def _is_projected(leaf: Any) -> bool:
  return hasattr(leaf, "ndim") and leaf.ndim >= 2


class _MatrixView(NamedTuple):
  """How a leaf is seen as a batch of matrices: transpose, then reshape."""

  perm: tuple[int, ...]  # batch axes, then row axes, then column axes
  shape: tuple[int, ...]  # (*batch, m, n)


def _matrix_views(matrix_axes: MatrixAxes | None, names: list[str],
                  leaves: list[Any]) -> list[_MatrixView | None]:
  """Per leaf, its ``_MatrixView`` from the first matching rule, or None."""
  rules = [(key, targets.make_matcher([key]), axes)
           for key, axes in (matrix_axes or {}).items()]
  used = set()
  out = []
  for name, leaf in zip(names, leaves):
    rule = next((r for r in rules if r[1](name)), None)
    if rule is None:
      out.append(None)
      continue
    key, _, axes = rule
    used.add(key)
    ndim = len(leaf.shape)
    try:
      rows, cols = ([int(a) % ndim if -ndim <= int(a) < ndim else None
                     for a in group] for group in axes)
    except (TypeError, ValueError):
      rows = cols = [None]
    if (None in rows + cols or not rows or not cols or
        len(set(rows + cols)) != len(rows + cols)):
      raise ValueError(
          f"matrix_axes[{key!r}] = {axes!r} for leaf {name!r} of shape "
          f"{tuple(leaf.shape)}: expected (row_axes, col_axes), two non-empty "
          "disjoint lists of that leaf's axes.")
    batch = [a for a in range(ndim) if a not in rows + cols]
    shape = (*(leaf.shape[a] for a in batch),
             math.prod(leaf.shape[a] for a in rows),
             math.prod(leaf.shape[a] for a in cols))
    out.append(_MatrixView(tuple(batch + rows + cols), shape))
  unused = [key for key, _, _ in rules if key not in used]
  if unused:
    raise ValueError(f"matrix_axes keys {unused} match no leaf; some names: "
                     f"{names[:10]}.")
  return out


def _to_matrix(x: jax.Array, view: _MatrixView | None) -> jax.Array:
  return x if view is None else x.transpose(view.perm).reshape(view.shape)


def _from_matrix(x: jax.Array, view: _MatrixView | None,
                 shape: tuple[int, ...]) -> jax.Array:
  if view is None:
    return x
  permuted = x.reshape(tuple(shape[a] for a in view.perm))
  inverse = sorted(range(len(view.perm)), key=view.perm.__getitem__)
  return permuted.transpose(inverse)


# Leaves of equal shape are refreshed together by one loop, whose body is
# compiled once instead of once per leaf (the randomized method's per-leaf
# power iterations dominated compile time). A batch's loop needs all of its
# gradients, so the bound limits how many stay alive until it can start
# (unbounded, per-shape batches: 1304 MiB of temporaries at LLaMA-350M
# against 1170 MiB).
_REFRESH_BATCH_BYTES = 256 * 2**20


def _refresh_batches(keys: list[Any], sizes: list[int],
                     max_leaves: int | None = None) -> list[list[int]]:
  """Splits positions ``0..len(keys)-1`` into batches refreshed together.

  Args:
    keys: per projected leaf, what must be equal to batch it with another
      (shape, dtype, sharding); equal keys have equal sizes.
    sizes: per projected leaf, its number of values.
    max_leaves: at most this many leaves per batch (None: no limit).

  Returns:
    Lists of positions, each of equal keys and at most
    ``_REFRESH_BATCH_BYTES`` of float32 (or a single leaf), ordered by their
    first position. The leaves of one key are split into as few batches as
    the bounds allow, of sizes differing by at most one (no small remainder
    batch, whose loop would compile on its own).
  """
  positions: dict[Any, list[int]] = {}
  for i, key in enumerate(keys):
    positions.setdefault(key, []).append(i)
  batches = []
  for members in positions.values():
    limit = max(1, _REFRESH_BATCH_BYTES // (4 * max(sizes[members[0]], 1)))
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


def _refresh_offsets(num_batches: int, gap: int, stagger: bool) -> list[int]:
  """Per refresh batch, the phase of its refresh within the gap window."""
  if not stagger:
    return [0] * num_batches
  return [(i * gap) // num_batches for i in range(num_batches)]


def galore_project(
    inner: optax.GradientTransformation,
    *,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    projector_method: str = "svd",
    projector_dtype: str = "float32",
    stagger_refresh: bool = False,
    moments: str = "keep",
    matrix_axes: MatrixAxes | None = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """Runs ``inner`` on gradients projected onto a rank-``r`` subspace.

  Every leaf with two or more dimensions is treated as a batch of matrices
  (the last two axes). Its gradient ``G`` is projected into the subspace of
  the top-``r`` singular vectors of a recent gradient, ``inner`` runs on the
  small projected matrix (so its state is small), and ``inner``'s update is
  projected back to the leaf's shape and multiplied by ``scale``. Leaves with
  fewer than two dimensions go through ``inner`` at full size.

  The projector is recomputed from the current gradient at updates
  ``0, T, 2T, ...`` (``T = update_proj_gap``) inside the compiled step (a
  loop that runs zero times when no refresh is due, or a ``lax.cond``, so
  refresh and ordinary steps share one compilation).
  By default ``inner``'s state is kept across refreshes, as in the
  reference (``moments="keep"``); see ``moments`` for the others. A refresh
  whose gradient or resulting projector is not finite is skipped for that
  matrix, which keeps its previous projector.

  Args:
    inner: a transformation that does not need ``params`` (e.g.
      ``optax.scale_by_adam()``); it receives ``params=None``.
    rank: requested rank ``r``; each matrix uses ``min(r, m, n)``.
    update_proj_gap: ``T``, the number of updates between refreshes.
    scale: ``alpha``, multiplies the back-projected update.
    proj_type: ``"std"``, ``"reverse_std"``, ``"left"``, ``"right"`` or
      ``"full"``; see ``galore_optax.projection``.
    projector_method: ``"svd"`` (exact, the reference) or ``"randomized"``
      (subspace iteration warm-started from the previous projector).
    projector_dtype: storage of the projectors: ``"float32"`` (default),
      ``"bfloat16"`` or ``"int8"`` (block-wise 8-bit codes with one float32
      scale per 256 values, in the spirit of Q-GaLore's INT4 projectors).
      They are dequantised on the fly; products are computed in float32.
    stagger_refresh: spread the refreshes over the window so that no single
      step recomputes every projector (all leaves still refresh at update
      0). Leaves of equal shape, dtype and sharding are refreshed together
      in batches of up to 256 MiB of float32 gradient (one loop per batch,
      which compiles faster than code per leaf); staggering spreads these
      batches over the window and limits them to ``ceil(leaves / T)``
      leaves, so with no more projected leaves than ``T`` every leaf
      refreshes on its own step.
    moments: what happens to ``inner``'s moments when a leaf's projector
      is refreshed. ``"keep"`` (the reference): they stay as they are,
      although their coordinates now refer to the new basis. ``"project"``:
      they are re-expressed in the new basis through the overlap of the old
      and new projectors (``projection.carry_moment``); needs float moments
      shaped like the low-rank leaves (Adam-like; not 8-bit or factored
      states). ``"reset"``: ``inner``'s whole state is re-initialised at
      every refresh (Adam's bias correction restarts too); needs
      ``stagger_refresh=False`` and every leaf projected, since the inner
      state's step count is shared by all leaves.
    matrix_axes: ``{name: (row_axes, col_axes)}`` for leaves whose matrix
      is not their last two axes, e.g. an attention kernel stored as
      ``(d_model, heads, head_dim)``: ``{"q_proj": ([0], [1, 2])}`` projects
      the ``d_model x (heads * head_dim)`` matrix; any other axes are batch
      axes (one projector per matrix). Names match as one
      ``target_modules`` entry (equal, substring or full regex); the first
      matching key wins; a key that matches no leaf raises at ``init``.
    seed: seed of the randomized method's random test matrices, which are
      drawn from it and the update count (one per test-matrix shape, shared by
      the leaves refreshed in that update), so runs and resumed runs
      reproduce.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Zhao et al., 2024, arXiv 2403.03507.
  """
  rank = check_positive_int("rank", rank)
  gap = check_positive_int("update_proj_gap", update_proj_gap)
  check_finite_number("scale", scale)
  check_choice("proj_type", proj_type, projection.PROJ_TYPES)
  check_choice("projector_method", projector_method,
               projection.PROJECTOR_METHODS)
  check_choice("projector_dtype", projector_dtype,
               projector_storage.PROJECTOR_DTYPES)
  check_choice("moments", moments, MOMENT_POLICIES)
  if matrix_axes is not None and not (
      isinstance(matrix_axes, Mapping) and
      all(isinstance(k, str) and isinstance(v, (tuple, list)) and len(v) == 2
          for k, v in matrix_axes.items())):
    raise ValueError(
        "matrix_axes must be None or a dict {name: (row_axes, col_axes)}, got "
        f"{matrix_axes!r}.")
  if moments == "reset" and stagger_refresh:
    raise ValueError(
        "moments='reset' re-initialises the inner state, whose step count "
        "all leaves share, so it needs stagger_refresh=False.")
  inner = optax.with_extra_args_support(inner)

  def plan(leaf) -> projection.LeafPlan:
    return projection.plan_leaf(tuple(leaf.shape), rank, proj_type)

  def store(projector: projection.Projector) -> projection.Projector:
    return projector_storage.store(projector, projector_dtype)

  load = projector_storage.load

  def named_leaves(tree) -> tuple[list[str], list[Any], Any]:
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [path_to_name(path) for path, _ in paths_leaves]
    if len(set(names)) != len(names):
      dupes = sorted({n for n in names if names.count(n) > 1})
      raise ValueError(f"Leaf path names must be unique, got duplicates "
                       f"{dupes[:5]}.")
    return names, [leaf for _, leaf in paths_leaves], treedef

  def named_matrices(tree) -> tuple[list[str], list[Any], Any, list[Any]]:
    """``named_leaves`` with each leaf seen as its (batch of) matrices."""
    names, leaves, treedef = named_leaves(tree)
    views = _matrix_views(matrix_axes, names, leaves)
    return (names, [_to_matrix(x, v) for x, v in zip(leaves, views)],
            treedef, views)

  def init_fn(params: optax.Params) -> GaLoreState:
    names, leaves, treedef, _ = named_matrices(params)
    projectors = {
        name: store(projection.initial_projector(plan(p)))
        for name, p in zip(names, leaves) if _is_projected(p)
    }

    def lowrank_like(p):
      if not _is_projected(p):
        return p
      return jnp.zeros(plan(p).lowrank_shape, p.dtype)

    inner_state = inner.init(treedef.unflatten(
        [lowrank_like(p) for p in leaves]))
    if moments == "reset" and len(projectors) != len(leaves):
      raise ValueError(
          "moments='reset' re-initialises the inner state at each refresh, "
          "so every leaf must be projected (>= 2 dimensions); got "
          f"{len(leaves) - len(projectors)} leaves with fewer. Select the "
          "matrices with optax.partition or galore_optax.galore_labels.")
    if moments == "project":
      moment_leaf_ids(inner_state, treedef.unflatten(leaves))  # or raises
    return GaLoreState(
        count=jnp.zeros([], jnp.int32),
        projectors=projectors,
        inner_state=inner_state,
    )

  def moment_leaf_ids(inner_state, tree) -> Any:
    """Per leaf of ``inner_state``: the index of the parameter leaf whose
    moment it is, or -1 for leaves not shaped like parameters (counts,
    factored statistics)."""
    leaves, treedef = jax.tree.flatten(tree)
    ids = treedef.unflatten(list(range(len(leaves))))
    as_leaf = lambda x: isinstance(x, quantization.QuantizedArray)
    try:
      out = optax.tree_map_params(
          inner, lambda _, i: i, inner_state, ids,
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

  def carry_moments(inner_state, lowrank_tree, plans, old, new):
    """Re-expresses the moments of the leaves in ``plans`` in their new
    bases (``plans``, ``old``, ``new``: by leaf index; float32 factors)."""
    ids = moment_leaf_ids(inner_state, lowrank_tree)

    def carry(path, x, i):
      if i not in plans:
        return x
      return projection.carry_moment(
          x, old[i], new[i], plans[i],
          second=state_8bit.is_second_moment(inner_state, path))

    return jax.tree_util.tree_map_with_path(carry, inner_state, ids)

  def refresh_leaf(g: jax.Array, old: projection.Projector,
                   sketches: dict[Any, jax.Array]) -> projection.Projector:
    p = plan(g)
    sketch = None
    if projector_method == "randomized":
      sketch = projection.Projector(*(
          optax.MaskedNode() if dims is None else sketches[dims]
          for dims in projection.sketch_dims(p)))
    return store(projection.refresh_projector(
        g, p, load(old), method=projector_method, sketch=sketch))

  def refresh(grads: list[jax.Array], projectors: list[projection.Projector],
              sketches: dict[Any, jax.Array],
              due: jax.Array | None = None) -> list[Any]:
    """New projectors of one batch of equal-shape leaves (see
    ``_refresh_batches``), by one loop over the batch; with ``due`` given,
    the loop runs only where it is true (the projectors are returned as they
    are otherwise)."""
    if len(grads) == 1:
      if due is None:
        return [refresh_leaf(grads[0], projectors[0], sketches)]
      # Not a loop: XLA hoists a single leaf's refresh, invariant in the
      # loop, out of it, so it would run at every update.
      return [jax.lax.cond(due, lambda: refresh_leaf(
          grads[0], projectors[0], sketches), lambda: projectors[0])]
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
      return carry[1:] + [refresh_leaf(g, carry[0], sketches)]

    trips = len(grads) if due is None else jnp.where(due, len(grads), 0)
    return jax.lax.fori_loop(0, trips, body, list(projectors))

  def step_sketches(grads: list[jax.Array],
                    count: jax.Array) -> dict[Any, jax.Array]:
    """The randomized method's test matrices of this update, one per shape.

    Drawn once per update and shared by every leaf whose sketch has that
    shape: the random draw compiles once instead of once per refresh, and
    every leaf still gets fresh columns at each of its refreshes.
    """
    if projector_method != "randomized":
      return {}
    key = jax.random.fold_in(jax.random.key(seed), count)
    shapes = sorted({dims for g in grads if _is_projected(g)
                     for dims in projection.sketch_dims(plan(g))
                     if dims is not None})
    return {dims: jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(key, dims[0]), dims[1]), dims,
        jnp.float32) for dims in shapes}

  def update_fn(updates, state, params=None, **extra_args):
    del params
    names, grads, treedef, views = named_matrices(updates)
    shapes = [tuple(x.shape) for x in jax.tree.leaves(updates)]
    projected = [i for i, g in enumerate(grads) if _is_projected(g)]
    projectors = {i: state.projectors[names[i]] for i in projected}
    projected_set = set(projected)
    # Staggering spreads batches over the window, as finely as it allows:
    # one leaf per batch while there are no more leaves than steps.
    max_leaves = -(-len(projected) // gap) if stagger_refresh else None
    batches = [[projected[j] for j in batch] for batch in _refresh_batches(
        [(plan(grads[i]), grads[i].dtype, jax.typeof(grads[i]).sharding.spec)
         for i in projected], [grads[i].size for i in projected], max_leaves)]
    offsets = _refresh_offsets(len(batches), gap, stagger_refresh)

    sketches = step_sketches(grads, state.count)
    # Only "project" (to find the moments) and "reset" (to re-init) use it.
    lowrank_zeros = None if moments == "keep" else treedef.unflatten([
        jnp.zeros(plan(g).lowrank_shape, g.dtype) if i in projected_set
        else g for i, g in enumerate(grads)])
    # Only "project" changes the inner state at a refresh: only then is it
    # an operand of the refresh's cond.
    inner_state = state.inner_state if moments == "project" else None

    def due_at(offset: int) -> jax.Array:
      return (state.count == 0) | ((state.count - offset) % gap == 0)

    def refresh_group(operand, group_batches):
      """``moments="project"``: the batches due at one phase and the
      moments carried into their new bases."""
      ps, inner_state = operand
      group = [i for batch in group_batches for i in batch]
      old_ps = dict(zip(group, ps))
      new_ps = [p for batch in group_batches for p in refresh(
          [grads[i] for i in batch], [old_ps[i] for i in batch], sketches)]
      inner_state = carry_moments(
          inner_state, lowrank_zeros, {i: plan(grads[i]) for i in group},
          {i: load(p) for i, p in zip(group, ps)},
          {i: load(p) for i, p in zip(group, new_ps)})
      return new_ps, inner_state

    # One loop (or cond) per batch, so that each batch's projections can
    # start as soon as its gradients exist and free them (one over every
    # gradient keeps them all alive at once). Carrying moments needs the
    # whole inner state, so it keeps one cond per refresh phase.
    new_projectors = dict(projectors)
    if moments == "project":
      for offset in sorted(set(offsets)):
        group_batches = [b for b, o in zip(batches, offsets) if o == offset]
        group = [i for batch in group_batches for i in batch]
        refreshed, inner_state = jax.lax.cond(
            due_at(offset),
            lambda operand, g=group_batches: refresh_group(operand, g),
            lambda operand: operand,
            ([projectors[i] for i in group], inner_state),
        )
        new_projectors.update(zip(group, refreshed))
    else:
      for batch, offset in zip(batches, offsets):
        new_projectors.update(zip(batch, refresh(
            [grads[i] for i in batch], [projectors[i] for i in batch],
            sketches, due_at(offset))))
    if inner_state is None:
      inner_state = state.inner_state
    if moments == "reset":
      inner_state = jax.lax.cond(
          (state.count > 0) & (state.count % gap == 0),
          lambda s: inner.init(lowrank_zeros), lambda s: s, inner_state)

    factors = {i: load(new_projectors[i]) for i in projected}
    lowrank = [
        projection.project(g, factors[i], plan(g)).astype(g.dtype)
        if i in projected_set else g for i, g in enumerate(grads)
    ]
    inner_updates, inner_state = inner.update(
        treedef.unflatten(lowrank), inner_state, None, **extra_args)
    inner_updates = treedef.flatten_up_to(inner_updates)
    # A literal scale would become a full-size constant array wherever XLA
    # cannot fuse the product into the back-projection (XLA:CPU); as an
    # opaque scalar it is broadcast inside the fusion.
    alpha = jax.lax.optimization_barrier(jnp.asarray(scale, jnp.float32))
    # In a train step that donates the parameters, XLA writes each new weight
    # into its old buffer, and first copies the weight unless every read of
    # it provably comes before that write. The backward pass reads a weight
    # (for its input gradient) alongside computing its weight gradient, not
    # before, so XLA copied every projected weight on every step (1.1 GB at
    # LLaMA-350M shapes). Those reads come before the gradients of earlier
    # layers, so the first back-projection waits for every projected
    # gradient, and each next one for the one before it (which also makes XLA
    # apply each full-size update before computing the next, instead of
    # holding them all). Each batch's
    # refresh (loop or cond, due or not) returns its projectors only once
    # all of its gradients exist, so one projector per batch stands for them.
    waits_for = [jax.tree.leaves(new_projectors[batch[0]])[0]
                 for batch in batches]
    full = []
    for i, (g, u) in enumerate(zip(grads, inner_updates)):
      if i in projected_set:
        # Scaling the low-rank factor, not the full-size product, saves a
        # full-size pass (and XLA:CPU a full-size constant buffer).
        u = projection.project_back(
            ordering.after(u.astype(jnp.float32) * alpha,
                           *map(ordering.first_element, waits_for)),
            factors[i], plan(g)).astype(g.dtype)
        waits_for = [u]
      full.append(_from_matrix(u, views[i], shapes[i]))
    new_state = GaLoreState(
        count=optax.safe_increment(state.count),
        projectors={names[i]: new_projectors[i] for i in projected},
        inner_state=inner_state,
    )
    return treedef.unflatten(full), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
