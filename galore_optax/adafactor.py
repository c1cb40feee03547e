"""Hugging Face Adafactor as optax primitives, the inner optimizer of GaLore.

``galore_torch.GaLoreAdafactor`` runs Hugging Face's ``Adafactor`` on the
projected gradient. With an external learning rate (``relative_step=False,
scale_parameter=False, warmup_init=False``, as the ``Trainer`` builds it) one
update of a leaf ``g`` at step ``t = 1, 2, ...`` is:

1. ``beta2_t = 1 - t ** decay_rate``; ``u = g ** 2 + eps``;
2. leaves with two or more dimensions keep factored EMAs of ``u``: ``row``
   (mean over the last axis) and ``col`` (mean over the second-to-last);
   ``U = g * rsqrt(row / mean(row)) * rsqrt(col)``. Other leaves keep a full
   EMA ``v`` of ``u`` and ``U = g * rsqrt(v)``;
3. ``U <- U / max(1, RMS(U) / clip_threshold)``;
4. ``U <- lr * U``; with ``beta1``: ``m <- beta1 m + (1 - beta1) U``,
   ``U = m`` (no bias correction);
5. ``p <- p - lr * weight_decay * p - U`` (decay of the pre-update weights).

Steps 1-2 are ``scale_by_factored_rms_hf``, 3 is ``clip_by_matrix_rms``, 4 is
``optax.scale_by_learning_rate`` then ``optax.ema``; ``scale_by_adafactor``
chains them. The learning rate sits *before* the first-moment average (unlike
Adam), so with a schedule the average mixes updates scaled by different
rates, exactly as the reference does.

Leading axes of a leaf with more than two dimensions are a batch of matrices
throughout, including the RMS clipping (the reference clips such a leaf as a
whole): a stacked ``(L, m, n)`` leaf behaves exactly like ``L`` separate
``(m, n)`` leaves, which is what stacked (scanned) layers need and what
``galore_project`` assumes.

References:
  Shazeer and Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
  Cost", ICML 2018, arXiv 1804.04235; Hugging Face ``transformers``
  ``optimization.Adafactor``; Zhao et al., 2024, arXiv 2403.03507.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galore_optax._checks import check_learning_rate
from galore_optax._checks import check_number_in_range
from galore_optax._checks import check_real_leaf
from galore_optax.targets import path_to_name


class ScaleByFactoredRmsHfState(NamedTuple):
  """State of ``scale_by_factored_rms_hf``.

  Attributes:
    count: number of updates so far (int32, saturating).
    v_row: per leaf with two or more dimensions, the EMA of the row means of
      ``g ** 2 + eps`` (shape ``leaf.shape[:-1]``); ``optax.MaskedNode`` for
      other leaves.
    v_col: the EMA of the column means (shape ``leaf.shape[:-2] +
      leaf.shape[-1:]``); ``optax.MaskedNode`` for leaves with fewer than two
      dimensions.
    v: for leaves with fewer than two dimensions, the EMA of ``g ** 2 + eps``
      (the leaf's shape); ``optax.MaskedNode`` for the others.

  All moments are float32 (or wider), whatever the gradient's dtype, as in the
  reference, which upcasts half-precision gradients. The field names are
  those of ``optax.FactoredState``, so ``state_fields.is_second_moment``
  knows them as second moments (``quantize_state_8bit`` stores them on its
  unsigned map).
  """

  count: jax.Array
  v_row: optax.Updates
  v_col: optax.Updates
  v: optax.Updates


def _factored(leaf: Any) -> bool:
  # An empty leaf keeps an (empty) full moment: factors of an empty matrix
  # would be means over no values (NaN).
  return leaf.ndim >= 2 and leaf.size > 0


def _moment_dtype(leaf: Any) -> jnp.dtype:
  return jnp.promote_types(leaf.dtype, jnp.float32)


def _square_cap(g: jax.Array) -> jax.Array:
  """The largest squared gradient Adafactor's statistics take in, for ``g``.

  ``finfo.max / 2 ** k`` with ``2 ** k`` at least the longest axis of ``g``'s
  matrices: a mean of capped squares over a row or a column, and a mean of
  such means, cannot overflow. Ordinary gradients (squares far below the cap)
  are unaffected.

  Args:
    g: a gradient leaf in the moments' dtype.

  Returns:
    A scalar of ``g``'s dtype.
  """
  longest = max(g.shape[-2:], default=1)
  exponent = max(longest - 1, 0).bit_length()
  return jnp.asarray(jnp.finfo(g.dtype).max / 2.0 ** exponent, g.dtype)


def scale_by_factored_rms_hf(
    decay_rate: float = -0.8,
    eps: float = 1e-30,
) -> optax.GradientTransformation:
  """Scales by Adafactor's factored second moment, Hugging Face's variant.

  At update ``t`` (counted from 1), with ``beta2 = 1 - t ** decay_rate`` and
  ``u = g ** 2 + eps``: a leaf with two or more dimensions updates
  ``row <- beta2 row + (1 - beta2) mean(u, -1)`` and ``col <- beta2 col +
  (1 - beta2) mean(u, -2)`` and returns ``g * rsqrt(row / mean(row, -1)) *
  rsqrt(col)`` (leading axes are a batch); other leaves update ``v <- beta2 v
  + (1 - beta2) u`` and return ``g * rsqrt(v)``.

  Unlike ``optax.scale_by_factored_rms`` this factors every leaf with two or
  more dimensions whatever its size, adds ``eps`` to ``g ** 2`` before
  averaging, and has no ``decay_offset`` or ``min_dim_size_to_factor``: it
  follows ``transformers.Adafactor`` (and thus ``galore_torch``) exactly.

  Args:
    decay_rate: exponent of the second-moment decay schedule; must be <= 0
      (``beta2`` is 0 at the first update and grows towards 1).
    eps: added to the squared gradient (the reference's ``eps[0]``).

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    ``ScaleByFactoredRmsHfState``.

  References:
    Shazeer and Stern, 2018, arXiv 1804.04235; Hugging Face ``transformers``
    ``optimization.Adafactor``.
  """
  check_number_in_range("decay_rate", decay_rate, high=0.0)
  check_number_in_range("eps", eps, low=0.0)

  def init_fn(params: optax.Params) -> ScaleByFactoredRmsHfState:
    for path, p in jax.tree_util.tree_leaves_with_path(params):
      check_real_leaf(path_to_name(path), p,
                      "Adafactor's second moment is for real parameters "
                      "only (the imaginary part would be lost).")

    def zeros(shape, p):
      return jnp.zeros(shape, _moment_dtype(p))

    def row(p):
      return zeros(p.shape[:-1], p) if _factored(p) else optax.MaskedNode()

    def col(p):
      return (zeros(p.shape[:-2] + p.shape[-1:], p) if _factored(p)
              else optax.MaskedNode())

    def full(p):
      return optax.MaskedNode() if _factored(p) else zeros(p.shape, p)

    return ScaleByFactoredRmsHfState(
        count=jnp.zeros([], jnp.int32),
        v_row=jax.tree.map(row, params),
        v_col=jax.tree.map(col, params),
        v=jax.tree.map(full, params),
    )

  def update_fn(updates, state, params=None):
    del params
    treedef = jax.tree.structure(updates)
    grads = treedef.flatten_up_to(updates)
    rows = treedef.flatten_up_to(state.v_row)
    cols = treedef.flatten_up_to(state.v_col)
    fulls = treedef.flatten_up_to(state.v)
    t = optax.safe_increment(state.count)
    beta2 = 1.0 - jnp.power(t.astype(jnp.float32), decay_rate)

    def ema(old, new):
      return beta2 * old + (1.0 - beta2) * new

    out, new_rows, new_cols, new_fulls = [], [], [], []
    for g, row, col, full in zip(grads, rows, cols, fulls):
      g32 = g.astype(_moment_dtype(g))  # the reference upcasts bf16 grads
      # Capped so that no sum below overflows: a huge entry saturates its
      # statistics instead of making them Inf (and the factors Inf / Inf).
      u = jnp.minimum(jnp.square(g32) + eps, _square_cap(g32))
      if _factored(g):
        row = ema(row, jnp.mean(u, axis=-1)).astype(row.dtype)
        col = ema(col, jnp.mean(u, axis=-2)).astype(col.dtype)
        row_ratio = row / jnp.mean(row, axis=-1, keepdims=True)
        # A row of zeros next to a saturated row: its ratio underflows, and
        # rsqrt(0) * 0 would be NaN; the smallest normal keeps it finite.
        row_ratio = jnp.maximum(row_ratio, jnp.finfo(row.dtype).tiny)
        r_factor = jax.lax.rsqrt(row_ratio)
        c_factor = jax.lax.rsqrt(col)
        # (r c) g: the reference's order of the products, for bit parity.
        scaled = (r_factor[..., :, None] * c_factor[..., None, :]) * g32
      else:
        full = ema(full, u).astype(full.dtype)
        scaled = jax.lax.rsqrt(full) * g32
      out.append(scaled.astype(g.dtype))
      new_rows.append(row)
      new_cols.append(col)
      new_fulls.append(full)

    new_state = ScaleByFactoredRmsHfState(
        count=t,
        v_row=treedef.unflatten(new_rows),
        v_col=treedef.unflatten(new_cols),
        v=treedef.unflatten(new_fulls),
    )
    return treedef.unflatten(out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _rescaled_rms(u: jax.Array, rms: jax.Array) -> jax.Array:
  """``rms`` where finite, else the RMS of ``u`` computed on ``u / 2**k``."""
  axes = (-2, -1) if u.ndim >= 2 else None
  # |u| / 2**k <= 2**28, so squares and their sums over up to 2**(maxexp -
  # 56) entries stay finite; entries whose squares overflow are >= 2**(maxexp
  # / 2), so the ones that matter keep normal squares. Powers of two: exact.
  k = jnp.finfo(u.dtype).maxexp - 28
  finite = 2.0 ** k * jnp.sqrt(jnp.mean(jnp.square(u * 2.0 ** -k), axis=axes,
                                        keepdims=True))
  return jnp.where(jnp.isinf(rms), finite, rms)


def clip_by_matrix_rms(threshold: float = 1.0) -> optax.GradientTransformation:
  """Clips the RMS of each matrix of each leaf to at most ``threshold``.

  ``u <- u / max(1, RMS(u) / threshold)`` where the RMS is taken over the
  last two axes of leaves with two or more dimensions (each matrix of a
  stacked leaf separately) and over the whole leaf otherwise. On leaves of at
  most two dimensions this is ``optax.clip_by_block_rms``; it differs only in
  treating leading axes as a batch. The RMS is computed in float32.

  Args:
    threshold: the largest RMS an update matrix keeps; must be > 0.

  Returns:
    An ``optax.GradientTransformation`` with an empty state.

  References:
    Shazeer and Stern, 2018, arXiv 1804.04235, section 6 (update clipping).
  """
  check_number_in_range("threshold", threshold, low=0.0, low_inclusive=False)

  def clip(u):
    axes = (-2, -1) if u.ndim >= 2 else None
    u32 = u.astype(jnp.promote_types(u.dtype, jnp.float32))
    rms = jnp.sqrt(jnp.mean(jnp.square(u32), axis=axes, keepdims=True))
    # Finite entries whose squares overflow: the RMS of u / 2**k, times
    # 2**k, is finite (an Inf RMS would zero the matrix). Computed only then,
    # so that the ordinary program (and its rounding) stays as it was.
    rms = jax.lax.cond(jnp.any(jnp.isinf(rms)), _rescaled_rms,
                       lambda u32, rms: rms, u32, rms)
    return (u32 / jnp.maximum(1.0, rms / threshold)).astype(u.dtype)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(clip, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_adafactor(
    learning_rate: optax.ScalarOrSchedule,
    *,
    beta1: float | None = None,
    decay_rate: float = -0.8,
    eps: float = 1e-30,
    clip_threshold: float = 1.0,
) -> optax.GradientTransformation:
  """Hugging Face Adafactor's update, learning rate included, not negated.

  ``optax.chain(scale_by_factored_rms_hf(decay_rate, eps),
  clip_by_matrix_rms(clip_threshold), optax.scale_by_learning_rate(
  learning_rate, flip_sign=False), optax.ema(beta1, debias=False))``, the last
  only when ``beta1`` is given. The learning rate is part of it because the
  reference averages the *learning-rate-scaled* updates. Negate the result
  (and add any weight decay) to apply it, as ``galore_adafactor`` does.

  Args:
    learning_rate: a float or an optax schedule (the reference's ``lr`` with
      ``relative_step=False, scale_parameter=False``).
    beta1: first-moment decay, or ``None`` for none (the default).
    decay_rate: exponent of the second-moment decay, ``beta2_t = 1 - t **
      decay_rate``.
    eps: added to the squared gradient (the reference's ``eps[0]``).
    clip_threshold: largest RMS of each update matrix.

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Shazeer and Stern, 2018, arXiv 1804.04235; Hugging Face ``transformers``
    ``optimization.Adafactor``.
  """
  if beta1 is not None:
    check_number_in_range("beta1", beta1, low=0.0, high=1.0,
                          high_inclusive=False)
  check_learning_rate(learning_rate)
  check_number_in_range("clip_threshold", clip_threshold, low=0.0,
                        low_inclusive=False)
  parts = [
      scale_by_factored_rms_hf(decay_rate, eps),
      clip_by_matrix_rms(clip_threshold),
      optax.scale_by_learning_rate(learning_rate, flip_sign=False),
  ]
  if beta1 is not None:
    parts.append(optax.ema(beta1, debias=False))
  return optax.chain(*parts)
