"""Projection math: which side a matrix is projected on, and its projectors.

A gradient leaf of shape ``(*batch, m, n)`` is a batch of ``m x n`` matrices.
Following ``galore_torch``'s ``GaLoreProjector``, each matrix ``G`` is
projected onto the top-``r`` singular subspace of a recent gradient:

* left side: ``P = U[:, :r]`` (``m x r``), low-rank gradient ``P^T G``
  (``r x n``), back-projection ``P N``;
* right side: ``Q = Vh[:r]`` (``r x n``), low-rank gradient ``G Q^T``
  (``m x r``), back-projection ``N Q``;
* both sides (``full``): ``P^T G Q^T`` (``r x r``), back-projection ``P N Q``.

``proj_type`` picks the side(s) exactly as the reference does: ``std`` uses the
right factor when ``m >= n`` and the left one otherwise (the optimizer state
keeps the larger dimension), ``reverse_std`` the opposite, ``left``/``right``
always that side, ``full`` both. The effective rank is ``min(rank, m, n)``.

Singular vectors are defined up to sign, and LAPACK, cuSOLVER and a sharded
SVD may return different ones. Because optimizer moments are carried across
refreshes, that sign leaks into the trajectory, so we canonicalise it: every
singular vector is flipped so that its entry of largest magnitude is positive.
The reference keeps whatever sign its SVD returned.

References:
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
  Projection", ICML 2024, arXiv 2403.03507.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from galore_optax import reductions
from galore_optax import sharding

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
PROJECTOR_METHODS = ("svd", "randomized")


class Projector(NamedTuple):
  """Orthonormal factors of one leaf; an unused side is ``optax.MaskedNode``.

  Attributes:
    left: ``(*batch, m, r)`` factor ``P`` with orthonormal columns.
    right: ``(*batch, r, n)`` factor ``Q`` with orthonormal rows.
  """

  left: jax.Array | optax.MaskedNode
  right: jax.Array | optax.MaskedNode


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """Static projection plan of one leaf, derived from its shape.

  Attributes:
    shape: the leaf's shape, ``(*batch, m, n)``.
    use_left: project with the left factor ``P``.
    use_right: project with the right factor ``Q``.
    rank: effective rank, ``min(rank, m, n)``.
  """

  shape: tuple[int, ...]
  use_left: bool
  use_right: bool
  rank: int

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return self.shape[:-2]

  @property
  def m(self) -> int:
    return self.shape[-2]

  @property
  def n(self) -> int:
    return self.shape[-1]

  @property
  def lowrank_shape(self) -> tuple[int, ...]:
    rows = self.rank if self.use_left else self.m
    cols = self.rank if self.use_right else self.n
    return (*self.batch_shape, rows, cols)

  @property
  def left_shape(self) -> tuple[int, ...]:
    return (*self.batch_shape, self.m, self.rank)

  @property
  def right_shape(self) -> tuple[int, ...]:
    return (*self.batch_shape, self.rank, self.n)


def plan_leaf(shape: tuple[int, ...], rank: int, proj_type: str) -> LeafPlan:
  """Chooses the projection side(s) of a leaf as ``galore_torch`` does.

  Args:
    shape: the leaf's shape; the last two axes form the matrix.
    rank: requested rank (clipped to ``min(m, n)``).
    proj_type: one of ``PROJ_TYPES``.

  Returns:
    The leaf's static ``LeafPlan``.
  """
  if len(shape) < 2:
    raise ValueError(f"Only leaves with >= 2 dimensions are projected, got "
                     f"shape {shape}.")
  m, n = shape[-2], shape[-1]
  tall = m >= n
  if proj_type == "std":
    left, right = not tall, tall
  elif proj_type == "reverse_std":
    left, right = tall, not tall
  elif proj_type == "left":
    left, right = True, False
  elif proj_type == "right":
    left, right = False, True
  elif proj_type == "full":
    left, right = True, True
  else:
    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got "
                     f"{proj_type!r}.")
  return LeafPlan(tuple(shape), left, right, min(rank, m, n))


def lowrank_dtype(dtype: Any) -> jnp.dtype:
  """The dtype of a projected gradient (and the inner state) of a leaf.

  The leaf's own dtype, unless its range is narrower than float32's (e.g.
  float16), then float32: a projection sums a row or column of the gradient
  and can exceed float16's largest value (65504), and the projected matrix
  has entries near zero by construction (off its diagonal for ``full``),
  whose Adam second moment underflows to 0 in float16 while the first does
  not (an Inf update). The update is cast back to the leaf's dtype.

  Args:
    dtype: the leaf's dtype.

  Returns:
    ``dtype`` or ``float32``.
  """
  dtype = jnp.dtype(dtype)
  if (jnp.issubdtype(dtype, jnp.floating)
      and jnp.finfo(dtype).maxexp < jnp.finfo(jnp.float32).maxexp):
    return jnp.dtype(jnp.float32)
  return dtype


def lowrank_placeholder(leaf: jax.Array,
                        plan: LeafPlan | None) -> jax.Array:
  """What stands for a leaf where the inner transformation needs parameters.

  The inner transformation of a projection sees projected leaves at their
  low-rank shape: its ``init`` (and the search for its moments) gets zeros
  of that shape in their place, and the other leaves as they are.

  Args:
    leaf: a parameter (or gradient) leaf, as a matrix.
    plan: the leaf's plan, or None if it is not projected.

  Returns:
    ``zeros(plan.lowrank_shape, lowrank_dtype(leaf.dtype))``, or ``leaf``
    for None.
  """
  if plan is None:
    return leaf
  return jnp.zeros(plan.lowrank_shape, lowrank_dtype(leaf.dtype))


def _gathered(x: jax.Array) -> jax.Array:
  """Replicates ``x`` if it is explicitly sharded.

  Under ``Explicit`` mesh axes, ``svd`` and ``qr`` refuse matrices sharded on
  their matrix dimensions (``Auto`` axes gather implicitly). Only the exact
  SVD gathers a full gradient; the randomized method gathers ``m x k``
  blocks.
  """
  if sharding.is_explicitly_sharded(x):
    return jax.sharding.reshard(x, PartitionSpec())
  return x


@functools.lru_cache(maxsize=None)
def _dimension_numbers(subscripts: str, ndim: int):
  """``dot_general`` dimensions of a batched matrix product written as
  ``"...ab,...bc->...ac"`` (one contracted letter; the result keeps the
  first operand's free axis, then the second's)."""
  inputs, output = subscripts.replace("...", "").split("->")
  a, b = inputs.split(",")
  (k,) = set(a) & set(b)
  if output != a.replace(k, "") + b.replace(k, ""):
    raise ValueError(f"unsupported contraction {subscripts!r}")
  batch = tuple(range(ndim - 2))
  return (((ndim - 2 + a.index(k),), (ndim - 2 + b.index(k),)),
          (batch, batch))


def _contract(subscripts: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """A batched matrix product, written as an ``einsum`` subscript, that also
  works when a contracted axis is explicitly sharded.

  Explicit sharding cannot infer where a partial sum over a sharded axis
  should live, so the (small) result is asked for replicated.
  """
  # lax.dot_general, not jnp.einsum: this runs for every projected leaf on
  # every trace, and einsum's path search made up much of the tracing time.
  # Float32 products of any operand dtypes: a bf16 gradient goes in as it is,
  # so a backend may fuse the conversion (XLA:CPU still materialises it).
  if a.ndim != b.ndim:
    raise ValueError(f"operands of {subscripts!r} need equal batch "
                     f"dimensions, got shapes {a.shape} and {b.shape}")
  dims = _dimension_numbers(subscripts, a.ndim)
  out_sharding = (PartitionSpec() if sharding.is_explicitly_sharded(a) or
                  sharding.is_explicitly_sharded(b) else None)
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32,
                             out_sharding=out_sharding)


def _eye_columns(rows: int, cols: int, batch_shape: tuple[int, ...]):
  eye = jnp.eye(rows, cols, dtype=jnp.float32)
  return jnp.broadcast_to(eye, (*batch_shape, rows, cols))


def initial_projector(plan: LeafPlan) -> Projector:
  """A valid orthonormal projector used before the first refresh.

  It is replaced at the first update; it only matters if that update's
  gradient is not finite, in which case the refresh is skipped and this
  placeholder (the first ``r`` coordinate axes) stays in use.

  Args:
    plan: the leaf's plan.

  Returns:
    A float32 ``Projector``.
  """
  left = (_eye_columns(plan.m, plan.rank, plan.batch_shape)
          if plan.use_left else optax.MaskedNode())
  right = (jnp.swapaxes(_eye_columns(plan.n, plan.rank, plan.batch_shape),
                        -1, -2)
           if plan.use_right else optax.MaskedNode())
  return Projector(left, right)


def canonicalize_column_signs(u: jax.Array) -> jax.Array:
  """Flips each column so that its largest-magnitude entry is positive.

  Of two entries of equal largest magnitude and opposite signs, the positive
  one counts (the column is not flipped).

  Args:
    u: ``(..., m, r)`` singular vectors as columns.

  Returns:
    ``u`` with every column's sign canonical.
  """
  # The largest-magnitude entry is negative iff max + min < 0 (exact in
  # floating point by Sterbenz's lemma where it matters). One max-and-min
  # reduction compiles several times faster on XLA:CPU than argmax + gather.
  col_max, col_min = reductions.max_and_min(u, axis=-2)
  flip = (col_max + col_min < 0)[..., None, :]
  return u * jnp.where(flip, -1, 1).astype(u.dtype)


def _svd_factors(g: jax.Array, plan: LeafPlan) -> tuple[Projector, jax.Array]:
  """Exact top-r singular vectors from a float32 thin SVD, and per matrix
  whether the SVD succeeded (a failed one returns NaN singular values)."""
  # The SVD of G^T is (V, S, U^T): a wide matrix is decomposed as its
  # transpose. XLA:CPU's LAPACK SVD (column-major gesdd) reduces a tall
  # matrix by a QR and a wide one by a slower LQ: 1.25-1.5x the time for
  # 2048 x 5461 against 5461 x 2048 (cuSOLVER's wrapper transposes wide
  # matrices itself).
  wide = plan.m < plan.n
  a = jnp.swapaxes(g, -1, -2) if wide else g
  u, s, vh = jnp.linalg.svd(_gathered(a), full_matrices=False)
  if wide:
    u, vh = jnp.swapaxes(vh, -1, -2), jnp.swapaxes(u, -1, -2)
  r = plan.rank
  left = (canonicalize_column_signs(u[..., :, :r])
          if plan.use_left else optax.MaskedNode())
  right = (jnp.swapaxes(
      canonicalize_column_signs(jnp.swapaxes(vh[..., :r, :], -1, -2)), -1, -2)
           if plan.use_right else optax.MaskedNode())
  # A failed SVD returns all-NaN outputs (JAX's lowering), so its largest
  # singular value tells; of a finite input it is finite.
  return Projector(left, right), jnp.isfinite(s[..., 0])


def _inverse_cholesky_factor(gram: jax.Array) -> jax.Array:
  """``L^-1`` for the Cholesky factor ``L L^T = gram`` (NaN where ``gram``
  is not numerically positive definite: JAX's lowering).

  Applying the inverse by a product is faster on XLA:CPU than a triangular
  solve with the tall block (LAPACK's trsm runs on one thread, in
  column-major layout, with copies either side).
  """
  lower = jnp.linalg.cholesky(gram)
  eye = jnp.broadcast_to(jnp.eye(gram.shape[-1], dtype=gram.dtype),
                         gram.shape)
  return jax.lax.linalg.triangular_solve(lower, eye, left_side=True,
                                         lower=True)


def _cholesky_qr(rows: jax.Array,
                 dead: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One CholeskyQR pass on ``(*batch, k, m)`` rows: ``L^-1 rows`` with
  ``L L^T = rows rows^T``, and ``rows rows^T``.

  A Gram matrix, a small Cholesky factorisation and a product instead of a
  Householder QR (a LAPACK call that took 4x as long on XLA:CPU for a
  2048 x 520 block with one LAPACK thread, 17x with two on a loaded
  machine). The result is orthonormal to about ``eps * cond(rows)**2``,
  and NaN where the Gram matrix is not numerically positive definite. Dead
  (zero) rows, marked 1.0 in ``dead``, stay zero.
  """
  gram = _contract("...km,...lm->...kl", rows, rows)
  factor = _inverse_cholesky_factor(gram + _diagonal(dead))
  return _contract("...kl,...lm->...km", factor, rows), gram


def _diagonal(d: jax.Array) -> jax.Array:
  """``(*batch, k)`` -> ``(*batch, k, k)`` diagonal matrices."""
  return d[..., None] * jnp.eye(d.shape[-1], dtype=d.dtype)


def _row_norms(x: jax.Array) -> jax.Array:
  """The Euclidean norms of ``x``'s rows, ``(*batch, k)``."""
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=-1))


def _starting_block(prev: jax.Array,
                    sketch: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The randomized method's starting block: ``prev`` and the sketch's part
  outside its span, as rows.

  Args:
    prev: ``(*batch, r, m)`` previous basis (rows), orthonormal up to its
      storage (float32, bfloat16 or int8) rounding.
    sketch: ``(*batch, p, m)`` random samples of the matrix's range (rows).

  Returns:
    ``(*batch, r + p, m)``: ``prev``, then orthonormal rows orthogonal to it
    spanning the rest of the sketch's span, and zero (dead) rows for its
    dimensions already in ``prev``'s span; and the ``(*batch, r + p)``
    float32 mask of the dead rows.
  """
  live_prev = jnp.zeros(prev.shape[:-1], jnp.float32)
  if not sketch.shape[-2]:
    return prev, live_prev
  rest, norms = sketch, [_row_norms(sketch)]
  for _ in range(2):  # classical Gram-Schmidt twice: orthogonal to rounding
    rest -= _contract("...pr,...rm->...pm",
                      _contract("...pm,...rm->...pr", rest, prev), prev)
    norms.append(_row_norms(rest))
  # A row that the second pass shrinks by more than 16x was in prev's span
  # already: what is left is rounding noise, not orthogonal to it.
  rest *= (norms[2] >= norms[1] / 16)[..., None]
  # The rest's span by the eigenvectors of its p x p Gram matrix, keeping
  # those above 2**-10 of the largest eigenvalue (the others are rounding
  # noise or too inaccurate: their directions are orthogonal only to about
  # eps times that ratio).
  lengths, vectors = jnp.linalg.eigh(_contract("...pm,...qm->...pq", rest,
                                               rest))
  live = lengths > 2.0**-10 * lengths[..., -1:]
  scale = jnp.where(live, jax.lax.rsqrt(jnp.where(live, lengths, 1)), 0)
  rest = _contract("...qp,...pm->...qm", jnp.swapaxes(vectors, -1, -2),
                   rest) * scale[..., None]
  rest, _ = _cholesky_qr(rest, (~live).astype(jnp.float32))
  return (jnp.concatenate([prev, rest], axis=-2),
          jnp.concatenate([live_prev, (~live).astype(jnp.float32)], axis=-1))


class _MatrixProducts(NamedTuple):
  """Products of row blocks with a matrix ``M`` (``m x n``) stored as ``g``:
  ``M = g``, or ``M = g^T`` for a right-side basis. Each is one
  ``dot_general`` on ``g`` as it is stored (no transposed copy of it).

  Attributes:
    times_m: ``(*batch, k, m)`` rows ``Q`` -> ``Q M``, ``(*batch, k, n)``.
    times_m_t: ``(*batch, k, n)`` rows ``B`` -> ``B M^T``,
      ``(*batch, k, m)``.
    sketch_rows: ``(*batch, n, p)`` test matrix ``W`` -> ``(M W)^T``,
      ``(*batch, p, m)``.
  """

  times_m: Callable[[jax.Array], jax.Array]
  times_m_t: Callable[[jax.Array], jax.Array]
  sketch_rows: Callable[[jax.Array], jax.Array]

  @classmethod
  def of(cls, g: jax.Array, transposed: bool) -> "_MatrixProducts":
    """The products with ``M = g`` (``g`` is ``(*batch, m, n)``), or with
    ``M = g^T`` if ``transposed`` (``g`` is ``(*batch, n, m)``)."""
    if transposed:  # g is (n, m)
      return cls(lambda q: _contract("...km,...nm->...kn", q, g),
                 lambda b: _contract("...kn,...nm->...km", b, g),
                 lambda w: _contract("...np,...nm->...pm", w, g))
    return cls(lambda q: _contract("...km,...mn->...kn", q, g),
               lambda b: _contract("...kn,...mn->...km", b, g),
               lambda w: _contract("...np,...mn->...pm", w, g))


def _rayleigh_ritz(gram: jax.Array, dead: jax.Array, count: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The top ``count`` Ritz pairs of ``M M^T`` on the span of rows ``Q``.

  The left singular vectors of ``B = Q M``, which order and rotate the
  block's directions, are the eigenvectors of the ``k x k`` matrix
  ``B B^T``. Its eigh is 5-15x faster on CPU than an SVD of the ``k x n``
  ``B`` (which also computes ``B``'s right vectors); squaring only blurs
  the order of directions below ~3e-4 of the top singular value, whose
  energy share is negligible.

  Args:
    gram: ``(*batch, k, k)``, ``Q M M^T Q^T``.
    dead: ``(*batch, k)``: 1.0 for ``Q``'s dead (zero) rows, 0.0 otherwise.
    count: number of pairs, at most ``k``.

  Returns:
    The rotation ``(*batch, count, k)`` whose product with ``Q`` gives the
    Ritz vectors as rows, by decreasing captured energy (the first ``j``
    span the best j-dimensional subspace of ``Q``'s span); their values
    ``(*batch, count)``; and their dead mask (dead pairs come last, their
    rotation rows zero).
  """
  # Dead rows get an eigenvalue below every live one (rounding puts none of
  # those below -trace): the last Ritz vectors, which no other uses.
  trace = jnp.trace(gram, axis1=-2, axis2=-1)[..., None]
  values, vectors = jnp.linalg.eigh(gram - _diagonal(dead * (trace + 1)))
  dead = jnp.sort(dead, axis=-1)[..., :count]
  # eigh sorts ascending.
  rotation = jnp.swapaxes(vectors[..., :, ::-1][..., :count], -1, -2)
  return (rotation * (1 - dead[..., None]), values[..., ::-1][..., :count],
          dead)


def _orthonormalize(y: jax.Array, dead: jax.Array,
                    fallback: Callable[[], jax.Array]) -> jax.Array:
  """Orthonormal rows spanning ``y``'s, in their order (dead ones stay
  zero); ``fallback()``'s rows for matrices whose ``y`` is too
  ill-conditioned.

  One CholeskyQR pass, whose result's Gram matrix certifies it (within
  2**-16 of the identity: orthonormal about as well as an SVD's vectors);
  where it does not, a second pass (CholeskyQR2, skipped where every matrix
  passed), which is orthonormal to rounding wherever the first result is
  well conditioned: within 1/2 of the identity in Frobenius norm.

  References:
    Fukaya, Nakatsukasa, Yanagisawa, Yamamoto, "CholeskyQR2: a simple and
    communication-avoiding algorithm for computing a tall-skinny QR
    factorization on a large-scale parallel system", ScalA 2014.
  """
  q, _ = _cholesky_qr(y, dead)
  gram = _contract("...km,...lm->...kl", q, q)
  deviation = gram - _diagonal(1 - dead)
  # NaN (a failed factorisation) compares false.
  certified = jnp.max(jnp.abs(deviation), axis=(-2, -1)) <= 2.0**-16

  def second_pass() -> jax.Array:
    again = _contract("...kl,...lm->...km",
                      _inverse_cholesky_factor(gram + _diagonal(dead)), q)
    usable = (jnp.sum(jnp.square(deviation), axis=(-2, -1)) <= 0.25) & jnp.all(
        jnp.isfinite(again), axis=(-2, -1))
    return jnp.where((certified | usable)[..., None, None],
                     jnp.where(certified[..., None, None], q, again),
                     fallback())

  return jax.lax.cond(jnp.all(certified), lambda: q, second_pass)


def _subspace_step(products: _MatrixProducts, q: jax.Array, dead: jax.Array,
                   count: int) -> tuple[jax.Array, jax.Array]:
  """One subspace iteration: a power step ``Z = Q M M^T``, then its top
  ``count`` directions, ordered by a Rayleigh-Ritz step on ``Q``.

  With the Ritz pairs ``(x, value)`` of ``Q`` (rows ``x = R Q``), each
  ``x M M^T / value = R Z / value`` is ``x`` plus its residual over its
  value: unit rows, nearly orthogonal once the block has converged, so
  CholeskyQR orthonormalises them. The Ritz step's matrix is
  ``Q Z^T = (Q M)(Q M)^T``, a ``k x k`` product with the ``m``-long rows
  (not the ``n``-long ``Q M``), and the rotation is applied to ``Z``: two
  ``m``-long products less than rotating ``Q`` and ``Q M`` first. Where a
  value is below ``2**-20`` (1e-6) of the largest, ``x M`` is mostly
  rounding noise (or ``x`` is outside ``M``'s range) and ``x`` itself is
  kept.

  Args:
    products: the matrix's products.
    q: ``(*batch, k, m)`` orthonormal or dead (zero) rows.
    dead: ``(*batch, k)`` dead mask of ``q``.
    count: rows to return, at most ``k``.

  Returns:
    ``(*batch, count, m)`` orthonormal or dead rows, by decreasing energy,
    and their dead mask.
  """
  z = products.times_m_t(products.times_m(q))
  rotation, values, dead = _rayleigh_ritz(
      _contract("...km,...lm->...kl", q, z), dead, count)
  reliable = values > 2.0**-20 * values[..., :1]
  scale = jnp.where(reliable, 1 / jnp.where(reliable, values, 1), 0)
  stepped = _contract("...jk,...km->...jm", rotation * scale[..., None], z)
  ritz = lambda: _contract("...jk,...km->...jm", rotation, q)
  stepped = jax.lax.cond(
      jnp.all(reliable), lambda: stepped,
      lambda: jnp.where(reliable[..., None], stepped, ritz()))
  return _orthonormalize(stepped, dead, ritz), dead


def _top_subspace_rows(products: _MatrixProducts, prev: jax.Array,
                       sketch: jax.Array, rank: int,
                       n_iter: int) -> tuple[jax.Array, jax.Array]:
  """Top-``rank`` left singular vectors of ``M``, as rows, by subspace
  iteration.

  The bases are rows (``k x m``), not columns: XLA:CPU's products with a
  thin block ran 8-27% faster with the thin dimension first, and a right
  projector is stored as rows already.

  Args:
    products: the matrix's products.
    prev: ``(*batch, rank, m)`` previous basis (the warm start).
    sketch: ``(*batch, p, m)`` random samples of ``M``'s range (``M`` times
      a test matrix, as rows: the oversampling).
    rank: number of singular vectors to return.
    n_iter: subspace iterations (``_subspace_step``), each two products
      with ``M``. With 0, the result is a Rayleigh-Ritz step's: the best
      rank-dimensional subspace of the start's span.

  Returns:
    ``(*batch, rank, m)`` orthonormal rows (signs not canonicalised), and
    per matrix whether they are finite (a factorisation failed otherwise).
  """
  q, dead = _starting_block(prev.astype(jnp.float32), sketch)
  for i in range(n_iter):
    # The last step keeps only the top rank directions (the dead ones, at
    # most p, come last).
    q, dead = _subspace_step(products, q, dead,
                             rank if i == n_iter - 1 else q.shape[-2])
  if n_iter == 0:
    b = products.times_m(q)
    rotation = _rayleigh_ritz(_contract("...kn,...ln->...kl", b, b), dead,
                              rank)[0]
    q = _contract("...jk,...km->...jm", rotation, q)
  return q, jnp.all(jnp.isfinite(q), axis=(-2, -1))


def sketch_dims(plan: LeafPlan,
                oversample: int = 8) -> tuple[Any, Any]:
  """``(cols, extra)`` of the randomized method's test matrix per side.

  Args:
    plan: the leaf's plan.
    oversample: extra columns of the randomized range finder.

  Returns:
    ``(left, right)``: for each side in use, the test matrix's number of
    rows (the matrix's other dimension) and of random columns (the
    oversampling that fits); None for a side not in use.
  """

  def dims(rows: int, cols: int) -> tuple[int, int]:
    return cols, min(plan.rank + oversample, rows, cols) - plan.rank

  return (dims(plan.m, plan.n) if plan.use_left else None,
          dims(plan.n, plan.m) if plan.use_right else None)


def randomized_sketch(key: jax.Array, plan: LeafPlan,
                      oversample: int = 8) -> Projector:
  """Standard-normal test matrices of the randomized method for one leaf.

  Args:
    key: PRNG key.
    plan: the leaf's plan.
    oversample: extra columns of the randomized range finder.

  Returns:
    A ``Projector`` holding, per side in use, a float32 ``(*batch, cols,
    extra)`` array (see ``sketch_dims``); ``optax.MaskedNode()`` otherwise.
  """
  keys = jax.random.split(key)
  return Projector(*(
      optax.MaskedNode() if dims is None else jax.random.normal(
          side_key, (*plan.batch_shape, *dims), jnp.float32)
      for side_key, dims in zip(keys, sketch_dims(plan, oversample))))


def _randomized_factors(g: jax.Array, plan: LeafPlan, previous: Projector,
                        sketch: Projector,
                        n_iter: int) -> tuple[Projector, jax.Array]:
  """Warm-started randomized range finder for each side in use."""

  def side(transposed, prev_rows, omega):
    products = _MatrixProducts.of(g, transposed)
    # One test matrix may serve every matrix of a batch.
    omega = jnp.broadcast_to(omega, (*plan.batch_shape, *omega.shape[-2:]))
    # The previous basis is a good start: gradients' top subspaces drift
    # slowly, so a few power iterations from it converge.
    rows, ok = _top_subspace_rows(
        products, prev_rows, _gathered(products.sketch_rows(omega)),
        plan.rank, n_iter)
    return canonicalize_column_signs(jnp.swapaxes(rows, -1, -2)), ok

  ok = jnp.ones(plan.batch_shape, bool)
  left = right = optax.MaskedNode()
  if plan.use_left:
    left, ok_left = side(False, jnp.swapaxes(previous.left, -1, -2),
                         sketch.left)
    ok &= ok_left
  if plan.use_right:
    right_t, ok_right = side(True, previous.right, sketch.right)
    right = jnp.swapaxes(right_t, -1, -2)
    ok &= ok_right
  return Projector(left, right), ok



def _power_of_two(exponent: jax.Array) -> jax.Array:
  """``2.0 ** exponent`` in float32, for int32 exponents in [-126, 127]."""
  return jax.lax.bitcast_convert_type((exponent + 127) << 23, jnp.float32)


def _unit_peak(g: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each matrix of float32 ``g`` divided by its largest magnitude, and
  whether that is finite (the matrix is zeros where it is not).

  The division is ``(g * 2**k) / (peak * 2**k)`` with ``2**k`` the power of
  two that puts the peak in ``[1, 2)``, applied to the bits, exactly, before
  any float arithmetic: XLA:CPU flushes subnormal operands to zero, which
  made a subnormal gradient an all-zero one. The quotient equals ``g /
  peak`` wherever that is exact, so gradients without subnormal entries
  give the same bits as an unscaled division, and ``g`` and ``g * 2**j``
  give the same result (entries below ``2**-126`` of the peak excepted,
  which flush either way).
  """
  bits = jax.lax.bitcast_convert_type(g, jnp.int32)
  magnitude = bits & 0x7FFFFFFF  # orders |g| as floats do, NaN above inf
  peak = jnp.max(magnitude, axis=(-2, -1), keepdims=True)
  finite = peak < 0x7F800000
  # The peak's exponent: from its exponent field, or from the leading bit
  # of a subnormal's mantissa (worth 2**-149 per unit); 0 for all zeros.
  peak_exponent = jnp.where(peak >= 1 << 23, (peak >> 23) - 127,
                            jnp.where(peak > 0,
                                      31 - jax.lax.clz(peak) - 149, 0))
  k = jnp.clip(-peak_exponent, -127, 149)  # finite peaks need no clipping

  def scaled(bits):
    sign = bits & jnp.int32(-2**31)
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    # Normal: shift the exponent field (results below the normal range
    # would be flushed by the division anyway).
    shifted = exponent + k
    normal = jnp.where(shifted >= 1, sign | (shifted << 23) | mantissa, sign)
    # Subnormal: mantissa * 2**(k - 149), exact in two normal factors.
    sub = (mantissa.astype(jnp.float32) *
           _power_of_two(jnp.clip(k - 85, -126, 127)) * _power_of_two(-64))
    sub = jnp.where(k >= 0, sub, 0.0)
    sub = jax.lax.bitcast_convert_type(sub, jnp.int32) | sign
    return jax.lax.bitcast_convert_type(
        jnp.where(exponent > 0, normal, sub), jnp.float32)

  unit = scaled(bits) / jnp.where(peak > 0, scaled(peak), 1.0)
  return jnp.where(finite, unit, 0.0), finite


def _factors(grad: jax.Array, plan: LeafPlan, method: str,
             previous: Projector | None, sketch: Projector | None,
             n_iter: int) -> tuple[Projector, jax.Array]:
  """``compute_projector``'s factors and, per matrix, whether they are
  valid (finite gradient, decomposition succeeded)."""
  # Singular vectors do not depend on the matrix's scale; normalising keeps
  # huge (overflowing s**2) and subnormal gradients in float32's range. The
  # peak also tells (in the same pass) whether the gradient is finite; a
  # non-finite one is replaced by zeros so the decomposition never sees it.
  g, finite = _unit_peak(grad.astype(jnp.float32))
  if method == "svd":
    new, ok = _svd_factors(g, plan)
  elif method == "randomized":
    if previous is None or sketch is None:
      raise ValueError("method='randomized' needs previous and key (or "
                       "sketch).")
    new, ok = _randomized_factors(g, plan, previous, sketch, n_iter)
  else:
    raise ValueError(f"projector method must be one of {PROJECTOR_METHODS}, "
                     f"got {method!r}.")
  return new, ok & finite[..., 0, 0]


def _sketch(method: str, plan: LeafPlan, key: jax.Array | None,
            sketch: Projector | None, oversample: int) -> Projector | None:
  """The randomized method's test matrices: given, or drawn from ``key``."""
  if method != "randomized" or sketch is not None or key is None:
    return sketch
  return randomized_sketch(key, plan, oversample)


def compute_projector(
    grad: jax.Array,
    plan: LeafPlan,
    *,
    method: str = "svd",
    previous: Projector | None = None,
    key: jax.Array | None = None,
    sketch: Projector | None = None,
    oversample: int = 8,
    n_iter: int = 1,
) -> Projector:
  """Computes a leaf's float32 projector from its gradient.

  Args:
    grad: the gradient, shape ``plan.shape``, any float dtype (it is upcast
      to float32 first, as the reference does).
    plan: the leaf's plan.
    method: ``"svd"`` (exact thin SVD, the reference) or ``"randomized"``
      (subspace iteration warm-started from ``previous``).
    previous: the current projector (float32), needed by ``"randomized"``.
    key: PRNG key for the oversampling columns of ``"randomized"``.
    sketch: those columns' test matrices themselves (see
      ``randomized_sketch``; each side's may omit the batch axes, to serve
      every matrix of the batch); drawn from ``key`` if None.
    oversample: extra columns of the randomized range finder (with ``key``).
    n_iter: iterations of ``"randomized"``, each a Rayleigh-Ritz step and a
      power step (two products with the gradient). One, from the previous
      projector, captured at least 0.9995 of the exact subspace's energy
      on LLaMA-1B gradients at rank 512 (at least 0.999 from the initial
      projector); flat spectra converge slower.

  Returns:
    A float32 ``Projector`` with orthonormal factors.
  """
  return _factors(grad, plan, method, previous,
                  _sketch(method, plan, key, sketch, oversample), n_iter)[0]


def refresh_projector(
    grad: jax.Array,
    plan: LeafPlan,
    previous: Projector,
    *,
    method: str = "svd",
    key: jax.Array | None = None,
    sketch: Projector | None = None,
    oversample: int = 8,
    n_iter: int = 1,
) -> Projector:
  """``compute_projector``, keeping ``previous`` where it cannot be trusted.

  Per matrix of the batch, the new factors replace ``previous`` only if the
  gradient is finite and the decomposition succeeded, so a non-finite
  gradient never reaches the projector.

  The result has ``previous``'s type, sharding included, so that it can
  take its place in a loop's carry or a ``cond``: under ``Explicit`` mesh
  axes, the per-matrix validity of a gradient sharded over a batch axis
  (e.g. the layer axis of a stacked leaf) is sharded like it, and would
  otherwise shard the factors that ``previous`` holds replicated.

  Args:
    grad: the gradient, shape ``plan.shape``, any float dtype.
    plan: the leaf's plan.
    previous: the current projector (float32 factors).
    method: as in ``compute_projector``.
    key: as in ``compute_projector``.
    sketch: as in ``compute_projector``.
    oversample: as in ``compute_projector``.
    n_iter: as in ``compute_projector``.

  Returns:
    A float32 ``Projector``.
  """
  new, ok = _factors(grad, plan, method, previous,
                     _sketch(method, plan, key, sketch, oversample), n_iter)
  return jax.tree.map(
      lambda a, b: sharding.with_sharding_of(
          jnp.where(ok[..., None, None], a, b.astype(a.dtype)), b),
      new, previous)


def project(grad: jax.Array, projector: Projector, plan: LeafPlan) -> jax.Array:
  """Projects a full gradient into the low-rank space, in float32.

  Args:
    grad: the ``(*batch, m, n)`` gradient.
    projector: float32 factors (``projector_storage.load``).
    plan: the leaf's ``LeafPlan``.

  Returns:
    The low-rank gradient, of shape ``plan.lowrank_shape``.
  """
  x = grad
  if plan.use_left:
    x = _contract("...mr,...mn->...rn", projector.left.astype(jnp.float32), x)
  if plan.use_right:
    x = _contract("...mn,...rn->...mr", x, projector.right.astype(jnp.float32))
  return x.astype(jnp.float32)


def project_back(lowrank: jax.Array, projector: Projector,
                 plan: LeafPlan) -> jax.Array:
  """Maps a low-rank update back to the leaf's shape, in float32.

  Args:
    lowrank: an update of shape ``plan.lowrank_shape``.
    projector: float32 factors (``projector_storage.load``).
    plan: the leaf's ``LeafPlan``.

  Returns:
    The ``(*batch, m, n)`` update.
  """
  x = lowrank.astype(jnp.float32)
  if plan.use_left:
    x = _contract("...mr,...rn->...mn", projector.left.astype(jnp.float32), x)
  if plan.use_right:
    x = _contract("...mr,...rn->...mn", x, projector.right.astype(jnp.float32))
  return x


def carry_moment(moment: jax.Array, old: Projector, new: Projector,
                 plan: LeafPlan, *, second: bool) -> jax.Array:
  """Re-expresses a low-rank optimizer moment in a refreshed subspace.

  A first moment ``M`` (left side) stands for ``P_old M`` in the full space;
  in the new basis that is ``P_new^T P_old M``, i.e. ``C M`` with the
  ``r x r`` overlap ``C = P_new^T P_old`` (right side: ``M D`` with
  ``D = Q_old Q_new^T``; both sides for ``full``). A second moment holds
  per-coordinate variances; treating the old coordinates as independent,
  the new ones are ``(C * C) v`` (``v (D * D)``), which stays non-negative.
  Directions of the old subspace outside the new one are dropped.

  Args:
    moment: ``(*batch, *lowrank)`` moment in the old basis.
    old: the previous projector (float32 factors).
    new: the refreshed projector (float32 factors).
    plan: the leaf's plan.
    second: whether ``moment`` is a non-negative second moment.

  Returns:
    The moment in the new basis, same shape and dtype.
  """
  x = moment.astype(jnp.float32)
  power = (lambda c: c * c) if second else (lambda c: c)
  if plan.use_left:
    c = _contract("...mr,...ms->...rs", new.left.astype(jnp.float32),
                  old.left.astype(jnp.float32))
    x = _contract("...rs,...sn->...rn", power(c), x)
  if plan.use_right:
    d = _contract("...sn,...rn->...sr", old.right.astype(jnp.float32),
                  new.right.astype(jnp.float32))
    x = _contract("...ms,...sr->...mr", x, power(d))
  return x.astype(moment.dtype)
