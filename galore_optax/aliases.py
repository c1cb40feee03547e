"""Ready optimizers: chains of ``galore_project`` and optax primitives.

References:
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
  Projection", ICML 2024, arXiv 2403.03507.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from galore_optax import targets
from galore_optax.transform import galore_project


def _galore_chain(
    make_inner: Callable[[], optax.GradientTransformation],
    learning_rate: optax.ScalarOrSchedule,
    *,
    target_modules: targets.TargetModules,
    weight_decay: float,
    weight_decay_mask: Any,
    **galore_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """Targets get ``galore_project(inner)``, other leaves ``inner`` itself.

  Weight decay is decoupled and applies to the full weights of every leaf
  (or those in ``weight_decay_mask``), then the learning rate scales all.
  """
  return optax.chain(
      optax.partition(
          {
              targets.GALORE_LABEL: galore_project(make_inner(),
                                                   **galore_kwargs),
              targets.FULL_RANK_LABEL: make_inner(),
          },
          targets.galore_labels(target_modules),
      ),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    target_modules: targets.TargetModules = None,
    weight_decay_mask: Any = None,
    mu_dtype: Any = None,
    projector_method: str = "svd",
    projector_dtype: str = "float32",
    stagger_refresh: bool = False,
    seed: int = 0,
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
    rank: GaLore rank ``r`` (each matrix uses ``min(r, m, n)``).
    update_proj_gap: updates between projector refreshes ``T``.
    scale: ``alpha``, multiplies the back-projected update.
    proj_type: ``std``, ``reverse_std``, ``left``, ``right`` or ``full``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to the root of the second moment.
    weight_decay: decoupled weight decay rate.
    target_modules: which leaves are projected; ``None`` means every leaf
      with two or more dimensions.
    weight_decay_mask: optional mask or mask function for the decay.
    mu_dtype: optional dtype of Adam's first moment.
    projector_method: ``svd`` (exact) or ``randomized``.
    projector_dtype: ``float32`` or ``bfloat16`` projector storage.
    stagger_refresh: spread projector refreshes over the window.
    seed: seed of the randomized projector's keys.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Zhao et al., 2024, arXiv 2403.03507.
  """
  return _galore_chain(
      lambda: optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype),
      learning_rate,
      target_modules=target_modules,
      weight_decay=weight_decay,
      weight_decay_mask=weight_decay_mask,
      rank=rank,
      update_proj_gap=update_proj_gap,
      scale=scale,
      proj_type=proj_type,
      projector_method=projector_method,
      projector_dtype=projector_dtype,
      stagger_refresh=stagger_refresh,
      seed=seed,
  )


