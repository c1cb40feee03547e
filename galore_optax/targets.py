"""Target selection by parameter name, with Hugging Face's semantics.

A leaf's name is the dotted path of its pytree keys, e.g.
``model.layers.0.self_attn.q_proj.kernel``; its module name drops the last
key (``model.layers.0.self_attn.q_proj``), which is what Hugging Face's
``optim_target_modules`` is matched against. A spec matches a leaf when it
matches either name:

* ``None``: every leaf with two or more dimensions;
* a string: a regular expression that must match the whole name
  (``re.fullmatch``), so ``"attn"`` matches nothing and ``r".*attn.*"``
  matches attention layers; ``"all-linear"`` selects every dense kernel
  (leaves whose last key is ``kernel``);
* a list of strings: an entry matches when it equals the name, is a
  substring of it, or fully matches it as a regex (``["attn", "mlp"]``).

Only leaves with two or more dimensions can be targets: matched 1-D leaves
(biases, norms) are left to the full-rank optimizer. A selection that
matches no such leaf raises a ``ValueError`` listing some available names.

References:
  Hugging Face ``transformers`` ``TrainingArguments.optim_target_modules``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Union

import jax
import optax

TargetModules = Union[None, str, Sequence[str]]

GALORE_LABEL = "galore"
FULL_RANK_LABEL = "full_rank"


def path_to_name(path: Sequence[Any]) -> str:
  """Joins pytree keys into a dotted name; drops Flax NNX's ``.value``.

  Args:
    path: a key path, as ``jax.tree_util.tree_flatten_with_path`` gives.

  Returns:
    The dotted name, e.g. ``model.layers.0.self_attn.q_proj.kernel``.
  """
  parts = []
  for i, key in enumerate(path):
    if isinstance(key, jax.tree_util.GetAttrKey):
      if key.name == "value" and i == len(path) - 1:
        continue  # an nnx.Variable's payload, not part of the module name
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      parts.append(str(key.key))
    else:
      parts.append(str(key))
  return ".".join(parts)


def _compile(pattern: str, what: str) -> re.Pattern[str]:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{what} {pattern!r} is not a valid regular expression: "
                     f"{e}.") from None


def _is_all_linear(spec: str) -> bool:
  return spec.replace("_", "-") == "all-linear"


def make_matcher(target_modules: TargetModules) -> Callable[[str], bool]:
  """Returns ``name -> bool`` for a target spec (names: full leaf paths).

  Args:
    target_modules: ``None``, a regex string, ``"all-linear"`` or a list of
      names/substrings/regexes; see the module docstring.

  Returns:
    A predicate on dotted leaf names.
  """
  if target_modules is None:
    return lambda name: True
  if isinstance(target_modules, str):
    if _is_all_linear(target_modules):
      return lambda name: name.rsplit(".", 1)[-1] == "kernel"
    regex = _compile(target_modules, "target_modules")
    return lambda name: any(
        regex.fullmatch(n) for n in (name, name.rsplit(".", 1)[0]))
  if not isinstance(target_modules, Sequence) or not target_modules or not all(
      isinstance(t, str) for t in target_modules):
    raise ValueError(
        "target_modules must be None, a regex string, 'all-linear' or a "
        f"non-empty list of strings, got {target_modules!r}.")
  entries = [(t, _compile(t, "target_modules entry")) for t in target_modules]

  def matches(name: str) -> bool:
    for n in (name, name.rsplit(".", 1)[0]):
      for text, regex in entries:
        if text == n or text in n or regex.fullmatch(n):
          return True
    return False

  return matches


def target_mask(params: optax.Params,
                target_modules: TargetModules = None) -> optax.Params:
  """Boolean tree: which leaves are GaLore targets.

  Args:
    params: a parameter (or gradient) tree; arrays or ``ShapeDtypeStruct`` objects.
    target_modules: the selection; see the module docstring.

  Returns:
    A tree of Python bools with ``params``' structure.

  Raises:
    ValueError: if the selection matches no leaf with two or more dimensions.
  """
  matcher = make_matcher(target_modules)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [path_to_name(path) for path, _ in leaves]
  mask = [
      leaf.ndim >= 2 and matcher(name)
      for name, (_, leaf) in zip(names, leaves)
  ]
  if not any(mask):
    matrices = [n for n, (_, leaf) in zip(names, leaves) if leaf.ndim >= 2]
    matched_1d = [n for n, (_, leaf) in zip(names, leaves)
                  if leaf.ndim < 2 and matcher(n)]
    detail = (f" It matched only leaves with fewer than two dimensions, which "
              f"cannot be projected: {matched_1d[:5]}." if matched_1d else "")
    raise ValueError(
        f"target_modules={target_modules!r} matches no parameter with two or "
        f"more dimensions.{detail} Some available names: {matrices[:10]}"
        f"{' ...' if len(matrices) > 10 else ''}. A single string is a regex "
        "that must match the whole name (use r'.*attn.*' or ['attn']).")
  return jax.tree_util.tree_unflatten(treedef, mask)


def galore_labels(
    target_modules: TargetModules = None,
    *,
    target_label: str = GALORE_LABEL,
    other_label: str = FULL_RANK_LABEL,
) -> Callable[[optax.Params], optax.Params]:
  """Label function for ``optax.partition``: targets vs everything else.

  Example::

    from galore_optax import galore_project

    tx = optax.partition(
        {"galore": galore_project(optax.scale_by_adam()),
         "full_rank": optax.scale_by_adam()},
        galore_labels(["attn", "mlp"]))

  Args:
    target_modules: the selection; see the module docstring. Checked here,
      so a malformed spec fails when the optimizer is built.
    target_label: label of the selected leaves.
    other_label: label of all other leaves.

  Returns:
    A function from a parameter tree to a tree of labels.
  """
  make_matcher(target_modules)  # validate at construction time

  def labels(params: optax.Params) -> optax.Params:
    return jax.tree.map(lambda t: target_label if t else other_label,
                        target_mask(params, target_modules))

  return labels
