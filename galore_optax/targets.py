"""Target selection by module name, with Hugging Face's semantics.

A leaf's name is the dotted path of its pytree keys, e.g.
``model.layers.0.self_attn.q_proj.kernel``. Its *module name* is the name
without its parameter key, the last key when it is one of Flax's parameter
names (``PARAMETER_KEYS``: ``kernel``, ``bias``, ``embedding``, ``scale``):
``model.layers.0.self_attn.q_proj``. That is what Hugging Face's
``optim_target_modules`` is matched against (``named_modules()``), and what
``target_modules`` is matched against here. A leaf whose last key is not a
parameter name (``{"w": w}``, as in optax-style trees) is a *bare matrix*:
it is its own module, named by its whole path.

Like Hugging Face, which projects only ``nn.Linear`` weights, only *linear
weights* can be targets: leaves with two or more dimensions whose last key
is ``kernel`` (the kernel of a Flax ``Dense``/``nnx.Linear``, its stacked
``(L, m, n)`` form under ``nn.scan``/``nnx.scan``, or a ``DenseGeneral``/
``Einsum`` kernel, viewed as matrices through ``matrix_axes``), and bare
matrices. ``any_matrix=True`` lets a spec also select the other leaves with
two or more dimensions that it matches (embedding tables, ...).

A spec (``target_modules``) is:

* a string: a regular expression that must match the whole module name
  (``re.fullmatch``), so ``"attn"`` matches nothing and ``r".*attn.*"``
  matches attention layers; ``"all-linear"`` (or ``"all_linear"``) selects
  every linear weight, the output head included;
* a list of strings: an entry matches when it equals the module name, is a
  substring of it, or fully matches it as a regex (``["attn", "mlp"]``);
* ``None`` (not a Hugging Face value, where it is an error): every leaf with
  two or more dimensions, whatever its name.

Anything else (a tuple, a number, a list holding a non-string) raises a
``TypeError``, as in Hugging Face, and a selection that matches no eligible
leaf raises a ``ValueError`` ("No target modules found").

Differences from Hugging Face that remain: ``None`` and bare matrices (no
counterpart there); Flax ``Conv`` kernels are ``kernel`` leaves and can be
selected (Hugging Face skips ``nn.Conv*``, and GPT-2's ``Conv1D`` layers,
which Flax models write as ``Dense``); a spec that matches non-linear
modules is not logged as "matched but ignored", but the error for an empty
selection names them; a malformed regex or an empty list raises
``ValueError`` when the optimizer is built rather than at the first match;
a tied output head has no leaf in Flax, so ``["lm_head"]`` raises where
Hugging Face selects the module and then projects no parameter; a layer
stacked as one ``(L, m, n)`` leaf has one module name for all its layers,
so ``"layers.0"`` cannot select a single layer of a stack.

References:
  Hugging Face ``transformers``: ``TrainingArguments.optim_target_modules``,
  ``trainer_utils.check_target_module_exists`` and the Trainer's low-rank
  optimizer setup.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Union

import jax
import optax

TargetModules = Union[None, str, list[str]]

GALORE_LABEL = "galore"
FULL_RANK_LABEL = "full_rank"

# Flax's names of module parameters; any other last key is a bare matrix.
PARAMETER_KEYS = ("kernel", "bias", "embedding", "scale")
LINEAR_KEY = "kernel"


class TargetModulesTypeError(TypeError, ValueError):
  """A ``target_modules`` of the wrong type (Hugging Face: ``TypeError``).

  Also a ``ValueError``, as every other malformed spec, so that one
  ``except ValueError`` catches them all.
  """


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


def module_name(name: str) -> str:
  """The module a leaf belongs to: its name less a Flax parameter key.

  Args:
    name: a dotted leaf name (``path_to_name``).

  Returns:
    ``"a.b"`` for ``"a.b.kernel"`` (any of ``PARAMETER_KEYS``); the name
    itself for a bare matrix such as ``"a.w"``.
  """
  parent, _, key = name.rpartition(".")
  return parent if key in PARAMETER_KEYS else name


def is_linear_weight(name: str, leaf: Any) -> bool:
  """Whether a leaf can be a target by default (see the module docstring).

  Args:
    name: its dotted name.
    leaf: the leaf (anything with ``ndim``).

  Returns:
    True for a leaf with two or more dimensions whose last key is
    ``kernel`` or is not one of ``PARAMETER_KEYS`` (a bare matrix).
  """
  key = name.rpartition(".")[2]
  return leaf.ndim >= 2 and (key == LINEAR_KEY or key not in PARAMETER_KEYS)


def _compile(pattern: str, what: str) -> re.Pattern[str]:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{what} {pattern!r} is not a valid regular expression: "
                     f"{e}.") from None


def _is_all_linear(target_modules: TargetModules) -> bool:
  return (isinstance(target_modules, str) and
          target_modules.replace("_", "-") == "all-linear")


def _string_matcher(target_modules: TargetModules) -> Callable[[str], bool]:
  """Hugging Face's ``check_target_module_exists`` on one string, checked."""
  if target_modules is None or _is_all_linear(target_modules):
    return lambda text: True
  if isinstance(target_modules, str):
    regex = _compile(target_modules, "target_modules")
    return lambda text: regex.fullmatch(text) is not None
  if not isinstance(target_modules, list) or not all(
      isinstance(t, str) for t in target_modules):
    raise TargetModulesTypeError(
        "target_modules must be None, a regex string, 'all-linear' or a "
        f"list of strings (as Hugging Face's optim_target_modules), got "
        f"{target_modules!r}.")
  if not target_modules:
    raise ValueError("target_modules is an empty list: it selects nothing.")
  entries = [(t, _compile(t, "target_modules entry")) for t in target_modules]
  # Hugging Face's order: equal, substring, full regex match.
  return lambda text: any(t == text or t in text or regex.fullmatch(text)
                          for t, regex in entries)


def make_matcher(target_modules: TargetModules) -> Callable[[str], bool]:
  """Returns ``leaf name -> bool``: does the spec match the leaf's module?

  Whether the leaf can be a target at all (``is_linear_weight``) is
  ``target_mask``'s business; ``"all-linear"`` and ``None`` match every name.

  Args:
    target_modules: ``None``, a regex string, ``"all-linear"`` or a list of
      names/substrings/regexes; see the module docstring.

  Returns:
    A predicate on dotted leaf names, applied to their ``module_name``.

  Raises:
    TargetModulesTypeError: (a ``TypeError``) for a spec that is not None,
      a string or a list of strings.
    ValueError: for an empty list or a malformed regex.
  """
  matches = _string_matcher(target_modules)
  return lambda name: matches(module_name(name))


def _matched_detail(what: str, matched: list[tuple[str, Any]]) -> str:
  """Says which ineligible leaves a spec matched, and why they are not."""
  vectors = [n for n, leaf in matched if leaf.ndim < 2]
  others = [n for n, leaf in matched if leaf.ndim >= 2]
  if not others:
    return (f" {what} matched only leaves with fewer than two dimensions, "
            f"which cannot be projected: {vectors[:5]}.")
  return (f" {what} matched leaves that are not linear weights (pass "
          f"any_matrix=True to project matrices): {others[:5]}"
          f"{f' and vectors {vectors[:5]}' if vectors else ''}.")


def _no_target_error(target_modules: TargetModules, any_matrix: bool,
                     names: list[str], leaves: list[Any]) -> ValueError:
  """Hugging Face's "no target modules found", with what did match."""
  by_module = make_matcher(target_modules)
  by_leaf_name = _string_matcher(target_modules)
  named = list(zip(names, leaves))
  matched = [(n, leaf) for n, leaf in named if by_module(n)]
  detail = _matched_detail("It", matched) if matched else ""
  near = [(n, leaf) for n, leaf in named if by_leaf_name(n)]
  if near and not matched:
    detail += (" Specs match module names, which leave out parameter keys "
               "such as 'kernel' or 'bias'; on whole leaf names it ")
    if all(leaf.ndim < 2 for _, leaf in near):
      detail += ("matched only leaves with fewer than two dimensions: "
                 f"{[n for n, _ in near][:5]}.")
    else:
      detail += f"would match {[n for n, _ in near][:5]}."
  linear = [n for n, leaf in named if is_linear_weight(n, leaf)]
  eligible = "any matrix" if any_matrix else (
      "a linear weight: a kernel or a bare matrix")
  return ValueError(
      f"No target modules found: target_modules={target_modules!r} matches "
      f"no parameter with two or more dimensions that can be projected "
      f"({eligible}).{detail} Some linear weights: {linear[:10]}"
      f"{' ...' if len(linear) > 10 else ''}. A single string is a regex "
      "that must match the whole module name (use r'.*attn.*' or ['attn']).")


def target_mask(params: optax.Params,
                target_modules: TargetModules = None,
                *,
                any_matrix: bool = False) -> optax.Params:
  """Boolean tree: which leaves are GaLore targets.

  Args:
    params: a parameter (or gradient) tree; arrays or ``ShapeDtypeStruct`` objects.
    target_modules: the selection; see the module docstring.
    any_matrix: also select matched leaves with two or more dimensions that
      are not linear weights (embedding tables, ...). ``"all-linear"`` and
      ``None`` ignore it.

  Returns:
    A tree of Python bools with ``params``' structure.

  Raises:
    TargetModulesTypeError: (a ``TypeError``) for a spec of the wrong type.
    ValueError: if the selection matches no eligible leaf.
  """
  matcher = make_matcher(target_modules)
  if target_modules is None:
    eligible = lambda name, leaf: leaf.ndim >= 2
  elif any_matrix and not _is_all_linear(target_modules):
    eligible = lambda name, leaf: leaf.ndim >= 2 and matcher(name)
  else:
    eligible = lambda name, leaf: is_linear_weight(name, leaf) and matcher(
        name)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [path_to_name(path) for path, _ in flat]
  leaves = [leaf for _, leaf in flat]
  mask = [eligible(name, leaf) for name, leaf in zip(names, leaves)]
  if not any(mask):
    raise _no_target_error(target_modules, any_matrix, names, leaves)
  return jax.tree_util.tree_unflatten(treedef, mask)


def galore_labels(
    target_modules: TargetModules = None,
    *,
    any_matrix: bool = False,
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
    any_matrix: also select matched non-linear leaves with two or more
      dimensions (see ``target_mask``).
    target_label: label of the selected leaves.
    other_label: label of all other leaves.

  Returns:
    A function from a parameter tree to a tree of labels.
  """
  make_matcher(target_modules)  # validate at construction time

  def labels(params: optax.Params) -> optax.Params:
    return jax.tree.map(lambda t: target_label if t else other_label,
                        target_mask(params, target_modules,
                                    any_matrix=any_matrix))

  return labels
