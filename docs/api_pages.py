"""Writes the API reference pages, one per public name and submodule.

Run from ``conf.py`` on every build, so a name added to ``galore_optax``'s
``__all__`` or a new public submodule gets its page without anyone writing
it. The pages go to ``docs/api/`` (git-ignored); a file is rewritten only
when its text changes, so incremental builds stay incremental.

* ``api/galore_optax.<name>.rst`` for every non-module name in
  ``galore_optax.__all__``;
* ``api/galore_optax.<module>.rst`` for every public submodule (no ``_`` in
  its dotted name), with its docstring and its public members: its
  ``__all__``, or else the functions and classes defined in it. Members that
  ``galore_optax`` also exports link to their top-level page instead of
  being documented twice;
* ``api/index.rst`` with a summary table of both.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import pkgutil
import types
from typing import Any

import galore_optax

PACKAGE = "galore_optax"

# The sections of the API index, in order.
KIND_HEADINGS = {"function": "Functions", "class": "Classes",
                 "data": "Constants"}


def public_submodules() -> list[types.ModuleType]:
  """The submodules and subpackages of ``galore_optax`` without a ``_``.

  Returns:
    The modules, sorted by dotted name.
  """
  found = []
  for info in pkgutil.walk_packages(galore_optax.__path__, PACKAGE + "."):
    if not any(part.startswith("_") for part in info.name.split(".")):
      found.append(importlib.import_module(info.name))
  return sorted(found, key=lambda m: m.__name__)


def module_members(module: types.ModuleType) -> list[str]:
  """A module's public names: ``__all__``, else what it defines.

  Args:
    module: a ``galore_optax`` module.

  Returns:
    Names of functions and classes (and anything in ``__all__``), in the
    order of ``__all__`` or alphabetically.
  """
  exported = getattr(module, "__all__", None)
  if exported is not None:
    return list(exported)
  names = []
  for name, obj in vars(module).items():
    if name.startswith("_") or not (inspect.isfunction(obj)
                                    or inspect.isclass(obj)):
      continue
    if getattr(obj, "__module__", None) == module.__name__:
      names.append(name)
  return sorted(names)


def summary(obj: Any) -> str:
  """The first sentence of a docstring (its first paragraph), one line.

  Args:
    obj: any object.

  Returns:
    The summary line; for data without a docstring of its own (tuples of
    names), its value as a literal.
  """
  if not isinstance(obj, (types.ModuleType, type)) and not callable(obj):
    return f"``{obj!r}``"
  doc = inspect.getdoc(obj) or "(undocumented)"
  return " ".join(doc.split("\n\n", 1)[0].split())


def _kind(obj: Any) -> str:
  if inspect.isclass(obj):
    return "class"
  if callable(obj):
    return "function"
  return "data"


def _title(text: str) -> str:
  return f"{text}\n{'=' * len(text)}\n"


def _directive(kind: str, target: str) -> str:
  if kind == "class":
    return f".. autoclass:: {target}\n   :members:\n"
  if kind == "function":
    return f".. autofunction:: {target}\n"
  return f".. autodata:: {target}\n"


def home_module(name: str) -> str:
  """The public submodule that defines top-level name ``name``.

  Args:
    name: a non-module name of ``galore_optax.__all__``.

  Returns:
    The dotted module name (``galore_optax.aliases``), or ``""``.
  """
  obj = getattr(galore_optax, name)
  if callable(obj):
    parts = (getattr(obj, "__module__", None) or "").split(".")[:2]
    return ".".join(parts) if parts[0] == PACKAGE and len(parts) == 2 else ""
  for module in public_submodules():  # data: the module that holds it
    if module.__name__.count(".") == 1 and vars(module).get(name) is obj:
      return module.__name__
  return ""


def name_page(name: str) -> str:
  """The page of one non-module name of ``galore_optax.__all__``.

  Args:
    name: the name.

  Returns:
    reStructuredText.
  """
  kind = _kind(getattr(galore_optax, name))
  home = home_module(name)
  parts = [_title(name), f".. currentmodule:: {PACKAGE}\n",
           _directive(kind, name)]
  if home:
    parts.append(f"Defined in :mod:`{home}`.\n")
  return "\n".join(parts)


def _top_level_names() -> dict[int, str]:
  """``id(obj) -> name`` for the non-module names of ``__all__``."""
  return {id(getattr(galore_optax, n)): n for n in galore_optax.__all__
          if not inspect.ismodule(getattr(galore_optax, n))}


def module_page(module: types.ModuleType) -> str:
  """The page of one public submodule.

  Args:
    module: the module.

  Returns:
    reStructuredText: the module docstring, a table linking the members
    documented on their top-level pages, and the other members in full.
  """
  top = _top_level_names()
  exported, own = [], []
  for name in module_members(module):
    obj = getattr(module, name)
    (exported if id(obj) in top and not inspect.ismodule(obj) else own).append(
        name)
  parts = [_title(module.__name__),
           f".. automodule:: {module.__name__}\n   :no-members:\n"]
  if exported:
    rows = "".join(
        f"   * - :obj:`{PACKAGE}.{top[id(getattr(module, n))]}`\n"
        f"     - {summary(getattr(module, n))}\n" for n in exported)
    parts.append(".. rubric:: Also exported at the top level\n\n"
                 ".. list-table::\n   :widths: 30 70\n\n" + rows)
  if own:
    parts.append(f".. currentmodule:: {module.__name__}\n")
    parts.extend(_directive(_kind(getattr(module, n)), n) for n in own)
  return "\n".join(parts)


def _table(rows: list[tuple[str, str]]) -> str:
  body = "".join(f"   * - {ref}\n     - {text}\n" for ref, text in rows)
  return ".. list-table::\n   :widths: 30 70\n\n" + body


def index_page(names: list[str], modules: list[types.ModuleType]) -> str:
  """The API index: summary tables and a hidden toctree of every page.

  Args:
    names: non-module names of ``galore_optax.__all__``.
    modules: public submodules.

  Returns:
    reStructuredText.
  """
  sections = []
  for kind, heading in KIND_HEADINGS.items():
    rows = [(f":obj:`{PACKAGE}.{n}`", summary(getattr(galore_optax, n)))
            for n in names if _kind(getattr(galore_optax, n)) == kind]
    if rows:
      sections += [_title(heading).replace("=", "-"), _table(rows)]
  module_rows = [(f":mod:`{m.__name__}`", summary(m)) for m in modules]
  toctree = lambda caption, pages: (
      f".. toctree::\n   :hidden:\n   :caption: {caption}\n\n"
      + "".join(f"   {p}\n" for p in pages))
  return "\n".join([
      _title("API reference"),
      f".. py:module:: {PACKAGE}\n",
      "The functions, classes and constants below are importable as "
      "``galore_optax.<name>``; the submodules hold the building blocks "
      "and the rest of the public API.\n",
      *sections,
      "Submodules\n----------\n", _table(module_rows),
      toctree("Top-level names", [f"{PACKAGE}.{n}" for n in names]),
      toctree("Submodules", [m.__name__ for m in modules]),
  ])


def _write(path: pathlib.Path, text: str) -> None:
  if not path.exists() or path.read_text() != text:
    path.write_text(text)


def write_api_pages(out_dir: pathlib.Path) -> list[str]:
  """Writes every API page into ``out_dir``, removing stale ones.

  Args:
    out_dir: the generated directory (``docs/api``).

  Returns:
    The page names written (without suffix), index included.
  """
  out_dir.mkdir(parents=True, exist_ok=True)
  order = list(KIND_HEADINGS)
  names = sorted((n for n in galore_optax.__all__
                  if not inspect.ismodule(getattr(galore_optax, n))),
                 key=lambda n: (order.index(_kind(getattr(galore_optax, n))),
                                n.lower()))
  modules = public_submodules()
  pages = {"index": index_page(names, modules)}
  pages.update({f"{PACKAGE}.{n}": name_page(n) for n in names})
  pages.update({m.__name__: module_page(m) for m in modules})
  for stale in out_dir.glob("*.rst"):
    if stale.stem not in pages:
      stale.unlink()
  for page, text in pages.items():
    _write(out_dir / f"{page}.rst", text)
  return list(pages)
