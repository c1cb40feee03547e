"""The package's public surface: submodules as attributes, a thin __init__."""

import pkgutil
import subprocess
import sys

import galore_optax


def _public_submodules() -> list[str]:
  return [m.name for m in pkgutil.iter_modules(galore_optax.__path__)
          if not m.name.startswith("_")]


def test_every_public_submodule_is_an_attribute():
  for name in _public_submodules():
    module = getattr(galore_optax, name)
    assert module.__name__ == f"galore_optax.{name}"
  assert galore_optax.layerwise.make_layerwise_step is not None


def test_unknown_attribute_raises_attribute_error():
  try:
    galore_optax.no_such_module  # pylint: disable=pointless-statement
  except AttributeError as err:
    assert "no_such_module" in str(err)
  else:
    raise AssertionError("expected AttributeError")


def test_command_modules_are_not_imported_with_the_package():
  # Imported eagerly, ``python -m galore_optax.memory`` warns (runpy).
  code = ("import sys, galore_optax; "
          "print(sorted(m for m in ('galore_optax.memory', 'galore_optax.cli')"
          " if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True).stdout
  assert out.strip() == "[]"
