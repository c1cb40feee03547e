"""Docstrings: every public function documents exactly its arguments.

Public functions are found, not listed, in ``galore_optax`` and each of its
submodules and subpackages without a ``_`` in their dotted names: the
functions a module names in ``__all__`` (defined anywhere in
``galore_optax``), or, for a module without ``__all__``, its public
attributes defined in that module or below it (not helpers it imports, such as
``_checks``'). Their Google-style Args section must name exactly the
signature's parameters (``*args`` and ``**kwargs`` may be written with or
without their stars).
"""

import importlib
import inspect
import pkgutil
import re

import pytest

import galore_optax

# An Args entry: ``name:`` or ``name (type):``, at the section's indentation.
_ENTRY = re.compile(r"(\*{0,2}[A-Za-z_]\w*)(?:\s*\([^)]*\))?:(?:\s|$)")


def _is_private(module_name: str) -> bool:
  return any(part.startswith("_") for part in module_name.split("."))


def _public_modules():
  """``galore_optax`` and its submodules whose dotted names have no ``_``."""
  modules = [galore_optax]
  for info in pkgutil.walk_packages(galore_optax.__path__, "galore_optax."):
    if not _is_private(info.name):
      modules.append(importlib.import_module(info.name))
  return modules


def _is_function(obj) -> bool:
  return callable(obj) and not inspect.isclass(obj) and not inspect.ismodule(
      obj)


def _public_functions():
  """``{"home_module.qualname": function}`` over the public modules."""
  found = {}
  for module in _public_modules():
    exported = getattr(module, "__all__", None)
    names = exported if exported is not None else [
        n for n in vars(module) if not n.startswith("_")]
    for name in names:
      obj = getattr(module, name)
      home = getattr(obj, "__module__", None) or ""
      if exported is not None:
        ours = home.startswith("galore_optax")
      else:
        ours = home == module.__name__ or home.startswith(
            module.__name__ + ".")
      if ours and _is_function(obj):
        found[f"{home}.{obj.__qualname__}"] = obj
  return dict(sorted(found.items()))


def documented_args(doc: str | None) -> list[str] | None:
  """The names in a Google-style docstring's Args section, None if none."""
  lines = (inspect.cleandoc(doc) if doc else "").splitlines()
  starts = [i for i, line in enumerate(lines) if line.strip() == "Args:"]
  if not starts:
    return None
  header = lines[starts[0]]
  section_indent = len(header) - len(header.lstrip())
  names, entry_indent = [], None
  for line in lines[starts[0] + 1:]:
    if not line.strip():
      continue
    indent = len(line) - len(line.lstrip())
    if indent <= section_indent:
      break  # the next section
    if entry_indent is None:
      entry_indent = indent
    if indent == entry_indent:  # deeper lines continue an entry
      match = _ENTRY.match(line.strip())
      names.append(match.group(1).lstrip("*") if match else line.strip())
  return names


def signature_args(function) -> list[str]:
  """The parameter names as written in the ``def``, without ``self``/``cls``.

  Not ``inspect.signature``: the GaLore aliases present their
  ``**galore_options`` as explicit keywords there, but document them once.
  """
  code = inspect.unwrap(function).__code__
  names = iter(code.co_varnames)
  positional = [next(names) for _ in range(code.co_argcount)]
  keyword_only = [next(names) for _ in range(code.co_kwonlyargcount)]
  varargs = [next(names)] if code.co_flags & inspect.CO_VARARGS else []
  varkw = [next(names)] if code.co_flags & inspect.CO_VARKEYWORDS else []
  return [name for name in positional + varargs + keyword_only + varkw
          if name not in ("self", "cls")]


PUBLIC_FUNCTIONS = _public_functions()



def test_discovery_finds_the_public_api():
  for expected in ("galore_optax.aliases.galore_adamw",
                   "galore_optax.transform.galore_project",
                   "galore_optax.names.create_optimizer",
                   "galore_optax.targets.galore_labels"):
    assert expected in PUBLIC_FUNCTIONS
  assert len({f.__module__.split(".")[1] for f in PUBLIC_FUNCTIONS.values()
              }) >= 8


def test_parser_reads_google_style_args():

  def example(a, *args, b=1, **kwargs):
    """Summary.

    Args:
      a: first, with a long description
        that continues here: with a colon.
      *args: the rest.
      b (int): typed.
      kwargs: options.

    Returns:
      Nothing.
    """

  assert documented_args(example.__doc__) == ["a", "args", "b", "kwargs"]
  assert signature_args(example) == ["a", "args", "b", "kwargs"]
  assert documented_args("Summary only.") is None


@pytest.mark.parametrize("name", list(PUBLIC_FUNCTIONS))
def test_args_section_documents_exactly_the_signature(name):
  function = PUBLIC_FUNCTIONS[name]
  expected = signature_args(function)
  documented = documented_args(function.__doc__)
  if documented is None:
    assert not expected, f"{name}: no Args section for {expected}"
    return
  missing = [a for a in expected if a not in documented]
  extra = [a for a in documented if a not in expected]
  assert not missing and not extra, (
      f"{name}: undocumented {missing}, documented but not in the signature "
      f"{extra}")
  assert len(documented) == len(set(documented)), f"{name}: documented twice"
