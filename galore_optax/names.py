"""Optimizers by Hugging Face ``Trainer`` name, with its ``optim_args`` string.

``create_optimizer("galore_adamw", 1e-2, target_modules=[r".*attn.*"],
optim_args="rank=64, update_proj_gap=100, scale=0.1, proj_type=std")``
builds what ``TrainingArguments(optim=..., optim_args=...,
optim_target_modules=...)`` builds in ``transformers``:

============================  ============================================
name                          transformation
============================  ============================================
``adamw`` (``adamw_torch``,   ``optax.adamw`` (b1 0.9, b2 0.999, eps 1e-8,
``adamw_torch_fused``)        like ``torch.optim.AdamW``)
``adamw_8bit``                ``galore_optax.adamw_8bit``
(``adamw_bnb_8bit``)
``galore_adamw``              ``galore_optax.galore_adamw``
``galore_adamw_8bit``         ``galore_optax.galore_adamw_8bit``
``galore_adafactor``          ``galore_optax.galore_adafactor``
``<galore name>_layerwise``   the same transformation, see below
============================  ============================================

Layer-wise mode (one optimizer step per parameter as soon as its gradient is
ready) is a property of the training step, not of the transformation: for a
``_layerwise`` name ``create_optimizer`` returns the same transformation as
for the base name, and ``parse_optimizer_name(name)`` tells the caller to
build a layer-wise train step with it.

``optim_args`` may set any keyword argument of the optimizer's factory except
``learning_rate``, ``weight_decay`` and ``target_modules``, which have their
own arguments (as in ``transformers``). The accepted keys and their defaults
come from the factory's signature (``optimizer_arguments``); the GaLore ones
are ``galore_optax.aliases.GaLoreOptions``, with ``galore_project``'s
defaults (Hugging Face's).

Differences from ``transformers`` (5.x), on purpose:

* Its GaLore optimizers receive only ``lr`` and the four GaLore keys; other
  ``optim_args`` keys are silently dropped, and ``weight_decay`` /
  ``adam_epsilon`` are ignored, so the ``galore_torch`` class defaults apply
  (``GaLoreAdamW``: eps 1e-6, no decay; ``GaLoreAdamW8bit``: eps 1e-8 and
  bitsandbytes' weight decay 1e-2). Here every key is honoured or rejected,
  ``weight_decay`` always applies, and eps defaults to 1e-8 for all AdamWs.
* Its ``galore_adafactor_layerwise`` builds the per-parameter optimizers
  before switching off ``relative_step``, so ``Adafactor`` rejects the
  learning rate; here it is the same Adafactor as ``galore_adafactor``.
* Its ``target_modules`` are ignored by non-GaLore optimizers; here they
  raise, since they would select nothing.

References:
  Hugging Face ``transformers`` ``TrainingArguments.optim``, ``optim_args``
  and ``optim_target_modules``; Zhao et al., 2024, arXiv 2403.03507.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

import optax

from galore_optax import aliases
from galore_optax import targets

LAYERWISE_SUFFIX = "_layerwise"

# Canonical name -> factory. Every factory takes the learning rate first and
# ``weight_decay`` by keyword; the GaLore ones also take ``target_modules``.
_FACTORIES: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": optax.adamw,
    "adamw_8bit": aliases.adamw_8bit,
    "galore_adamw": aliases.galore_adamw,
    "galore_adamw_8bit": aliases.galore_adamw_8bit,
    "galore_adafactor": aliases.galore_adafactor,
    "fira_adamw": aliases.fira_adamw,
    "apollo_adamw": aliases.apollo_adamw,
}
# Other Hugging Face spellings of the same optimizers.
_SYNONYMS = {
    "adamw_torch": "adamw",
    "adamw_torch_fused": "adamw",
    "adamw_bnb_8bit": "adamw_8bit",
}
GALORE_NAMES = tuple(n for n in _FACTORIES if n.startswith("galore_"))
# Every optimizer that projects target matrices: the GaLore family.
PROJECTED_NAMES = GALORE_NAMES + ("fira_adamw", "apollo_adamw")
OPTIMIZER_NAMES = (tuple(_FACTORIES) + tuple(_SYNONYMS) +
                   tuple(n + LAYERWISE_SUFFIX for n in PROJECTED_NAMES))
# Hugging Face's optim_args keys that name one of our arguments otherwise
# (``transformers``' apollo branch reads ``proj=random|svd``).
_KEY_SYNONYMS = {"apollo_adamw": {"proj": "projector_method"}}

# Arguments with a dedicated parameter of ``create_optimizer``.
_DEDICATED = ("learning_rate", "weight_decay", "target_modules")

_INT = re.compile(r"[+-]?\d+")


def parse_optimizer_name(name: str) -> tuple[str, bool]:
  """Splits a Hugging Face optimizer name into its base name and mode.

  Args:
    name: e.g. ``"galore_adamw_8bit_layerwise"``; case and surrounding
      whitespace are ignored.

  Returns:
    ``(base_name, layerwise)``: the canonical name of the transformation
    (synonyms such as ``adamw_torch`` resolved to ``adamw``), and whether
    the name asks for layer-wise updates.

  Raises:
    ValueError: for an unknown name, listing the accepted ones.
  """
  if not isinstance(name, str):
    raise ValueError(f"The optimizer name must be a string, one of "
                     f"{list(OPTIMIZER_NAMES)}; got {name!r}.")
  key = name.strip().lower()
  layerwise = key.endswith(LAYERWISE_SUFFIX)
  base = key[:-len(LAYERWISE_SUFFIX)] if layerwise else key
  base = _SYNONYMS.get(base, base)
  if base not in _FACTORIES or (layerwise and base not in PROJECTED_NAMES):
    raise ValueError(
        f"Unknown optimizer name {name!r}; expected one of "
        f"{list(OPTIMIZER_NAMES)} (only the GaLore optimizers have a "
        f"{LAYERWISE_SUFFIX!r} variant).")
  return base, layerwise


def _parse_value(text: str) -> Any:
  """``'64'`` -> 64, ``'0.1'`` -> 0.1, ``'true'`` -> True, ``'none'`` -> None.

  Quoted text and anything else stays a string.
  """
  if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
    return text[1:-1]
  lowered = text.lower()
  if lowered in ("none", "null"):
    return None
  if lowered in ("true", "false"):
    return lowered == "true"
  if _INT.fullmatch(text):
    return int(text)
  try:
    return float(text)
  except ValueError:
    return text


def _split_optim_args(text: str) -> dict[str, str]:
  """``"a=1, b = x"`` -> ``{"a": "1", "b": "x"}``; checks the syntax."""
  out: dict[str, str] = {}
  for entry in text.split(","):
    entry = entry.strip()
    if not entry:
      continue  # tolerate "a=1," and "a=1,,b=2"
    key, sep, value = entry.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key.isidentifier() or not value:
      raise ValueError(
          f"Malformed optim_args entry {entry!r} in {text!r}: expected "
          "comma-separated key=value pairs such as \"rank=64, "
          "update_proj_gap=100, scale=0.1, proj_type=std\".")
    if key in out:
      raise ValueError(f"optim_args sets {key!r} twice in {text!r}.")
    out[key] = value
  return out


def parse_optim_args(optim_args: str | Mapping[str, Any] | None
                     ) -> dict[str, Any]:
  """Parses Hugging Face's ``optim_args`` string into Python values.

  Entries are ``key=value`` separated by commas, whitespace anywhere.
  Values become ints (``64``), floats (``0.1``, ``1e-3``), bools
  (``true``/``false``, any case), ``None`` (``none``/``null``) or strings
  (anything else; quotes are stripped). ``create_optimizer`` additionally
  checks each value against the type of the argument it sets.

  Args:
    optim_args: the string, a mapping (returned as a dict, string values
      parsed as above), or ``None`` (empty).

  Returns:
    A dict from argument name to value.

  Raises:
    ValueError: for a malformed entry (``rank``, ``=3``, ``rank=``) or a key
      given twice.
  """
  return {k: _parse_value(v) if isinstance(v, str) else v
          for k, v in _raw_optim_args(optim_args).items()}


def _raw_optim_args(optim_args: str | Mapping[str, Any] | None
                    ) -> dict[str, Any]:
  if optim_args is None:
    return {}
  if isinstance(optim_args, str):
    return _split_optim_args(optim_args)
  if isinstance(optim_args, Mapping):
    bad = [k for k in optim_args if not (isinstance(k, str) and
                                         k.isidentifier())]
    if bad:
      raise ValueError(f"optim_args keys must be argument names, got {bad}.")
    return {k: v.strip() if isinstance(v, str) else v
            for k, v in optim_args.items()}
  raise ValueError(
      "optim_args must be None, a string such as \"rank=64, scale=0.1\" or a "
      f"dict, got {type(optim_args).__name__}.")


def optimizer_arguments(name: str) -> dict[str, Any]:
  """The arguments ``optim_args`` may set for an optimizer, with defaults.

  Derived from the factory's signature, less ``learning_rate``,
  ``weight_decay`` and ``target_modules``.

  Args:
    name: an optimizer name (see ``OPTIMIZER_NAMES``).

  Returns:
    A dict from argument name to its default value.
  """
  base, _ = parse_optimizer_name(name)
  params = inspect.signature(_FACTORIES[base]).parameters.values()
  return {
      p.name: p.default for p in params
      if p.name not in _DEDICATED and p.kind in (
          inspect.Parameter.POSITIONAL_OR_KEYWORD,
          inspect.Parameter.KEYWORD_ONLY)
  }


def _coerce(key: str, value: Any, default: Any, name: str) -> Any:
  """Checks a parsed text value against the type of the argument's default."""
  if not isinstance(value, str):
    return value  # a Python value from a dict or **kwargs: the factory checks
  parsed = _parse_value(value)

  def fail(expected: str):
    raise ValueError(f"optim_args value {key}={value!r} for {name!r} is "
                     f"malformed: expected {expected} (default {default!r}).")

  if isinstance(default, bool):
    if not isinstance(parsed, bool):
      fail("true or false")
    return parsed
  if isinstance(default, int):
    if not isinstance(parsed, int) or isinstance(parsed, bool):
      fail("an integer")
    return parsed
  if isinstance(default, float):
    if isinstance(parsed, bool) or not isinstance(parsed, (int, float)):
      fail("a number")
    return float(parsed)
  if isinstance(default, str):
    return parsed if isinstance(parsed, str) else value  # 'proj_type=std'
  return parsed  # default None: the annotation is not enforced here


def create_optimizer(
    name: str,
    learning_rate: optax.ScalarOrSchedule,
    *,
    target_modules: targets.TargetModules = None,
    optim_args: str | Mapping[str, Any] | None = None,
    weight_decay: float = 0.0,
    **kwargs: Any,
) -> optax.GradientTransformation:
  """Builds the optimizer that Hugging Face's ``Trainer`` names ``name``.

  Example::

    tx = create_optimizer(
        "galore_adamw", 1e-2, target_modules=[r".*attn.*", r".*mlp.*"],
        optim_args="rank=64, update_proj_gap=100, scale=0.1, proj_type=std")
    base, layerwise = parse_optimizer_name("galore_adamw_layerwise")

  ``adamw`` is ``optax.adamw`` with ``torch.optim.AdamW``'s and the
  ``Trainer``'s defaults (b1 0.9, b2 0.999, eps 1e-8, and ``weight_decay``
  from this function, 0 by default, not optax's 1e-4). For a ``_layerwise``
  name the transformation is the base name's; build a layer-wise train step
  with it (see ``parse_optimizer_name``).

  Args:
    name: one of ``OPTIMIZER_NAMES`` (case-insensitive).
    learning_rate: a float or an optax schedule.
    target_modules: the matrices to project (``optim_target_modules``; see
      ``galore_optax.targets``). Required for the GaLore optimizers, as in
      ``transformers``; rejected for the others.
    optim_args: ``"key=value, ..."`` (Hugging Face's string) or a dict,
      setting any keyword argument of the optimizer (see
      ``optimizer_arguments``); values are checked against the argument's
      type.
    weight_decay: decoupled weight decay (``TrainingArguments.weight_decay``).
    **kwargs: further keyword arguments of the optimizer, as Python values;
      must not repeat a key of ``optim_args``.

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    ValueError: for an unknown name, a malformed ``optim_args`` entry or
      value, a key the optimizer does not accept (the message lists those it
      does), a key given twice, or a missing or unexpected
      ``target_modules``.

  References:
    Hugging Face ``transformers`` ``Trainer.get_optimizer_cls_and_kwargs``.
  """
  base, _ = parse_optimizer_name(name)
  accepted = optimizer_arguments(base)
  synonyms = _KEY_SYNONYMS.get(base, {})
  raw = {synonyms.get(k, k): v
         for k, v in _raw_optim_args(optim_args).items()}
  given = {k: _coerce(k, v, accepted[k], name) if k in accepted else v
           for k, v in raw.items()}
  twice = sorted(set(given) & set(kwargs))
  if twice:
    raise ValueError(f"{twice} given both in optim_args and as keyword "
                     "arguments.")
  given.update(kwargs)
  dedicated = sorted(set(given) & set(_DEDICATED))
  if dedicated:
    raise ValueError(
        f"{dedicated} cannot be set in optim_args or **kwargs: use "
        "create_optimizer's own learning_rate, weight_decay and "
        "target_modules arguments.")
  unknown = sorted(set(given) - set(accepted))
  if unknown:
    raise ValueError(
        f"Unknown argument(s) {unknown} for optimizer {name!r}; accepted "
        f"keys: {sorted(accepted)}.")
  if base in PROJECTED_NAMES:
    if target_modules is None:
      raise ValueError(
          f"{name!r} needs target_modules (Hugging Face's "
          "optim_target_modules) to choose the matrices to project, e.g. "
          "[r'.*attn.*', r'.*mlp.*'] or 'all-linear'.")
    given["target_modules"] = target_modules
  elif target_modules is not None:
    raise ValueError(
        f"target_modules only applies to the GaLore optimizers "
        f"{list(PROJECTED_NAMES)}, not to {name!r}; drop it or pick one of them.")
  return _FACTORIES[base](learning_rate, weight_decay=weight_decay, **given)
