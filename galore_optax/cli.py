"""Command-line helpers shared by ``python -m galore_optax.memory`` and the examples.

A bad command-line value gets one line on stderr and exit status 2, never a
traceback: ``ArgumentParser.error`` prints ``NAME: error: MESSAGE`` without
argparse's usage block; the ``type=`` validators here reject a value while
the arguments are parsed; ``user_errors`` gives the same line for the
documented input errors (``ValueError``, ``FileNotFoundError``) of a setup
phase, which only show once the model or the data are known. Help texts show
each default once (``DefaultsHelpFormatter``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

from galore_optax import targets


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Appends ``(default: X)`` to a help text unless it would say nothing new.

  A ``None`` or ``False`` default is left out (the help text says what an
  absent flag means), and so is one the help text already mentions with
  ``%(default)s``.
  """

  def _get_help_string(self, action: argparse.Action) -> str | None:
    if action.default is None or action.default is False or (
        "%(default)" in (action.help or "")):
      return action.help
    return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
  """An ``argparse.ArgumentParser`` whose errors are one line on stderr.

  Args:
    *args: ``argparse.ArgumentParser``'s arguments.
    error_name: the name before ``: error:`` (default: ``prog``).
    **kwargs: ``argparse.ArgumentParser``'s keyword arguments;
      ``formatter_class`` defaults to ``DefaultsHelpFormatter``.
  """

  def __init__(self, *args, error_name: str | None = None, **kwargs):
    kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
    super().__init__(*args, **kwargs)
    self.error_name = error_name or self.prog

  def error(self, message: str) -> NoReturn:
    """Prints ``NAME: error: MESSAGE`` as one line and exits with status 2.

    Args:
      message: what is wrong; line breaks are folded into spaces.
    """
    self.exit(2, f"{self.error_name}: error: {' '.join(str(message).split())}\n")


@contextlib.contextmanager
def user_errors(parser: argparse.ArgumentParser,
                errors: tuple[type[Exception], ...] = (ValueError,
                                                       FileNotFoundError)
                ) -> Iterator[None]:
  """Turns the documented input errors raised inside into ``parser.error``.

  Wrap only the setup calls whose ``ValueError`` exceptions (and the like) report bad
  user input, so that genuine bugs elsewhere keep their tracebacks.

  Args:
    parser: the parser whose ``error`` reports the message.
    errors: the exception types that mean bad input.

  Yields:
    Nothing; the body runs inside.
  """
  try:
    yield
  except errors as e:
    parser.error(str(e))


def number_type(convert: Callable[[str], float],
                accept: Callable[[float], bool],
                requirement: str) -> Callable[[str], float]:
  """An argparse ``type=`` for a finite number that ``accept`` allows.

  Args:
    convert: ``int`` or ``float``.
    accept: the check on the converted value.
    requirement: what is required, for the message (``"a positive
      integer"``).

  Returns:
    A function from the command-line text to the number that raises
    ``argparse.ArgumentTypeError`` ("must be <requirement>, got '<text>'").
  """

  def parse(text: str) -> float:
    """Converts and checks one command-line value.

    Args:
      text: the command-line value.

    Returns:
      The number.
    """
    try:
      value = convert(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"must be {requirement}, got {text!r}") from None
    if not (math.isfinite(value) and accept(value)):
      raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
    return value

  return parse


positive_int = number_type(int, lambda v: v >= 1, "a positive integer")
non_negative_int = number_type(int, lambda v: v >= 0, "an integer >= 0")
positive_float = number_type(float, lambda v: v > 0, "a positive number")
non_negative_float = number_type(float, lambda v: v >= 0, "a number >= 0")
unit_interval = number_type(float, lambda v: 0 <= v <= 1,
                            "a number in [0, 1]")
# What every consumer of a seed takes (numpy, grain, jax.random.key).
seed = number_type(int, lambda v: 0 <= v < 2**32,
                   "an integer in [0, 2**32)")


def comma_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
  """``type=`` for a comma-separated list of some of ``choices``.

  Args:
    choices: the accepted entries.

  Returns:
    A function from the command-line value to the list of its entries.
  """

  def parse(text: str) -> list[str]:
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if not entries:
      raise argparse.ArgumentTypeError(
          f"expected a comma-separated list of {', '.join(choices)}")
    unknown = [e for e in entries if e not in choices]
    if unknown:
      raise argparse.ArgumentTypeError(
          f"unknown {', '.join(map(repr, unknown))}; choose from "
          f"{', '.join(choices)}")
    return entries

  return parse


def parse_target_modules(spec: str | None) -> targets.TargetModules:
  """A command-line target spec -> a ``galore_optax.targets`` selection.

  Args:
    spec: a comma-separated list of names/substrings/regexes
      (``"attn,mlp"``); ``"re:REGEX"`` for a single regex that must match
      the whole module name (Hugging Face's single-string semantics);
      ``"all-linear"`` for every linear weight; ``"all"`` (or ``None``) for
      every leaf with two or more dimensions, embeddings included.

  Returns:
    ``None``, a string or a list of strings.

  Raises:
    ValueError: for a list with no entries (e.g. ``","``).
  """
  if spec is None or spec.strip().lower() in ("", "all", "none"):
    return None
  spec = spec.strip()
  if spec.startswith("re:"):
    return spec[3:]
  if spec.replace("_", "-") == "all-linear":
    return "all-linear"
  entries = [s.strip() for s in spec.split(",") if s.strip()]
  if not entries:
    raise ValueError(f"Empty --target-modules {spec!r}.")
  return entries


def target_modules_spec(text: str) -> str:
  """``type=`` for a target spec: checks it and returns it unchanged.

  Whether it matches any parameter is only known with the model; that error
  comes from ``galore_optax.targets.target_mask``.

  Args:
    text: the command-line value (see ``parse_target_modules``).

  Returns:
    ``text``.
  """
  try:
    targets.make_matcher(parse_target_modules(text))
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  return text
