"""Static facts about the parameter tree of a per-layer step.

For each leaf: its dotted name, whether it is a ``per_layer`` stack (updated
one layer slice at a time) or updated in blocks of rows (``row_chunks``),
whether it is stored in int8, the shape of one *unit* (the leaf, one layer
slice or one row block, which has its own optimizer state), and the
abstract unpacked ``LeafState`` of a unit. A unit's optimizer state is
``tx.init`` of the whole tree with every other leaf an
``optax.MaskedNode()``, so name-based labels see the real paths.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from galore_optax import projection
from galore_optax import projector_storage
from galore_optax import targets
from galore_optax import weight_quantization
from galore_optax.layerwise import options as options_lib
from galore_optax.layerwise import packing
from galore_optax.transform import GaLoreState

# An anchor: (index of a leaf, its 1x..x1 placeholder's ShapeDtypeStruct).
Anchor = tuple[int, jax.ShapeDtypeStruct]


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static facts about one parameter tree; one entry per leaf.

  Attributes:
    treedef: the tree's structure (int8 leaves are single leaves).
    names: dotted leaf names (``galore_optax.path_to_name``).
    per_layer: whether a leaf is a ``per_layer`` stack.
    chunks: row blocks a leaf is updated in (1: updated whole).
    unit_avals: shape and dtype of a unit (the leaf, a layer slice or a row
      block; int8 leaves as dequantised).
    anchor: None, or the placeholder leaf that ``tx.init`` needs beside
      this one (label functions such as ``galore_labels`` refuse a tree
      without any GaLore target).
    specs: the abstract unpacked ``LeafState`` of a unit.
    lowrank: the ``projection.LeafPlan`` of a leaf accumulated in low rank
      (GaLore-projected, with accumulation), or None.
    fused: the ``projection.LeafPlan`` of a leaf whose low-rank gradient
      ``dense`` makes from the product's inputs (``fused=True``, a single
      GaLore-projected matrix), or None.
    quantized: whether a leaf is a ``weight_quantization.QuantizedWeight``.
    qindex: position among the int8 leaves (their rounding key), or None.
  """

  treedef: Any
  names: tuple[str, ...]
  per_layer: tuple[bool, ...]
  chunks: tuple[int, ...]
  unit_avals: tuple[jax.ShapeDtypeStruct, ...]
  anchor: tuple[Anchor | None, ...]
  specs: tuple[packing.LeafState, ...]
  lowrank: tuple[projection.LeafPlan | None, ...]
  fused: tuple[projection.LeafPlan | None, ...]
  quantized: tuple[bool, ...]
  qindex: tuple[int | None, ...]

  def single(self, i: int, x: Any, anchor_value: Any) -> Any:
    """The tree with ``x`` at leaf ``i`` and every other leaf masked.

    Args:
      i: a leaf index.
      x: the value for leaf ``i``.
      anchor_value: the value of leaf ``i``'s anchor, if it has one.

    Returns:
      A tree of the parameters' structure.
    """
    return single_tree(self.treedef, len(self.names), i, x, self.anchor[i],
                       anchor_value)

  def anchor_zeros(self, i: int) -> jax.Array | None:
    """Zeros for leaf ``i``'s anchor placeholder (None without one).

    Args:
      i: a leaf index.

    Returns:
      A small array of zeros, or None.
    """
    if self.anchor[i] is None:
      return None
    aval = self.anchor[i][1]
    return jnp.zeros(aval.shape, aval.dtype)


def single_tree(treedef: Any, num_leaves: int, i: int, x: Any,
                anchor: Anchor | None = None, anchor_value: Any = None) -> Any:
  """A tree of ``treedef`` holding ``x`` at leaf ``i``, other leaves masked.

  Args:
    treedef: the parameters' structure.
    num_leaves: its number of leaves.
    i: the leaf index.
    x: the value of leaf ``i``.
    anchor: None, or the anchor whose leaf gets ``anchor_value``.
    anchor_value: the anchor leaf's value.

  Returns:
    The tree, every other leaf ``optax.MaskedNode()``.
  """
  values = [optax.MaskedNode()] * num_leaves
  values[i] = x
  if anchor is not None:
    values[anchor[0]] = anchor_value
  return treedef.unflatten(values)


def galore_states(opt_state: Any) -> list[GaLoreState]:
  """Every ``GaLoreState`` inside an optimizer state tree.

  Args:
    opt_state: an optax state (or its abstract shapes).

  Returns:
    The GaLore states, in tree order.
  """
  is_galore = lambda x: isinstance(x, GaLoreState)
  return [x for x in jax.tree.leaves(opt_state, is_leaf=is_galore)
          if is_galore(x)]


class LayoutCache:
  """The ``Layout`` of each parameter tree a step has seen, built once each.

  Args:
    tx: the step's optimizer.
    options: the step's options.
  """

  def __init__(self, tx: optax.GradientTransformation,
               options: options_lib.StepOptions):
    self._tx = tx
    self._options = options
    self._layouts: dict[Any, Layout] = {}

  def __call__(self, params: Any) -> Layout:
    """The layout of ``params`` (arrays or abstract shapes).

    Args:
      params: the parameter tree.

    Returns:
      Its ``Layout``, cached by structure, shapes and dtypes.
    """
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=weight_quantization.is_quantized)
    key = (treedef, tuple((tuple(a.shape), jnp.dtype(a.dtype).name)
                          for _, x in paths_leaves
                          for a in jax.tree.leaves(x)))
    if key not in self._layouts:
      self._layouts[key] = build_layout(paths_leaves, treedef, self._tx,
                                        self._options)
    return self._layouts[key]


def build_layout(paths_leaves: list[tuple[Any, Any]], treedef: Any,
                 tx: optax.GradientTransformation,
                 options: options_lib.StepOptions) -> Layout:
  """The layout of a flattened parameter tree.

  Args:
    paths_leaves: ``(path, leaf)`` pairs, int8 leaves as single leaves.
    treedef: the tree's structure.
    tx: the step's optimizer.
    options: the step's options.

  Returns:
    The ``Layout``.

  Raises:
    ValueError: for duplicate names, non-floating parameters, leaves that
      cannot be ``per_layer`` or split into ``row_chunks``, and a
      ``per_layer`` that matches nothing.
  """
  names = [targets.path_to_name(p) for p, _ in paths_leaves]
  if len(set(names)) != len(names):
    dupes = sorted({n for n in names if names.count(n) > 1})
    raise ValueError(f"Leaf path names must be unique, got {dupes[:5]}.")
  per, chunks, units, quantized, qindex = _leaf_units(
      names, [x for _, x in paths_leaves], options)
  if options.per_layer is not None and not any(per):
    raise ValueError(
        f"per_layer={options.per_layer!r} matches no parameter. A string is "
        "a regex that must match the whole module name (use a list for "
        f"substrings); some names: {names[:10]}.")
  anchor, opt_specs = _optimizer_specs(treedef, units, tx)
  lowrank, specs = _leaf_states(names, units, chunks, opt_specs, options)
  fused = [_projected_plan(name, unit, spec)
           if options.fused and unit.ndim == 2 else None
           for name, unit, spec in zip(names, units, opt_specs)]
  return Layout(treedef, tuple(names), tuple(per), tuple(chunks),
                tuple(units), tuple(anchor), tuple(specs), tuple(lowrank),
                tuple(fused), tuple(quantized), tuple(qindex))


def _leaf_units(names: list[str], leaves: list[Any],
                options: options_lib.StepOptions) -> tuple[list, ...]:
  """Per leaf: per_layer, row chunks, unit aval, int8, int8 position."""
  per, chunks, units, quantized, qindex = [], [], [], [], []
  for name, x in zip(names, leaves):
    is_q = weight_quantization.is_quantized(x)
    quantized.append(is_q)
    qindex.append(sum(quantized) - 1 if is_q else None)
    if is_q:
      # The optimizer sees the dequantised weight.
      x = jax.ShapeDtypeStruct(x.codes.shape, options.weight_dtype)
    elif not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"Parameter {name!r} has dtype {x.dtype}; layer-wise "
                       "updates need floating-point parameters.")
    is_per = bool(options.is_per_layer(name))
    if is_per and len(x.shape) < 1:
      raise ValueError(f"per_layer leaf {name!r} has no leading layer axis.")
    if is_per and is_q:
      raise ValueError(
          f"per_layer leaf {name!r} is stored in int8; int8 weights are "
          "supported for unrolled layers (call_layer), dense and "
          "embedding_lookup, not for per_layer stacks.")
    nk = options.row_chunks(name)
    if nk > 1 and (is_per or len(x.shape) < 1 or x.shape[0] % nk):
      raise ValueError(
          f"row_chunks: leaf {name!r} of shape {tuple(x.shape)} cannot be "
          f"split into {nk} blocks of rows (per_layer leaves cannot be "
          "chunked; the first axis must be divisible).")
    per.append(is_per)
    chunks.append(nk)
    if is_per:
      shape = tuple(x.shape[1:])
    elif nk > 1:
      shape = (x.shape[0] // nk, *x.shape[1:])
    else:
      shape = tuple(x.shape)
    units.append(jax.ShapeDtypeStruct(shape, x.dtype))
  return per, chunks, units, quantized, qindex


def _optimizer_specs(treedef: Any, units: list[jax.ShapeDtypeStruct],
                     tx: optax.GradientTransformation
                     ) -> tuple[list[Anchor | None], list[Any]]:
  """Each unit's abstract ``tx`` state, and the anchors that needs."""
  n = len(units)
  anchors: list[Anchor | None] = [None] * n
  opt_specs: list[Any] = [None] * n
  errors = {}
  for i, u in enumerate(units):
    try:
      opt_specs[i] = jax.eval_shape(tx.init, single_tree(treedef, n, i, u))
    except ValueError as e:  # e.g. labels that need a target in the tree
      errors[i] = e
  if errors:
    # Label functions such as ``galore_labels`` refuse a tree without any
    # GaLore target. Give such leaves a 1x..x1 placeholder of a leaf that
    # initialises alone (so it is a target): its state is a few floats.
    candidates = [i for i, u in enumerate(units)
                  if i not in errors and len(u.shape) >= 2]
    if not candidates:
      raise next(iter(errors.values()))
    a = candidates[0]
    anchor = (a, jax.ShapeDtypeStruct((1,) * len(units[a].shape),
                                      units[a].dtype))
    for i, err in errors.items():
      anchors[i] = anchor
      try:
        opt_specs[i] = jax.eval_shape(
            lambda u, z, i=i: tx.init(single_tree(treedef, n, i, u, anchor,
                                                  z)), units[i], anchor[1])
      except ValueError:
        raise err from None
  return anchors, opt_specs


def _projected_plan(name: str, unit: jax.ShapeDtypeStruct,
                    opt_spec: Any) -> projection.LeafPlan | None:
  """The plan of a unit that one ``galore_project`` projects and whose
  update needs only the projected gradient, or None.

  Fira and APOLLO (a limiter state) use the full gradient too.
  """
  found = [s for s in galore_states(opt_spec) if name in s.projectors]
  if len(found) != 1 or name in found[0].limiter_norms:
    return None
  proj = found[0].projectors[name]
  use_left = not isinstance(proj.left, optax.MaskedNode)
  use_right = not isinstance(proj.right, optax.MaskedNode)
  rank = (projector_storage.factor_shape(proj.left)[-1] if use_left else
          projector_storage.factor_shape(proj.right)[-2])
  return projection.LeafPlan(tuple(unit.shape), use_left, use_right, rank)


def _leaf_states(names: list[str], units: list[jax.ShapeDtypeStruct],
                 chunks: list[int], opt_specs: list[Any],
                 options: options_lib.StepOptions
                 ) -> tuple[list[Any], list[packing.LeafState]]:
  """Each unit's low-rank accumulation plan and abstract ``LeafState``."""
  lowrank, specs = [], []
  for i, name in enumerate(names):
    if chunks[i] > 1 and any(name in s.projectors
                             for s in galore_states(opt_specs[i])):
      raise ValueError(
          f"row_chunks: {name!r} is projected by galore_project, whose "
          "update is not element-wise; it cannot be updated in row blocks.")
    plan = None
    if options.accumulate_steps > 1:
      plan = _projected_plan(name, units[i], opt_specs[i])
      acc_shape = plan.lowrank_shape if plan else units[i].shape
      acc = jax.ShapeDtypeStruct(acc_shape, options.accumulate_dtype)
      mini = jax.ShapeDtypeStruct((), jnp.int32)
    else:
      acc = mini = optax.MaskedNode()
    lowrank.append(plan)
    specs.append(packing.LeafState(opt_specs[i], acc, mini))
  return lowrank, specs
