"""Q-GaLore's lazy, layer-adaptive projector refresh.

With ``galore_project(..., refresh_schedule="lazy")`` every matrix (each
matrix of a stacked leaf too) has its own refresh interval, starting at
``update_proj_gap``. At each of its refreshes the cosine similarity between
the leading singular vector of the new projector and that of the previous
refresh's projector is appended to a queue of the last ``queue_size`` ones;
once the queue is full, whenever its mean reaches ``threshold`` the interval
doubles. A matrix refreshes at update ``count`` when ``count`` is a multiple
of its current interval (after the phase offset of ``stagger_refresh``), so
a doubled interval takes effect from the next multiple of it. The queue is
not cleared when the interval doubles, so it may double at consecutive
refreshes.

These are the rules of ``q_galore_torch.GaLoreProjector`` (version 1.0):

* leading vector: the first row of the right factor ``Q`` (``Vh[0]``) when
  the right side is projected, the first column of the left factor ``P``
  (``U[:, 0]``) when the left side is; both concatenated for ``"full"``
  (whose similarity is then the mean of the two sides'). The reference only
  has ``proj_type="std"``;
* the similarity is signed (no absolute value), of the float32 projectors,
  before any storage quantisation; our singular vectors have canonical
  signs (``projection.canonicalize_column_signs``) where the reference keeps
  LAPACK's;
* no similarity at the first refresh; the queue is full after ``queue_size
  + 1`` refreshes and its mean is ``sum / queue_size``, compared with
  ``>=``;
* the update counter is the optimizer's (the reference's is per parameter,
  equal to it when every parameter is updated at every step).

The decisions are made inside the compiled step (one compilation). In a
batch of equal-shape leaves refreshed by one loop, a leaf is decomposed only
when one of its matrices is due; a stacked leaf decomposes all its matrices
then and keeps the new projector only for those that are due. A refresh
skipped for a non-finite gradient records nothing. The interval stops
doubling at ``MAX_INTERVAL``.

References:
  Zhang et al., "Q-GaLore: Quantized GaLore with INT4 Projection and
  Layer-Adaptive Low-Rank Gradients", 2024, arXiv 2407.08296
  (``q_galore_torch``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from galore_optax import projection
from galore_optax import projector_storage

REFRESH_SCHEDULES = ("fixed", "lazy")
# Doubling stops here, far beyond any run, so that it never overflows int32.
MAX_INTERVAL = 2**30


class LazyRefreshState(NamedTuple):
  """The lazy schedule of one leaf's matrices (``batch`` is its batch shape).

  Attributes:
    interval: int32 ``(*batch)``, each matrix's current refresh interval.
    refreshes: int32 ``(*batch)``, refreshes so far (the first included).
    similarities: float32 ``(*batch, queue_size)``, the last similarities,
      oldest first (valid once ``refreshes > queue_size``).
    leading: float32 ``(*batch, d)``, the previous refresh's leading vector.
  """

  interval: jax.Array
  refreshes: jax.Array
  similarities: jax.Array
  leading: jax.Array


def leading_vector(projector: projection.Projector,
                   plan: projection.LeafPlan) -> jax.Array:
  """The leading singular vector(s) of each matrix's float32 projector.

  Args:
    projector: float32 factors.
    plan: the leaf's plan.

  Returns:
    ``(*batch, d)``: ``P[..., :, 0]``, ``Q[..., 0, :]``, or both
    concatenated for a two-sided plan.
  """
  parts = []
  if plan.use_left:
    parts.append(projector.left[..., :, 0])
  if plan.use_right:
    parts.append(projector.right[..., 0, :])
  return jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]


def cosine_similarity(a: jax.Array, b: jax.Array,
                      eps: float = 1e-8) -> jax.Array:
  """``torch.nn.functional.cosine_similarity`` along the last axis.

  Args:
    a: ``(..., d)`` vectors.
    b: ``(..., d)`` vectors.
    eps: the smallest norm a vector is divided by.

  Returns:
    ``(...)`` signed similarities.
  """
  norm = lambda x: jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=-1,
                                                keepdims=True)), eps)
  return jnp.sum((a / norm(a)) * (b / norm(b)), axis=-1)


@dataclasses.dataclass(frozen=True)
class LazySchedule:
  """The static settings of a lazy refresh schedule.

  Attributes:
    gap: ``update_proj_gap``, every matrix's first interval.
    queue_size: similarities averaged (the reference's 5).
    threshold: the mean similarity at which the interval doubles (0.4).
  """

  gap: int
  queue_size: int
  threshold: Any

  def init(self, plan: projection.LeafPlan,
           projector_dtype: str) -> LazyRefreshState:
    """The state of one leaf before its first refresh.

    Args:
      plan: the leaf's plan.
      projector_dtype: the projector storage dtype.

    Returns:
      Its ``LazyRefreshState``.

    Raises:
      ValueError: if the leaf's matrices could not keep their stored
        projectors apart (int8 projectors of a stacked leaf).
    """
    batch = plan.batch_shape
    if not projector_storage.matrices_selectable(projector_dtype, batch):
      raise ValueError(
          "refresh_schedule='lazy' refreshes each matrix of a stacked leaf "
          f"(shape {plan.shape}) on its own schedule, but int8 projectors "
          "share blocks of values across its matrices; use "
          "projector_dtype='int4', "
          "'bfloat16' or 'float32'.")
    dims = ((plan.m if plan.use_left else 0) +
            (plan.n if plan.use_right else 0))
    return LazyRefreshState(
        interval=jnp.full(batch, self.gap, jnp.int32),
        refreshes=jnp.zeros(batch, jnp.int32),
        similarities=jnp.zeros((*batch, self.queue_size), jnp.float32),
        leading=jnp.zeros((*batch, dims), jnp.float32))

  def due(self, state: LazyRefreshState, count: jax.Array,
          offset: int) -> jax.Array:
    """Which matrices refresh at update ``count``.

    Args:
      state: the leaf's state.
      count: the update count.
      offset: the leaf's refresh phase (``refresh.refresh_offsets``).

    Returns:
      Boolean ``(*batch)``: at update 0, and where ``count - offset`` is a
      multiple of the matrix's interval.
    """
    return (count == 0) | ((count - offset) % state.interval == 0)

  def observe(self, state: LazyRefreshState, new: projection.Projector,
              plan: projection.LeafPlan,
              refreshed: jax.Array) -> LazyRefreshState:
    """Records the refreshes of the matrices where ``refreshed`` is true.

    Args:
      state: the leaf's state.
      new: the new float32 projector.
      plan: the leaf's plan.
      refreshed: boolean ``(*batch)``.

    Returns:
      The state after those refreshes: similarity queued (from the second
      refresh on), interval doubled where the full queue's mean reaches the
      threshold, leading vector kept for the next one.
    """
    leading = leading_vector(new, plan).astype(jnp.float32)
    record = refreshed & (state.refreshes > 0)
    queue = jnp.where(
        record[..., None],
        jnp.concatenate([state.similarities[..., 1:], cosine_similarity(
            state.leading, leading)[..., None]], axis=-1),
        state.similarities)
    refreshes = state.refreshes + refreshed.astype(jnp.int32)
    full = refreshes > self.queue_size
    mean = jnp.sum(queue, axis=-1) / self.queue_size
    grow = record & full & (mean >= self.threshold)
    interval = jnp.where(grow & (state.interval < MAX_INTERVAL),
                         state.interval * 2, state.interval)
    return LazyRefreshState(
        interval=interval, refreshes=refreshes, similarities=queue,
        leading=jnp.where(refreshed[..., None], leading, state.leading))

  def refresh_leaf(self, grad: jax.Array,
                   item: tuple[projection.Projector, LazyRefreshState],
                   plan: projection.LeafPlan, due: jax.Array,
                   compute: Callable[[jax.Array, projection.Projector],
                                     projection.Projector],
                   dtype: str) -> tuple[projection.Projector,
                                        LazyRefreshState]:
    """Refreshes the due matrices of one leaf.

    Args:
      grad: the leaf's gradient, as matrices.
      item: its stored projector and its state.
      plan: its plan.
      due: boolean ``(*batch)``, see ``due``.
      compute: ``(grad, stored) -> float32 projector`` (the previous one
        where a refresh cannot be trusted).
      dtype: the projector storage dtype.

    Returns:
      The new stored projector and state.
    """
    stored, state = item
    new = compute(grad, stored)
    kept = projector_storage.select_matrices(
        due, projector_storage.store_refreshed(new, stored, dtype), stored)
    finite = jnp.all(jnp.isfinite(grad), axis=(-2, -1))
    return kept, self.observe(state, new, plan, due & finite)

  def refresh_batch(self, refresh_batch: Callable[..., list[Any]],
                    grads: list[jax.Array],
                    stored: list[projection.Projector],
                    states: list[LazyRefreshState],
                    plan: projection.LeafPlan, count: jax.Array, offset: int,
                    compute: Callable[[jax.Array, projection.Projector],
                                      projection.Projector],
                    dtype: str) -> tuple[list[Any], list[LazyRefreshState]]:
    """Refreshes the due matrices of a batch of equal-shape leaves.

    Args:
      refresh_batch: ``RefreshPolicy.refresh_batch`` (the loop that runs
        its ``refresh_leaf`` over the batch when ``due``).
      grads: the batch's gradients.
      stored: their stored projectors.
      states: their states.
      plan: the batch's common plan.
      count: the update count.
      offset: the batch's refresh phase.
      compute: as for ``refresh_leaf``.
      dtype: the projector storage dtype.

    Returns:
      The new stored projectors and states, in order.
    """
    dues = [self.due(s, count, offset) for s in states]
    any_due = jnp.any(jnp.stack([jnp.any(d) for d in dues]))

    def leaf(grad, item):
      # The loop body sees one leaf at a time; its due mask is recomputed
      # from its own state (the count and offset are the batch's), and a
      # leaf none of whose matrices is due skips its decomposition.
      due = self.due(item[1], count, offset)
      return jax.lax.cond(
          jnp.any(due),
          lambda: self.refresh_leaf(grad, item, plan, due, compute, dtype),
          lambda: item)

    out = refresh_batch(grads, list(zip(stored, states)), plan, {},
                        due=any_due, refresh_leaf=leaf)
    return [p for p, _ in out], [s for _, s in out]


def schedule_summary(opt_state: Any) -> dict[str, dict[str, list[Any]]]:
  """What the lazy schedules of an optimizer state have done so far.

  Args:
    opt_state: any optimizer state holding ``galore_project`` states with
      ``refresh_schedule="lazy"`` (host or device arrays).

  Returns:
    Per projected leaf name, per matrix (flattened over a stacked leaf's
    batch axes): ``refreshes`` (so far, the first included), ``interval``
    (the current one) and ``similarity`` (the mean of the similarities in
    the queue, None before the second refresh).
  """
  is_state = lambda x: isinstance(x, LazyRefreshState)
  found = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_state)[0]
  out = {}
  for path, state in found:
    if not is_state(state):
      continue
    refreshes = np.asarray(state.refreshes).reshape(-1)
    queue = np.asarray(state.similarities)
    queue = queue.reshape(-1, queue.shape[-1])
    size = queue.shape[-1]
    valid = np.minimum(np.maximum(refreshes - 1, 0), size)
    out[str(path[-1].key)] = {
        "refreshes": refreshes.tolist(),
        "interval": np.asarray(state.interval).reshape(-1).tolist(),
        "similarity": [float(np.mean(q[size - n:])) if n else None
                       for q, n in zip(queue, valid)],
    }
  return out
