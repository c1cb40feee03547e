"""Ready optimizers: chains of ``galore_project`` and optax primitives.

The GaLore aliases take ``galore_project``'s keyword arguments as
``**galore_options``, declared once by ``GaLoreOptions`` (names, types and
documentation; the defaults are ``galore_project``'s) and forwarded unchanged.

References:
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
  Projection", ICML 2024, arXiv 2403.03507.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypedDict, TypeVar

import jax.numpy as jnp
import optax
from typing_extensions import Unpack

from galore_optax import apollo
from galore_optax import targets
from galore_optax._checks import check_choice
from galore_optax._checks import check_float_dtype
from galore_optax._checks import check_learning_rate
from galore_optax._checks import check_number_in_range
from galore_optax.adafactor import scale_by_adafactor
from galore_optax.split_adam import scale_by_adam_bias_correction
from galore_optax.split_adam import scale_by_uncorrected_adam
from galore_optax.state_8bit import quantize_state_8bit
from galore_optax.transform import MatrixAxes
from galore_optax.transform import galore_project


class GaLoreOptions(TypedDict, total=False):
  """The keyword arguments of ``galore_project`` that the GaLore aliases take.

  Every GaLore alias accepts these as ``**galore_options`` and passes them
  unchanged to ``galore_project``, which has their defaults (Hugging Face's
  for ``rank``, ``update_proj_gap``, ``scale`` and ``proj_type``) and
  describes them in full.

  Attributes:
    rank: GaLore rank ``r`` (each matrix uses ``min(r, m, n)``); default 128.
    update_proj_gap: updates between projector refreshes ``T``; default 200.
    scale: ``alpha``, multiplies the back-projected update; default 0.25.
    proj_type: ``std`` (default), ``reverse_std``, ``left``, ``right`` or
      ``full``.
    projector_method: ``svd`` (exact, default) or ``randomized``.
    projector_dtype: ``float32`` (default), ``bfloat16``, ``int8`` or
      ``int4`` projectors.
    stagger_refresh: spread projector refreshes over the window.
    moments: ``keep`` (the reference, default), ``project`` or ``reset``:
      what happens to the moments at a refresh.
    matrix_axes: ``{name: (row_axes, col_axes)}`` for leaves whose matrix
      is not their last two axes.
    seed: seed of the randomized projector's random test matrices (and of
      the random projectors).
    refresh_schedule: ``fixed`` (default) or ``lazy`` (Q-GaLore's
      per-matrix intervals, doubled when successive projectors agree).
    lazy_queue_size: similarities the lazy schedule averages; default 5.
    lazy_threshold: mean similarity that doubles an interval; default 0.4.
    output: what the low-rank result is used for: ``galore`` (default),
      ``fira``, ``apollo_channel`` or ``apollo_tensor``
      (``galore_optax.output_rules``). Set by ``fira_adamw``,
      ``apollo_adamw`` and ``apollo_mini`` themselves.
  """

  rank: int
  update_proj_gap: int
  scale: float
  proj_type: str
  projector_method: str
  projector_dtype: str
  stagger_refresh: bool
  moments: str
  matrix_axes: MatrixAxes | None
  seed: int
  refresh_schedule: str
  lazy_queue_size: int
  lazy_threshold: float
  output: str


def galore_option_defaults() -> dict[str, Any]:
  """Every ``GaLoreOptions`` key with its default, from ``galore_project``.

  Returns:
    A dict from option name to ``galore_project``'s default, in
    ``GaLoreOptions``' order.
  """
  return {p.name: p.default for p in _galore_option_parameters()}


def _galore_option_parameters() -> list[inspect.Parameter]:
  parameters = inspect.signature(galore_project).parameters
  return [parameters[name] for name in GaLoreOptions.__annotations__]


def _lists_galore_options(alias: _Alias,
                          defaults: Mapping[str, Any] | None = None,
                          exclude: tuple[str, ...] = ()) -> _Alias:
  """Gives an alias taking ``**galore_options`` an explicit signature.

  The signature (what ``inspect.signature``, ``help``,
  ``optax.inject_hyperparams`` and ``create_optimizer`` read) lists each
  ``GaLoreOptions`` key as a keyword-only argument with ``galore_project``'s
  default instead of ``**galore_options``; calls still arrive in
  ``**galore_options``.

  Args:
    alias: a factory whose last parameter is ``**galore_options``.
    defaults: the alias' own defaults of some options, shown instead of
      ``galore_project``'s (the alias applies them, see
      ``_with_option_defaults``).
    exclude: options the alias sets itself (not in its signature).

  Returns:
    ``alias``, with ``__signature__`` set.
  """
  defaults = defaults or {}
  signature = inspect.signature(alias)
  own = [p for p in signature.parameters.values()
         if p.kind != inspect.Parameter.VAR_KEYWORD]
  alias.__signature__ = signature.replace(parameters=own + [
      p.replace(default=defaults.get(p.name, p.default))
      for p in _galore_option_parameters() if p.name not in exclude])
  return alias


def _with_option_defaults(**defaults: Any) -> Callable[[_Alias], _Alias]:
  """``_lists_galore_options`` for an alias whose ``defaults`` of some
  options differ from ``galore_project``'s (they are filled in when the
  call does not give them)."""

  def decorate(alias: _Alias) -> _Alias:

    @functools.wraps(alias)
    def with_defaults(*args, **kwargs):
      return alias(*args, **{**defaults, **kwargs})

    return _lists_galore_options(with_defaults, defaults, ("output",))

  return decorate


_Alias = TypeVar("_Alias", bound=Callable[..., Any])


def _check_galore_options(alias: str, options: Mapping[str, Any]) -> None:
  unknown = sorted(set(options) - set(GaLoreOptions.__annotations__))
  if unknown:
    raise TypeError(
        f"{alias}() got unexpected keyword arguments {unknown}; its GaLore "
        f"options are {list(GaLoreOptions.__annotations__)}.")


def _galore_chain(
    make_inner: Callable[[], optax.GradientTransformation],
    *tail: optax.GradientTransformation,
    alias: str,
    target_modules: targets.TargetModules,
    any_matrix: bool,
    options: GaLoreOptions,
    output: str = "galore",
) -> optax.GradientTransformationExtraArgs:
  """Targets get ``galore_project(inner)``, other leaves ``inner`` itself.

  ``tail`` (weight decay, learning rate, sign) then applies to the full-size
  updates of every leaf. Where the learning rate goes depends on the inner
  optimizer: after the projection for Adam, inside ``inner`` for Adafactor.

  Args:
    make_inner: builds the inner optimizer (called once per partition).
    *tail: transformations applied after the partition, to every leaf.
    alias: the alias' name, for error messages.
    target_modules: which leaves are projected (``galore_optax.targets``).
    any_matrix: let ``target_modules`` select non-linear matrices too.
    options: the alias' ``GaLoreOptions``, given to ``galore_project``.
    output: ``galore_project``'s rule for the low-rank result.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    TypeError: for an option that ``GaLoreOptions`` does not declare.
  """
  _check_galore_options(alias, options)
  rule = {} if output == "galore" else {"output": output}
  return optax.chain(
      optax.partition(
          {
              targets.GALORE_LABEL: galore_project(make_inner(), **rule,
                                                   **options),
              targets.FULL_RANK_LABEL: make_inner(),
          },
          targets.galore_labels(target_modules, any_matrix=any_matrix),
      ),
      *tail,
  )


def check_adam_arguments(learning_rate: Any, b1: Any, b2: Any, eps: Any,
                         weight_decay: Any) -> None:
  """Raises a ValueError naming the first bad AdamW hyper-parameter.

  Arrays (hyper-parameters injected by ``optax.inject_hyperparams``) are
  let through.

  Args:
    learning_rate: a schedule or a finite number >= 0.
    b1: Adam's first-moment decay, in ``[0, 1)``.
    b2: Adam's second-moment decay, in ``[0, 1)``.
    eps: a finite number >= 0.
    weight_decay: a finite number >= 0.
  """
  check_learning_rate(learning_rate)
  for name, value in (("b1", b1), ("b2", b2)):
    check_number_in_range(name, value, low=0.0, high=1.0,
                          high_inclusive=False)
  check_number_in_range("eps", eps, low=0.0)
  check_number_in_range("weight_decay", weight_decay, low=0.0)


def _in_incoming_dtypes(
    tx: optax.GradientTransformationExtraArgs,
) -> optax.GradientTransformationExtraArgs:
  """``tx`` whose updates come back in the incoming updates' dtypes.

  The 8-bit aliases compute their updates in float32 (their states
  dequantise to float32) and cast them here, after the learning rate: a
  bfloat16 or float16 parameter gets an update of its own dtype, and 8-bit
  Adam's update before the learning rate (up to ``mu / eps``) never has to
  fit in float16. The state is ``tx``'s.

  Args:
    tx: the whole optimizer.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, state = tx.update(updates, state, params, **extra_args)
    return optax.tree_utils.tree_cast_like(new_updates, updates), state

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def _galore_adam(
    adam: Callable[[], optax.GradientTransformation],
    learning_rate: optax.ScalarOrSchedule, weight_decay: float,
    weight_decay_mask: Any, target_modules: targets.TargetModules,
    any_matrix: bool, alias: str, options: GaLoreOptions,
) -> optax.GradientTransformationExtraArgs:
  """``galore_adamw`` and its 8-bit twin: ``adam`` with AdamW's tail.

  Args:
    adam: builds the (float or 8-bit) Adam run in and outside the subspace.
    learning_rate: a float or an optax schedule.
    weight_decay: decoupled weight decay rate.
    weight_decay_mask: optional mask or mask function for the decay.
    target_modules: which leaves are projected.
    any_matrix: let ``target_modules`` select non-linear matrices too.
    alias: the alias' name, for error messages.
    options: the alias' ``GaLoreOptions``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return _galore_chain(
      adam, optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
      target_modules=target_modules, any_matrix=any_matrix, alias=alias,
      options=options)


@_lists_galore_options
def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    target_modules: targets.TargetModules = None,
    any_matrix: bool = False,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    mu_dtype: Any = None,
    **galore_options: Unpack[GaLoreOptions],
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
    target_modules: which linear weights are projected, by module name, as
      Hugging Face's ``optim_target_modules`` (``galore_optax.targets``);
      ``None`` means every leaf with two or more dimensions.
    any_matrix: let ``target_modules`` also select the matched leaves with
      two or more dimensions that are not linear weights (embeddings).
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to the root of the second moment.
    weight_decay: decoupled weight decay rate.
    weight_decay_mask: optional mask or mask function for the decay.
    mu_dtype: optional dtype of Adam's first moment.
    **galore_options: ``GaLoreOptions`` for ``galore_project`` (``rank``,
      ``update_proj_gap``, ``scale``, ``proj_type``, ...).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Zhao et al., 2024, arXiv 2403.03507.
  """
  check_adam_arguments(learning_rate, b1, b2, eps, weight_decay)
  check_float_dtype("mu_dtype", mu_dtype, allow_none=True)
  adam = lambda: optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)
  return _galore_adam(adam, learning_rate, weight_decay, weight_decay_mask,
                      target_modules, any_matrix, "galore_adamw",
                      galore_options)


def _lr_scaled_weight_decay(
    weight_decay: float, learning_rate: optax.ScalarOrSchedule
) -> optax.ScalarOrSchedule:
  """``weight_decay * lr`` as a constant or, for a schedule, a schedule."""
  if isinstance(weight_decay, (int, float)) and weight_decay == 0:
    return 0.0  # lets optax skip the decay (and keep no count)
  if callable(learning_rate):
    return lambda count: weight_decay * learning_rate(count)
  return weight_decay * learning_rate


@_lists_galore_options
def galore_adafactor(
    learning_rate: optax.ScalarOrSchedule,
    *,
    target_modules: targets.TargetModules = None,
    any_matrix: bool = False,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    beta1: float | None = None,
    decay_rate: float = -0.8,
    eps: float = 1e-30,
    clip_threshold: float = 1.0,
    **galore_options: Unpack[GaLoreOptions],
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
    learning_rate: a float or an optax schedule, applied inside Adafactor
      (before its first-moment average and the back-projection).
    target_modules: which linear weights are projected, by module name, as
      Hugging Face's ``optim_target_modules`` (``galore_optax.targets``);
      ``None`` means every leaf with two or more dimensions.
    any_matrix: let ``target_modules`` also select the matched leaves with
      two or more dimensions that are not linear weights (embeddings).
    weight_decay: decay rate, multiplied by the learning rate.
    weight_decay_mask: optional mask or mask function for the decay.
    beta1: first-moment decay, or ``None`` (the default) for none.
    decay_rate: second-moment decay exponent, ``beta2_t = 1 - t **
      decay_rate``.
    eps: added to the squared gradient (Hugging Face's ``eps[0]``; its
      ``eps[1]`` only matters with ``scale_parameter=True``).
    clip_threshold: largest RMS of each update matrix before the learning
      rate.
    **galore_options: ``GaLoreOptions`` for ``galore_project`` (``rank``,
      ``update_proj_gap``, ``scale``, ``proj_type``, ...).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Zhao et al., 2024, arXiv 2403.03507; Shazeer and Stern, 2018,
    arXiv 1804.04235.
  """
  check_learning_rate(learning_rate)
  check_number_in_range("weight_decay", weight_decay, low=0.0)
  return _galore_chain(
      lambda: scale_by_adafactor(learning_rate, beta1=beta1,
                                 decay_rate=decay_rate, eps=eps,
                                 clip_threshold=clip_threshold),
      optax.add_decayed_weights(
          _lr_scaled_weight_decay(weight_decay, learning_rate),
          weight_decay_mask),
      optax.scale(-1.0),  # scale_by_adafactor's update is not negated
      target_modules=target_modules,
      any_matrix=any_matrix,
      alias="galore_adafactor",
      options=galore_options,
  )


@_lists_galore_options
def galore_adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    *,
    block_size: int = 256,
    min_size: int = 4096,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    target_modules: targets.TargetModules = None,
    any_matrix: bool = False,
    **galore_options: Unpack[GaLoreOptions],
) -> optax.GradientTransformationExtraArgs:
  """GaLore AdamW with 8-bit moments: ``galore_adamw`` + ``adamw_8bit``.

  Target leaves run ``galore_project(quantize_state_8bit(scale_by_adam))``:
  the low-rank moments are stored in 8 bits when the *projected* leaf has at
  least ``min_size`` elements, as ``galore_torch.GaLoreAdamW8bit`` does.
  Other leaves run 8-bit AdamW at full size. ``projector_dtype="int8"``
  also stores the projectors in 8 bits. Full-size updates are computed in
  float32 and returned in the gradients' dtype.

  Args:
    learning_rate: a float or an optax schedule.
    block_size: values per float32 scale of the 8-bit states, a power of
      two from 8 to 2**24.
    min_size: smaller state leaves stay float32.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: decoupled weight decay rate.
    weight_decay_mask: optional mask or mask function for the decay.
    target_modules: which linear weights are projected, by module name, as
      Hugging Face's ``optim_target_modules`` (``galore_optax.targets``);
      ``None`` means every leaf with two or more dimensions.
    any_matrix: let ``target_modules`` also select the matched leaves with
      two or more dimensions that are not linear weights (embeddings).
    **galore_options: ``GaLoreOptions`` for ``galore_project`` (``rank``,
      ``update_proj_gap``, ``scale``, ``proj_type``, ...).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Zhao et al., 2024, arXiv 2403.03507; Dettmers et al., 2022,
    arXiv 2110.02861.
  """
  check_adam_arguments(learning_rate, b1, b2, eps, weight_decay)
  adam_8bit = lambda: quantize_state_8bit(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps), block_size=block_size,
      min_size=min_size, update_dtype=jnp.float32)
  return _in_incoming_dtypes(_galore_adam(
      adam_8bit, learning_rate, weight_decay, weight_decay_mask,
      target_modules, any_matrix, "galore_adamw_8bit", galore_options))


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
  for the second) with one float32 scale per ``block_size`` values. Updates
  are computed in float32 and returned in the gradients' dtype.

  Args:
    learning_rate: a float or an optax schedule.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: decoupled weight decay rate.
    weight_decay_mask: optional mask or mask function for the decay.
    block_size: values per float32 scale, a power of two from 8 to 2**24.
    min_size: smaller state leaves stay float32.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR
    2022, arXiv 2110.02861.
  """
  check_adam_arguments(learning_rate, b1, b2, eps, weight_decay)
  return _in_incoming_dtypes(optax.chain(
      quantize_state_8bit(optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                          block_size=block_size, min_size=min_size,
                          update_dtype=jnp.float32),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  ))


def _split_adam_chain(
    adam: Callable[[], optax.GradientTransformation], output: str,
    learning_rate: optax.ScalarOrSchedule, b1: float, b2: float,
    weight_decay: float, weight_decay_mask: Any,
    target_modules: targets.TargetModules, any_matrix: bool, alias: str,
    options: GaLoreOptions,
) -> optax.GradientTransformationExtraArgs:
  """Fira and APOLLO: ``adam`` (uncorrected) in and outside the subspace,
  rule ``output`` for the targets, then Adam's bias correction, decoupled
  weight decay and the learning rate (see ``galore_optax.split_adam``).

  Args:
    adam: builds the (float or 8-bit) uncorrected Adam.
    output: ``galore_project``'s rule for the targets.
    learning_rate: a float or an optax schedule.
    b1: Adam's first-moment decay (for the bias correction).
    b2: Adam's second-moment decay (for the bias correction).
    weight_decay: decoupled weight decay rate.
    weight_decay_mask: optional mask or mask function for the decay.
    target_modules: which leaves are projected.
    any_matrix: let ``target_modules`` select non-linear matrices too.
    alias: the alias' name, for error messages.
    options: the alias' ``GaLoreOptions``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose updates come back in
    the incoming updates' dtypes.
  """
  if "output" in options:
    raise TypeError(f"{alias}() sets galore_project's output itself "
                    f"({output!r}); got output={options['output']!r}.")
  return _in_incoming_dtypes(_galore_chain(
      adam, scale_by_adam_bias_correction(b1, b2),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
      target_modules=target_modules, any_matrix=any_matrix, alias=alias,
      options=options, output=output))


def _uncorrected_adam(b1: float, b2: float, eps: float, block_size: int,
                      min_size: int, state_8bit: bool
                      ) -> Callable[[], optax.GradientTransformation]:
  """Builds ``scale_by_uncorrected_adam``, 8-bit if ``state_8bit``."""
  if not state_8bit:
    return lambda: scale_by_uncorrected_adam(b1=b1, b2=b2, eps=eps)
  return lambda: quantize_state_8bit(
      scale_by_uncorrected_adam(b1=b1, b2=b2, eps=eps),
      block_size=block_size, min_size=min_size, update_dtype=jnp.float32)


@_with_option_defaults()
def fira_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    target_modules: targets.TargetModules = None,
    any_matrix: bool = False,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    state_8bit: bool = False,
    block_size: int = 256,
    min_size: int = 4096,
    **galore_options: Unpack[GaLoreOptions],
) -> optax.GradientTransformationExtraArgs:
  """Fira: GaLore AdamW plus the scaled residual of the gradient.

  Target leaves get ``galore_project(scale_by_uncorrected_adam(...),
  output="fira")`` (see ``galore_optax.fira``): the back-projected Adam
  update times ``scale``, plus the gradient's residual ``G - scale * P P^T
  G`` scaled per channel by ``||N|| / ||P^T G||`` through the norm-growth
  limiter. Other leaves get plain Adam. Adam's bias correction multiplies
  the whole update after the limiter, as in ``fira.FiraAdamW`` (see
  ``galore_optax.split_adam``); weight decay is decoupled.

  Args:
    learning_rate: a float or an optax schedule.
    target_modules: which leaves are projected; ``None`` means every leaf
      with two or more dimensions.
    any_matrix: let ``target_modules`` select non-linear matrices too
      (embeddings, other matrices; see ``galore_optax.targets``).
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to the root of the uncorrected second moment.
    weight_decay: decoupled weight decay rate.
    weight_decay_mask: optional mask or mask function for the decay.
    state_8bit: store Adam's moments in 8 bits (``quantize_state_8bit``).
    block_size: with ``state_8bit``, values per float32 scale.
    min_size: with ``state_8bit``, smaller state leaves stay float32.
    **galore_options: ``GaLoreOptions`` for ``galore_project`` (``rank``,
      ``update_proj_gap``, ``scale``, ``proj_type``, ...).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint?", arXiv 2410.01623.
  """
  check_adam_arguments(learning_rate, b1, b2, eps, weight_decay)
  return _split_adam_chain(
      _uncorrected_adam(b1, b2, eps, block_size, min_size, state_8bit),
      "fira", learning_rate, b1, b2, weight_decay, weight_decay_mask,
      target_modules, any_matrix, "fira_adamw", galore_options)


@_with_option_defaults(scale=1.0, projector_method="random")
def apollo_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    target_modules: targets.TargetModules = None,
    any_matrix: bool = False,
    scale_type: str = "channel",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    state_8bit: bool = False,
    block_size: int = 256,
    min_size: int = 4096,
    **galore_options: Unpack[GaLoreOptions],
) -> optax.GradientTransformationExtraArgs:
  """APOLLO: AdamW whose step sizes come from a random low-rank Adam.

  Target leaves get ``galore_project(scale_by_uncorrected_adam(...),
  output="apollo_" + scale_type)`` (see ``galore_optax.apollo``): Adam runs
  on the randomly projected gradient (``projector_method="random"`` by
  default, no SVD; ``"svd"`` is the reference's ``proj="svd"``) only to
  scale the raw gradient per channel or per matrix, through the norm-growth
  limiter, times ``sqrt(scale)``. Other leaves get plain Adam. Defaults are
  Hugging Face's ``apollo_adamw`` (rank 128, gap 200, scale 1.0, channel);
  bias correction and decay as in ``apollo_torch.APOLLOAdamW``.

  Args:
    learning_rate: a float or an optax schedule.
    target_modules: which leaves are projected; ``None`` means every leaf
      with two or more dimensions.
    any_matrix: let ``target_modules`` select non-linear matrices too
      (embeddings, other matrices; see ``galore_optax.targets``).
    scale_type: ``"channel"`` (APOLLO) or ``"tensor"`` (APOLLO-Mini).
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to the root of the uncorrected second moment.
    weight_decay: decoupled weight decay rate.
    weight_decay_mask: optional mask or mask function for the decay.
    state_8bit: store Adam's moments in 8 bits (``quantize_state_8bit``).
    block_size: with ``state_8bit``, values per float32 scale.
    min_size: with ``state_8bit``, smaller state leaves stay float32.
    **galore_options: ``GaLoreOptions`` for ``galore_project`` (``rank``,
      ``update_proj_gap``, ``scale``, ``proj_type``, ...), with defaults
      ``scale=1.0`` and ``projector_method="random"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance",
    arXiv 2412.05270.
  """
  check_choice("scale_type", scale_type, apollo.SCALE_TYPES)
  check_adam_arguments(learning_rate, b1, b2, eps, weight_decay)
  return _split_adam_chain(
      _uncorrected_adam(b1, b2, eps, block_size, min_size, state_8bit),
      "apollo_" + scale_type, learning_rate, b1, b2, weight_decay,
      weight_decay_mask, target_modules, any_matrix, "apollo_adamw",
      galore_options)


@_with_option_defaults(rank=1, scale=128.0, projector_method="random")
def apollo_mini(
    learning_rate: optax.ScalarOrSchedule,
    *,
    target_modules: targets.TargetModules = None,
    any_matrix: bool = False,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    state_8bit: bool = False,
    block_size: int = 256,
    min_size: int = 4096,
    **galore_options: Unpack[GaLoreOptions],
) -> optax.GradientTransformationExtraArgs:
  """APOLLO-Mini: ``apollo_adamw`` with rank 1, one factor per matrix.

  The paper's settings: ``rank=1``, ``scale=128`` (a factor
  ``sqrt(128)``), ``scale_type="tensor"``, a random projection. Its
  low-rank state is two vectors per matrix.

  Args:
    learning_rate: a float or an optax schedule.
    target_modules: which leaves are projected; ``None`` means every leaf
      with two or more dimensions.
    any_matrix: let ``target_modules`` select non-linear matrices too
      (embeddings, other matrices; see ``galore_optax.targets``).
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: decoupled weight decay rate.
    weight_decay_mask: optional mask or mask function for the decay.
    state_8bit: store Adam's moments in 8 bits (``quantize_state_8bit``;
      it matters for the full-size leaves, the rank-1 ones are small).
    block_size: with ``state_8bit``, values per float32 scale.
    min_size: with ``state_8bit``, smaller state leaves stay float32.
    **galore_options: ``GaLoreOptions`` for ``galore_project``, with
      defaults ``rank=1``, ``scale=128.0``, ``projector_method="random"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Zhu et al., 2024, arXiv 2412.05270 (APOLLO-Mini).
  """
  check_adam_arguments(learning_rate, b1, b2, eps, weight_decay)
  return _split_adam_chain(
      _uncorrected_adam(b1, b2, eps, block_size, min_size, state_8bit),
      "apollo_tensor", learning_rate, b1, b2, weight_decay,
      weight_decay_mask, target_modules, any_matrix, "apollo_mini",
      galore_options)
