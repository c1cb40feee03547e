"""galore-optax: GaLore low-rank gradient projection for Optax and Flax.

References:
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
  Projection", ICML 2024, arXiv 2403.03507.
"""

import importlib
from typing import Any

from galore_optax import adafactor
from galore_optax import layerwise
from galore_optax import names
from galore_optax import projection
from galore_optax import quantization
from galore_optax import targets
from galore_optax import weight_quantization
from galore_optax.adafactor import ScaleByFactoredRmsHfState
from galore_optax.adafactor import clip_by_matrix_rms
from galore_optax.adafactor import scale_by_adafactor
from galore_optax.adafactor import scale_by_factored_rms_hf
from galore_optax.aliases import adamw_8bit
from galore_optax.aliases import apollo_adamw
from galore_optax.aliases import apollo_mini
from galore_optax.aliases import fira_adamw
from galore_optax.aliases import galore_adafactor
from galore_optax.aliases import galore_adamw
from galore_optax.aliases import galore_adamw_8bit
from galore_optax.accounting import optimizer_state_bytes
from galore_optax.names import OPTIMIZER_NAMES
from galore_optax.names import create_optimizer
from galore_optax.names import optimizer_arguments
from galore_optax.names import parse_optim_args
from galore_optax.names import parse_optimizer_name
from galore_optax.projection import PROJ_TYPES
from galore_optax.projection import PROJECTOR_METHODS
from galore_optax.projection import Projector
from galore_optax.state_8bit import QuantizedState
from galore_optax.state_8bit import quantize_state_8bit
from galore_optax.targets import galore_labels
from galore_optax.targets import path_to_name
from galore_optax.targets import target_mask
from galore_optax.output_rules import OUTPUT_RULES
from galore_optax.split_adam import scale_by_adam_bias_correction
from galore_optax.split_adam import scale_by_uncorrected_adam
from galore_optax.transform import MOMENT_POLICIES
from galore_optax.transform import GaLoreState
from galore_optax.transform import galore_project

__version__ = "0.1.0"

# Command-line modules, imported on first use: importing them with the package
# would make ``python -m galore_optax.memory`` warn that the module was already
# imported before it ran.
_COMMAND_MODULES = ("cli", "memory")


def __getattr__(name: str) -> Any:
  """``galore_optax.memory`` and ``galore_optax.cli`` without an import."""
  if name in _COMMAND_MODULES:
    return importlib.import_module(f"galore_optax.{name}")
  raise AttributeError(f"module 'galore_optax' has no attribute {name!r}")


__all__ = (
    "GaLoreState",
    "MOMENT_POLICIES",
    "OPTIMIZER_NAMES",
    "OUTPUT_RULES",
    "apollo_adamw",
    "apollo_mini",
    "fira_adamw",
    "scale_by_adam_bias_correction",
    "scale_by_uncorrected_adam",
    "ScaleByFactoredRmsHfState",
    "adafactor",
    "clip_by_matrix_rms",
    "create_optimizer",
    "galore_adafactor",
    "names",
    "optimizer_arguments",
    "optimizer_state_bytes",
    "parse_optim_args",
    "parse_optimizer_name",
    "scale_by_adafactor",
    "scale_by_factored_rms_hf",
    "QuantizedState",
    "adamw_8bit",
    "galore_adamw_8bit",
    "projection",
    "quantization",
    "quantize_state_8bit",
    "targets",
    "PROJECTOR_METHODS",
    "PROJ_TYPES",
    "Projector",
    "galore_adamw",
    "galore_labels",
    "galore_project",
    "layerwise",
    "path_to_name",
    "target_mask",
    "weight_quantization",
)
