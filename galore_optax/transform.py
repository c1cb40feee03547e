"""``galore_project``: run any optax transformation in a low-rank subspace.

References:
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
  Projection", ICML 2024, arXiv 2403.03507.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galore_optax import gradient_supply
from galore_optax import lazy_refresh
from galore_optax import matrix_view
from galore_optax import norm_scaling
from galore_optax import ordering
from galore_optax import output_rules
from galore_optax import projection
from galore_optax import projector_storage
from galore_optax import random_projection
from galore_optax import refresh
from galore_optax._checks import check_bool
from galore_optax._checks import check_choice
from galore_optax._checks import check_number_in_range
from galore_optax._checks import check_positive_int
from galore_optax._checks import check_real_leaf
from galore_optax._checks import check_seed
from galore_optax._checks import check_step_count
from galore_optax.matrix_view import MatrixAxes
from galore_optax.targets import path_to_name

MOMENT_POLICIES = ("keep", "project", "reset")
# ``galore_project``'s projector methods: computed ones, and random ones.
PROJECTOR_METHODS = projection.PROJECTOR_METHODS + (random_projection.METHOD,)

COMPLEX_REFUSED = (
    "galore_project projects real matrices only (the imaginary part would "
    "be lost). Leave complex leaves out of target_modules: the full-rank "
    "optimizer (e.g. optax's Adam) handles complex parameters.")


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
    refresh_state: with ``refresh_schedule="lazy"``, a dict from each projected
      leaf's name to its ``lazy_refresh.LazyRefreshState`` (each matrix's
      interval and similarity queue); empty otherwise.
    limiter_norms: for ``output`` rules with a norm-growth limiter (Fira,
      APOLLO), a dict from each projected leaf's name to its float32 state,
      one value per matrix (``norm_scaling.limit_norm_growth``); empty for
      ``output="galore"``.
  """

  count: jax.Array
  projectors: Any
  inner_state: optax.OptState
  refresh_state: Any = {}
  limiter_norms: Any = {}


def _named_matrices(
    tree: Any, matrix_axes: MatrixAxes | None
) -> tuple[list[str], list[Any], Any, list[matrix_view.MatrixView | None]]:
  """The leaves of ``tree`` with their unique path names, each seen as its
  (batch of) matrices, the tree's structure and each leaf's view."""
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  names = [path_to_name(path) for path, _ in paths_leaves]
  if len(set(names)) != len(names):
    dupes = sorted({n for n in names if names.count(n) > 1})
    raise ValueError(f"Leaf path names must be unique, got duplicates "
                     f"{dupes[:5]}.")
  leaves = [leaf for _, leaf in paths_leaves]
  views = matrix_view.matrix_views(matrix_axes, names, leaves)
  return (names, [matrix_view.to_matrix(x, v) for x, v in zip(leaves, views)],
          treedef, views)


def _leaf_plans(matrices: list[Any], rank: int,
                proj_type: str) -> dict[int, projection.LeafPlan]:
  """By leaf index, the plan of every projected leaf: two or more
  dimensions and not empty (an empty leaf has no subspace; ``inner`` gives
  it its empty update at full size)."""
  return {i: projection.plan_leaf(tuple(x.shape), rank, proj_type)
          for i, x in enumerate(matrices)
          if hasattr(x, "ndim") and x.ndim >= 2 and x.size > 0}


def _back_project(update: jax.Array, projector: projection.Projector,
                  plan: projection.LeafPlan, alpha: jax.Array,
                  waits_for: list[jax.Array]) -> jax.Array:
  """``alpha`` times the back-projected low-rank ``update``, in float32,
  computed only once every array of ``waits_for`` exists.

  In a train step that donates the parameters, XLA writes each new weight
  into its old buffer, and first copies the weight unless every read of it
  provably comes before that write. The backward pass reads a weight (for
  its input gradient) alongside computing its weight gradient, not before,
  so XLA copied every projected weight on every step (1.1 GB at LLaMA-350M
  shapes). Those reads come before the gradients of earlier layers, so the
  first back-projection waits for every projected gradient (one array per
  refresh batch stands for them, ``refresh.Refreshed.gradients_ready``), and
  each next one for the one before it (which also makes XLA apply each
  full-size update before computing the next, instead of holding them all).
  """
  # Scaling the low-rank factor, not the full-size product, saves a
  # full-size pass (and XLA:CPU a full-size constant buffer).
  return projection.project_back(
      ordering.after(update.astype(jnp.float32) * alpha,
                     *map(ordering.first_element, waits_for)),
      projector, plan)


def _codes_after(inner_state: optax.OptState,
                 *updates: jax.Array) -> optax.OptState:
  """``inner_state`` with its 8-bit codes computed once ``updates`` exist.

  The inner update may read the old inner state again after the new one is
  made (``quantize_state_8bit`` dequantises its 8-bit codes once per use),
  and a step that donates the state writes the new state over the old one.
  Unless every read provably comes first, XLA copies the state at the start
  of the step and keeps the copy until the update: in a per-layer step, most
  layers' 8-bit moments at once (1.5 GiB at LLaMA-7B). The low-rank updates
  are written out anyway (the back-projection is a product), so waiting for
  their first elements costs nothing. Only the uint8 codes wait (adding an
  integer zero changes no bit, where a float zero would turn ``-0.0`` into
  ``0.0``); float states are untouched, so their programs do not change.
  """
  leaves, treedef = jax.tree.flatten(inner_state)
  is_code = [jnp.result_type(x) == jnp.uint8 for x in leaves]
  if not updates or not any(is_code):
    return inner_state
  tied = iter(ordering.after([x for x, c in zip(leaves, is_code) if c],
                             *updates))
  return treedef.unflatten([next(tied) if c else x
                            for x, c in zip(leaves, is_code)])


def _take_supplies(raw_leaves: list[Any], grads: list[jax.Array],
                   plans: dict[int, projection.LeafPlan],
                   views: list[matrix_view.MatrixView | None], fusable: bool
                   ) -> dict[int, gradient_supply.GradientSupply]:
  """The supplied gradients (``gradient_supply``) of projected leaves, by
  leaf index; a supply that this transformation cannot serve in low rank
  (``fusable`` false, a matrix view, a stack of matrices) is made in full
  into ``grads`` at once."""
  supplies = {}
  for i in plans:
    supply = gradient_supply.supplied(raw_leaves[i])
    if supply is None:
      continue
    if fusable and views[i] is None and not plans[i].batch_shape:
      supplies[i] = supply
    else:
      grads[i] = matrix_view.to_matrix(supply.make_full(), views[i])
  return supplies


def _supplied_lowrank(policy: refresh.RefreshPolicy,
                      supply: gradient_supply.GradientSupply,
                      plan: projection.LeafPlan, stored: Any,
                      schedule_state: Any, count: jax.Array,
                      dtype: Any) -> tuple[jax.Array, Any, Any]:
  """A supplied leaf's low-rank gradient, stored projector and lazy state:
  on an update that refreshes it, from its full gradient (refreshed as
  ``policy`` refreshes every leaf, at phase 0); otherwise made in low rank
  from the stored projector, without the full gradient."""
  if policy.lazy is not None:
    due = jnp.any(policy.lazy.due(schedule_state, count, 0))
  else:
    due = refresh.is_due(count, 0, policy.gap)
  lowrank_dtype = projection.lowrank_dtype(dtype)

  def fresh(_):
    g = supply.make_full()
    new = policy.refresh_due(
        [g], {0: plan}, {0: stored}, None, count, None,
        None if policy.lazy is None else {0: schedule_state})
    low = projection.project(g, projector_storage.load(new.projectors[0]),
                             plan)
    return (low.astype(lowrank_dtype), new.projectors[0],
            new.schedule_states.get(0, schedule_state))

  def keep(_):
    low = supply.make_lowrank(projector_storage.load(stored))
    return low.astype(lowrank_dtype), stored, schedule_state

  return jax.lax.cond(due, fresh, keep, None)


def _project(policy: refresh.RefreshPolicy, random_method: bool,
             grads: list[jax.Array], plans: dict[int, projection.LeafPlan],
             supplies: dict[int, gradient_supply.GradientSupply],
             refreshed: refresh.Refreshed, stored: dict[int, Any],
             schedule_states: dict[int, Any], count: jax.Array
             ) -> tuple[refresh.Refreshed, dict[int, projection.Projector],
                        list[jax.Array]]:
  """Step 2 of ``galore_project``: every leaf's low-rank gradient.

  Supplied leaves (``gradient_supply``), which step 1 left out unless their
  projectors are random, are refreshed here when due and made in low rank
  otherwise.

  Returns:
    ``refreshed`` completed with the supplied leaves, the float32 factors
    and the gradients with every projected leaf in low rank.
  """
  lowrank = list(grads)
  projectors, ready = dict(refreshed.projectors), []
  for i, supply in supplies.items():
    if random_method:  # drawn in step 1
      lowrank[i] = supply.make_lowrank(projector_storage.load(
          projectors[i])).astype(projection.lowrank_dtype(grads[i].dtype))
    else:
      lowrank[i], projectors[i], schedule_states[i] = _supplied_lowrank(
          policy, supply, plans[i], stored[i], schedule_states.get(i), count,
          grads[i].dtype)
    ready.append(ordering.first_element(lowrank[i]))
  refreshed = refreshed._replace(
      projectors=projectors,
      gradients_ready=[*refreshed.gradients_ready, *ready],
      schedule_states={**refreshed.schedule_states, **{
          i: schedule_states[i] for i in supplies if policy.lazy}})
  factors = {i: projector_storage.load(refreshed.projectors[i])
             for i in plans}
  for i in plans:
    if i not in supplies:
      lowrank[i] = projection.project(grads[i], factors[i], plans[i]).astype(
          projection.lowrank_dtype(grads[i].dtype))
  return refreshed, factors, lowrank


def _check_lazy_arguments(refresh_schedule: Any, queue_size: Any,
                          threshold: Any, moments: str,
                          projector_method: str) -> int:
  """Raises a ValueError for a bad lazy-refresh argument.

  Returns:
    ``queue_size`` as a Python int (0 for the fixed schedule, which does not
    read the lazy arguments).
  """
  check_choice("refresh_schedule", refresh_schedule,
               lazy_refresh.REFRESH_SCHEDULES)
  if refresh_schedule == "fixed":
    return 0  # unused (and perhaps traced by optax.inject_hyperparams)
  queue_size = check_positive_int("lazy_queue_size", queue_size)
  check_number_in_range("lazy_threshold", threshold, low=-1.0, high=1.0)
  if moments != "keep":
    raise ValueError(
        f"refresh_schedule='lazy' needs moments='keep' (got {moments!r}): "
        "each matrix refreshes on its own schedule, while 'reset' "
        "re-initialises the "
        "inner state that all leaves share and 'project' carries moments "
        "per refresh phase, not per matrix.")
  if projector_method == random_projection.METHOD:
    raise ValueError(
        "refresh_schedule='lazy' compares successive computed projectors; "
        "random projectors (projector_method='random') are redrawn on the "
        "fixed schedule.")
  return queue_size
def _limited_outputs(output: str, scale: float, names: list[str],
                     grads: list[jax.Array], lowrank: list[jax.Array],
                     inner_updates: list[jax.Array],
                     factors: dict[int, projection.Projector],
                     plans: dict[int, projection.LeafPlan],
                     limiter_norms: dict[str, jax.Array]
                     ) -> tuple[list[jax.Array], dict[str, jax.Array]]:
  """Step 4 for an ``output`` rule with a norm-growth limiter: every
  projected leaf's full-size update (in its gradient's dtype) and the
  limiters' new states."""
  full, norms = list(inner_updates), {}
  for i, plan in plans.items():
    u, norms[names[i]] = output_rules.full_size_update(
        output, grads[i], lowrank[i], inner_updates[i], factors[i], plan,
        scale, limiter_norms[names[i]])
    full[i] = u.astype(grads[i].dtype)
  return full, norms


def _check_arguments(rank: Any, update_proj_gap: Any, scale: Any,
                     proj_type: Any, projector_method: Any,
                     projector_dtype: Any, stagger_refresh: Any,
                     moments: Any, matrix_axes: Any, seed: Any,
                     output: Any) -> tuple[int, int]:
  """Raises a ValueError for a bad ``galore_project`` argument.

  Returns:
    ``rank`` and ``update_proj_gap`` as Python ints.
  """
  # A rank above a matrix's size is clipped to it (nothing is sized by it).
  rank = check_positive_int("rank", rank)
  gap = check_step_count("update_proj_gap", update_proj_gap)
  check_number_in_range("scale", scale, low=0.0)
  check_bool("stagger_refresh", stagger_refresh)
  check_seed("seed", seed)
  check_choice("proj_type", proj_type, projection.PROJ_TYPES)
  check_choice("projector_method", projector_method, PROJECTOR_METHODS)
  check_choice("projector_dtype", projector_dtype,
               projector_storage.PROJECTOR_DTYPES)
  check_choice("moments", moments, MOMENT_POLICIES)
  check_choice("output", output, output_rules.OUTPUT_RULES)
  output_rules.check_output(output, proj_type)
  if projector_method == random_projection.METHOD and (
      moments != "keep" or stagger_refresh):
    raise ValueError(
        "projector_method='random' draws every projector at updates 0, T, "
        "2T, ... from the seed alone: it needs moments='keep' and "
        "stagger_refresh=False.")
  if not matrix_view.is_matrix_axes(matrix_axes):
    raise ValueError(
        "matrix_axes must be None or a dict {name: (row_axes, col_axes)}, got "
        f"{matrix_axes!r}.")
  if moments == "reset" and stagger_refresh:
    raise ValueError(
        "moments='reset' re-initialises the inner state, whose step count "
        "all leaves share, so it needs stagger_refresh=False.")
  return rank, gap


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
    refresh_schedule: str = "fixed",
    lazy_queue_size: int = 5,
    lazy_threshold: float = 0.4,
    output: str = "galore",
) -> optax.GradientTransformationExtraArgs:
  """Runs ``inner`` on gradients projected onto a rank-``r`` subspace.

  Every leaf with two or more dimensions is treated as a batch of matrices
  (the last two axes). Its gradient ``G`` is projected into the subspace of
  the top-``r`` singular vectors of a recent gradient, ``inner`` runs on the
  small projected matrix (so its state is small), and ``inner``'s update is
  projected back to the leaf's shape and multiplied by ``scale``. Leaves with
  fewer than two dimensions, or without values (a dimension of 0), go through
  ``inner`` at full size. Complex leaves that would be projected raise a
  ValueError at ``init`` (the projection is real). A float16 leaf is
  projected to a float32 low-rank gradient, so ``inner``'s state for it is
  float32 (``projection.lowrank_dtype``); its update is cast back.
  ``output`` chooses another use of the low-rank result (Fira, APOLLO).

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
    projector_method: ``"svd"`` (exact, the reference), ``"randomized"``
      (subspace iteration warm-started from the previous projector) or
      ``"random"`` (APOLLO's Gaussian projection, drawn from ``seed``, the
      leaf's name and the refresh; see ``galore_optax.random_projection``).
    projector_dtype: storage of the projectors: ``"float32"`` (default),
      ``"bfloat16"``, ``"int8"`` (block-wise 8-bit codes with one float32
      scale per 256 values) or ``"int4"`` (Q-GaLore's: groups of 256
      values quantised asymmetrically to 16 levels, two to a byte; see
      ``projector_storage``). They are dequantised on the fly; products are
      computed in float32.
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
      axes (one projector per matrix). Module names match as one
      ``target_modules`` entry (equal, substring or full regex); the first
      matching key wins; a key that matches no leaf raises at ``init``.
    seed: seed of the randomized method's random test matrices, which are
      drawn from it and the update count (one per test-matrix shape, shared by
      the leaves refreshed in that update), so runs and resumed runs
      reproduce.
    refresh_schedule: ``"fixed"`` (default): every ``T`` updates. ``"lazy"``
      (Q-GaLore's layer-adaptive schedule, ``galore_optax.lazy_refresh``):
      each matrix starts with interval ``T`` and doubles it whenever the
      mean cosine similarity of the leading singular vectors of its last
      ``lazy_queue_size`` successive projectors reaches ``lazy_threshold``.
      Needs ``moments="keep"``; with ``projector_dtype="int8"``, no stacked
      leaves (raises at ``init``).
    lazy_queue_size: similarities averaged by the lazy schedule (the
      reference's 5).
    lazy_threshold: mean similarity at which a matrix's interval doubles
      (the reference's 0.4).
    output: what the low-rank result is used for (see
      ``galore_optax.output_rules``): ``"galore"`` (back-projected, times
      ``scale``), ``"fira"`` (plus the scaled residual of the gradient),
      ``"apollo_channel"`` or ``"apollo_tensor"`` (the raw gradient scaled
      per channel or per matrix, times ``sqrt(scale)``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Zhao et al., 2024, arXiv 2403.03507; Chen et al., 2024, arXiv
    2410.01623 (Fira); Zhu et al., 2024, arXiv 2412.05270 (APOLLO).
  """
  rank, gap = _check_arguments(rank, update_proj_gap, scale, proj_type,
                               projector_method, projector_dtype,
                               stagger_refresh, moments, matrix_axes, seed,
                               output)
  queue_size = _check_lazy_arguments(refresh_schedule, lazy_queue_size,
                                     lazy_threshold, moments,
                                     projector_method)
  lazy = (lazy_refresh.LazySchedule(gap, queue_size, lazy_threshold)
          if refresh_schedule == "lazy" else None)
  inner = optax.with_extra_args_support(inner)
  policy = refresh.RefreshPolicy(inner, gap, stagger_refresh,
                                 projector_method, projector_dtype, moments,
                                 seed, lazy)

  def init_fn(params: optax.Params) -> GaLoreState:
    names, leaves, treedef, _ = _named_matrices(params, matrix_axes)
    plans = _leaf_plans(leaves, rank, proj_type)
    projectors = {}
    for i, plan in plans.items():
      check_real_leaf(names[i], leaves[i], COMPLEX_REFUSED)
      projectors[names[i]] = projector_storage.store(
          projection.initial_projector(plan), projector_dtype)
    inner_state = inner.init(treedef.unflatten([
        projection.lowrank_placeholder(p, plans.get(i))
        for i, p in enumerate(leaves)]))
    policy.check_inner_state(inner_state, treedef.unflatten(leaves),
                             len(plans))
    return GaLoreState(
        count=jnp.zeros([], jnp.int32),
        projectors=projectors,
        inner_state=inner_state,
        refresh_state={} if lazy is None else {
            names[i]: lazy.init(plan, projector_dtype)
            for i, plan in plans.items()},
        limiter_norms={names[i]: norm_scaling.initial_norms(plan)
                       for i, plan in plans.items()
                       if output_rules.has_limiter(output)},
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params
    names, grads, treedef, views = _named_matrices(updates, matrix_axes)
    plans = _leaf_plans(grads, rank, proj_type)
    supplies = _take_supplies(jax.tree.leaves(updates), grads, plans, views,
                              output == "galore" and moments == "keep")
    # 1. Refresh the projectors that are due (and, with moments="project" or
    # "reset", the inner state). A supplied leaf refreshes in step 2.
    stored = {i: state.projectors[names[i]] for i in plans}
    schedule_states = ({i: state.refresh_state[names[i]] for i in plans}
                       if lazy else {})
    if projector_method == random_projection.METHOD:
      refreshed = random_projection.refresh_due(
          names, plans, stored, state.inner_state, state.count, gap,
          seed, projector_dtype)
    else:
      own = {i: p for i, p in plans.items() if i not in supplies}
      refreshed = policy.refresh_due(
          grads, own, {i: stored[i] for i in own}, state.inner_state,
          state.count, treedef,
          {i: schedule_states[i] for i in own} if lazy else None)
    # 2. Project the gradients (supplied ones: made in low rank).
    refreshed, factors, lowrank = _project(
        policy, projector_method == random_projection.METHOD, grads, plans,
        supplies, refreshed, stored, schedule_states, state.count)
    # 3. Run the inner optimizer.
    inner_updates, inner_state = inner.update(
        treedef.unflatten(lowrank), refreshed.inner_state, None, **extra_args)
    inner_updates = treedef.flatten_up_to(inner_updates)
    inner_state = _codes_after(
        inner_state, *(ordering.first_element(inner_updates[i]) for i in plans))
    # 4. Back-project, scaled, the first after every gradient and each next
    # after the one before (see ``_back_project``). A literal scale would
    # become a full-size constant array wherever XLA cannot fuse the product
    # into the back-projection (XLA:CPU); as an opaque scalar it is
    # broadcast inside the fusion.
    if output_rules.has_limiter(output):
      inner_updates, limiter_norms = _limited_outputs(
          output, scale, names, grads, lowrank, inner_updates, factors, plans,
          state.limiter_norms)
    else:
      limiter_norms = state.limiter_norms
      alpha = jax.lax.optimization_barrier(jnp.asarray(scale, jnp.float32))
      waits_for = refreshed.gradients_ready
      for i in plans:
        inner_updates[i] = _back_project(
            inner_updates[i], factors[i], plans[i], alpha,
            waits_for).astype(grads[i].dtype)
        waits_for = [inner_updates[i]]
    full = [matrix_view.from_matrix(u, views[i], tuple(leaf.shape))
            for i, (u, leaf) in enumerate(zip(inner_updates,
                                              jax.tree.leaves(updates)))]
    new_state = GaLoreState(
        count=optax.safe_increment(state.count),
        projectors={names[i]: refreshed.projectors[i] for i in plans},
        inner_state=inner_state,
        refresh_state={names[i]: refreshed.schedule_states[i]
                       for i in plans} if lazy else {},
        limiter_norms=limiter_norms,
    )
    return treedef.unflatten(full), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
