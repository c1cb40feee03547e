"""Ready optimizers: chains of ``galore_project`` and optax primitives.

The GaLore aliases take ``galore_project``'s keyword arguments as their own.
``GaLoreOptions`` declares them once, with their defaults and documentation;
each alias lists them in its signature (for users and IDEs), gets their
documentation from ``GaLoreOptions`` and forwards them through it.

References:
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
  Projection", ICML 2024, arXiv 2403.03507.
"""

from __future__ import annotations

import inspect
import textwrap
import typing
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

import optax

from galore_optax import targets
from galore_optax._checks import check_finite_number
from galore_optax.adafactor import scale_by_adafactor
from galore_optax.state_8bit import quantize_state_8bit
from galore_optax.transform import MatrixAxes
from galore_optax.transform import galore_project


class GaLoreOptions(NamedTuple):
  """The keyword arguments of ``galore_project`` that the GaLore aliases take.

  Every GaLore alias accepts these by keyword, with these defaults (Hugging
  Face's for ``rank``, ``update_proj_gap``, ``scale`` and ``proj_type``), and
  passes them unchanged to ``galore_project``, which describes them in full.

  Attributes:
    rank: GaLore rank ``r`` (each matrix uses ``min(r, m, n)``).
    update_proj_gap: updates between projector refreshes ``T``.
    scale: ``alpha``, multiplies the back-projected update.
    proj_type: ``std``, ``reverse_std``, ``left``, ``right`` or ``full``.
    projector_method: ``svd`` (exact) or ``randomized``.
    projector_dtype: ``float32``, ``bfloat16`` or ``int8`` projectors.
    stagger_refresh: spread projector refreshes over the window.
    moments: ``keep`` (the reference), ``project`` or ``reset``: what
      happens to the moments at a refresh (see ``galore_project``).
    matrix_axes: ``{name: (row_axes, col_axes)}`` for leaves whose matrix
      is not their last two axes (see ``galore_project``).
    seed: seed of the randomized projector's random test matrices.
  """

  rank: int = 128
  update_proj_gap: int = 200
  scale: float = 0.25
  proj_type: str = "std"
  projector_method: str = "svd"
  projector_dtype: str = "float32"
  stagger_refresh: bool = False
  moments: str = "keep"
  matrix_axes: MatrixAxes | None = None
  seed: int = 0

  @classmethod
  def from_arguments(cls, arguments: Mapping[str, Any]) -> GaLoreOptions:
    """Picks the options out of an alias' arguments.

    Args:
      arguments: the alias' arguments by name, e.g. its ``locals()``.

    Returns:
      A ``GaLoreOptions`` with the alias' values.
    """
    return cls(**{name: arguments[name] for name in cls._fields})


# The defaults of the aliases' signatures.
_DEFAULT = GaLoreOptions()

# The line of an alias' Args section that stands for the GaLore arguments.
_OPTIONS_PLACEHOLDER = "{GaLoreOptions}"

_Alias = TypeVar("_Alias", bound=Callable[..., Any])


def _options_doc(indent: str) -> str:
  """``GaLoreOptions``' Attributes entries, indented as Args entries."""
  entries = GaLoreOptions.__doc__.split("Attributes:\n", 1)[1]
  return textwrap.indent(textwrap.dedent(entries).strip("\n"), indent)


def _takes_galore_options(alias: _Alias) -> _Alias:
  """Checks an alias' GaLore arguments and writes their documentation.

  Args:
    alias: a factory whose signature lists every ``GaLoreOptions`` field as
      a keyword-only argument with the declared type and default, and whose
      docstring's Args section has a ``{GaLoreOptions}`` line.

  Returns:
    ``alias``, its placeholder line replaced by ``GaLoreOptions``'
    attribute documentation.

  Raises:
    TypeError: if the signature or the docstring disagrees with
      ``GaLoreOptions``, so that they cannot drift apart.
  """
  parameters = inspect.signature(alias).parameters
  alias_types = typing.get_type_hints(alias)
  for name, expected_type in typing.get_type_hints(GaLoreOptions).items():
    parameter = parameters.get(name)
    default = GaLoreOptions._field_defaults[name]
    if (parameter is None or parameter.kind != parameter.KEYWORD_ONLY or
        parameter.default != default or alias_types[name] != expected_type):
      raise TypeError(
          f"{alias.__name__} must take the keyword-only argument {name}: "
          f"{expected_type} = {default!r}, as GaLoreOptions declares.")
  if alias.__doc__ is not None:  # None under python -OO
    lines = alias.__doc__.split("\n")
    at = [i for i, line in enumerate(lines)
          if line.strip() == _OPTIONS_PLACEHOLDER]
    if len(at) != 1:
      raise TypeError(f"{alias.__name__}'s docstring needs one "
                      f"{_OPTIONS_PLACEHOLDER} line in its Args section.")
    indent = lines[at[0]][:-len(lines[at[0]].lstrip())]
    lines[at[0]] = _options_doc(indent)
    alias.__doc__ = "\n".join(lines)
  return alias


def _galore_chain(
    make_inner: Callable[[], optax.GradientTransformation],
    *tail: optax.GradientTransformation,
    target_modules: targets.TargetModules,
    options: GaLoreOptions,
) -> optax.GradientTransformationExtraArgs:
  """Targets get ``galore_project(inner)``, other leaves ``inner`` itself.

  ``tail`` (weight decay, learning rate, sign) then applies to the full-size
  updates of every leaf. Where the learning rate goes depends on the inner
  optimizer: after the projection for Adam, inside ``inner`` for Adafactor.

  Args:
    make_inner: builds the inner optimizer (called once per partition).
    *tail: transformations applied after the partition, to every leaf.
    target_modules: which leaves are projected (``galore_optax.targets``).
    options: the GaLore keyword arguments of ``galore_project``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return optax.chain(
      optax.partition(
          {
              targets.GALORE_LABEL: galore_project(make_inner(),
                                                   **options._asdict()),
              targets.FULL_RANK_LABEL: make_inner(),
          },
          targets.galore_labels(target_modules),
      ),
      *tail,
  )


@_takes_galore_options
def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    target_modules: targets.TargetModules = None,
    weight_decay_mask: Any = None,
    mu_dtype: Any = None,
    # GaLoreOptions:
    rank: int = _DEFAULT.rank,
    update_proj_gap: int = _DEFAULT.update_proj_gap,
    scale: float = _DEFAULT.scale,
    proj_type: str = _DEFAULT.proj_type,
    projector_method: str = _DEFAULT.projector_method,
    projector_dtype: str = _DEFAULT.projector_dtype,
    stagger_refresh: bool = _DEFAULT.stagger_refresh,
    moments: str = _DEFAULT.moments,
    matrix_axes: MatrixAxes | None = _DEFAULT.matrix_axes,
    seed: int = _DEFAULT.seed,
) -> optax.GradientTransformationExtraArgs:
  """AdamW whose moments live in a GaLore subspace for the target matrices.

  Target leaves (see ``galore_optax.targets``) get
  ``galore_project(optax.scale_by_adam(...))``; every other leaf
  (embeddings, norms, biases, unselected matrices) gets plain Adam with the
  same hyper-parameters, as ``galore_torch.GaLoreAdamW`` does for parameter
  groups without a rank. Weight decay is decoupled (``p -= lr * wd * p``)
  and applies to the full weights.

  Example::

    tx = galore_adamw(1e-2, rank=128, target_modules=["attn", "mlp"])

  Args:
    learning_rate: a float or an optax schedule.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to the root of the second moment.
    weight_decay: decoupled weight decay rate.
    target_modules: which leaves are projected; ``None`` means every leaf
      with two or more dimensions.
    weight_decay_mask: optional mask or mask function for the decay.
    mu_dtype: optional dtype of Adam's first moment.
    {GaLoreOptions}

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Zhao et al., 2024, arXiv 2403.03507.
  """
  options = GaLoreOptions.from_arguments(locals())
  return _galore_chain(
      lambda: optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
      target_modules=target_modules,
      options=options,
  )


def _lr_scaled_weight_decay(
    weight_decay: float, learning_rate: optax.ScalarOrSchedule
) -> optax.ScalarOrSchedule:
  """``weight_decay * lr`` as a constant or, for a schedule, a schedule."""
  if isinstance(weight_decay, (int, float)) and weight_decay == 0:
    return 0.0  # lets optax skip the decay (and keep no count)
  if callable(learning_rate):
    return lambda count: weight_decay * learning_rate(count)
  return weight_decay * learning_rate


@_takes_galore_options
def galore_adafactor(
    learning_rate: optax.ScalarOrSchedule,
    *,
    beta1: float | None = None,
    decay_rate: float = -0.8,
    eps: float = 1e-30,
    clip_threshold: float = 1.0,
    weight_decay: float = 0.0,
    target_modules: targets.TargetModules = None,
    weight_decay_mask: Any = None,
    # GaLoreOptions:
    rank: int = _DEFAULT.rank,
    update_proj_gap: int = _DEFAULT.update_proj_gap,
    scale: float = _DEFAULT.scale,
    proj_type: str = _DEFAULT.proj_type,
    projector_method: str = _DEFAULT.projector_method,
    projector_dtype: str = _DEFAULT.projector_dtype,
    stagger_refresh: bool = _DEFAULT.stagger_refresh,
    moments: str = _DEFAULT.moments,
    matrix_axes: MatrixAxes | None = _DEFAULT.matrix_axes,
    seed: int = _DEFAULT.seed,
) -> optax.GradientTransformationExtraArgs:
  """Adafactor whose factored moments live in a GaLore subspace.

  ``galore_torch.GaLoreAdafactor`` with an external learning rate
  (``relative_step=False, scale_parameter=False, warmup_init=False``, as
  Hugging Face's ``Trainer`` builds ``galore_adafactor``). Target leaves get
  ``galore_project(scale_by_adafactor(...))``: the row/column second-moment
  factors (and the first moment, with ``beta1``) are kept for the projected
  gradient; the learning rate is applied inside, before the first-moment
  average and the back-projection, as in the reference. Every other leaf gets
  plain Adafactor at full size (factored when it has two or more
  dimensions). Weight decay multiplies the pre-update weights by the current
  learning rate: ``p <- p - lr * weight_decay * p - update``.

  Example::

    tx = galore_adafactor(1e-2, rank=128, target_modules=["attn", "mlp"])

  Args:
    learning_rate: a float or an optax schedule.
    beta1: first-moment decay, or ``None`` (the default) for none.
    decay_rate: second-moment decay exponent, ``beta2_t = 1 - t **
      decay_rate``.
    eps: added to the squared gradient (Hugging Face's ``eps[0]``; its
      ``eps[1]`` only matters with ``scale_parameter=True``).
    clip_threshold: largest RMS of each update matrix before the learning
      rate.
    weight_decay: decay rate, multiplied by the learning rate.
    target_modules: which leaves are projected; ``None`` means every leaf
      with two or more dimensions.
    weight_decay_mask: optional mask or mask function for the decay.
    {GaLoreOptions}

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Zhao et al., 2024, arXiv 2403.03507; Shazeer and Stern, 2018,
    arXiv 1804.04235.
  """
  options = GaLoreOptions.from_arguments(locals())
  check_finite_number("weight_decay", weight_decay)
  return _galore_chain(
      lambda: scale_by_adafactor(learning_rate, beta1=beta1,
                                 decay_rate=decay_rate, eps=eps,
                                 clip_threshold=clip_threshold),
      optax.add_decayed_weights(
          _lr_scaled_weight_decay(weight_decay, learning_rate),
          weight_decay_mask),
      optax.scale(-1.0),  # scale_by_adafactor's update is not negated
      target_modules=target_modules,
      options=options,
  )


def adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    block_size: int = 256,
    min_size: int = 4096,
) -> optax.GradientTransformationExtraArgs:
  """AdamW with 8-bit block-wise moments: a drop-in for ``optax.adamw``.

  Moments of leaves with at least ``min_size`` elements are stored as 8-bit
  codes on bitsandbytes' dynamic maps (signed for the first moment, unsigned
  for the second) with one float32 scale per ``block_size`` values.

  Args:
    learning_rate: a float or an optax schedule.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: decoupled weight decay rate.
    weight_decay_mask: optional mask or mask function for the decay.
    block_size: values per float32 scale.
    min_size: smaller state leaves stay float32.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR
    2022, arXiv 2110.02861.
  """
  return optax.chain(
      quantize_state_8bit(optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                          block_size=block_size, min_size=min_size),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )


@_takes_galore_options
def galore_adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    target_modules: targets.TargetModules = None,
    weight_decay_mask: Any = None,
    block_size: int = 256,
    min_size: int = 4096,
    # GaLoreOptions:
    rank: int = _DEFAULT.rank,
    update_proj_gap: int = _DEFAULT.update_proj_gap,
    scale: float = _DEFAULT.scale,
    proj_type: str = _DEFAULT.proj_type,
    projector_method: str = _DEFAULT.projector_method,
    projector_dtype: str = _DEFAULT.projector_dtype,
    stagger_refresh: bool = _DEFAULT.stagger_refresh,
    moments: str = _DEFAULT.moments,
    matrix_axes: MatrixAxes | None = _DEFAULT.matrix_axes,
    seed: int = _DEFAULT.seed,
) -> optax.GradientTransformationExtraArgs:
  """GaLore AdamW with 8-bit moments: ``galore_adamw`` + ``adamw_8bit``.

  Target leaves run ``galore_project(quantize_state_8bit(scale_by_adam))``:
  the low-rank moments are stored in 8 bits when the *projected* leaf has at
  least ``min_size`` elements, as ``galore_torch.GaLoreAdamW8bit`` does.
  Other leaves run 8-bit AdamW at full size. ``projector_dtype="int8"``
  also stores the projectors in 8 bits.

  Args:
    learning_rate: a float or an optax schedule.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: decoupled weight decay rate.
    target_modules: which leaves are projected; ``None`` means every leaf
      with two or more dimensions.
    weight_decay_mask: optional mask or mask function for the decay.
    block_size: values per float32 scale of the 8-bit states.
    min_size: smaller state leaves stay float32.
    {GaLoreOptions}

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Zhao et al., 2024, arXiv 2403.03507; Dettmers et al., 2022,
    arXiv 2110.02861.
  """
  options = GaLoreOptions.from_arguments(locals())
  return _galore_chain(
      lambda: quantize_state_8bit(
          optax.scale_by_adam(b1=b1, b2=b2, eps=eps), block_size=block_size,
          min_size=min_size),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
      target_modules=target_modules,
      options=options,
  )
