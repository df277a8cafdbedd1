"""Residual-Guided Fine-Tuning (RGFT) for JAX."""

from rgft_jax._adam import ScaleByAdamPerEntryState
from rgft_jax._adam import scale_by_adam_per_entry
from rgft_jax._budget import Budget
from rgft_jax._budget import DetachCosts
from rgft_jax._budget import best_within
from rgft_jax._budget import detach_costs
from rgft_jax._components import Components
from rgft_jax._costs import compiled_cost
from rgft_jax._costs import flops_of
from rgft_jax._costs import peak_bytes
from rgft_jax._peers import FreezeCosts
from rgft_jax._peers import dropbp_rates
from rgft_jax._peers import dropbp_sensitivity
from rgft_jax._peers import freeze_costs
from rgft_jax._peers import freeze_step
from rgft_jax._peers import greentrainer_importance
from rgft_jax._peers import greentrainer_select
from rgft_jax._peers import tensor_order
from rgft_jax._plan import Plan
from rgft_jax._schedules import linear_threshold
from rgft_jax._sparse import SparseTrainStep
from rgft_jax._sparse import StepVariants
from rgft_jax._sparse import detachable_step
from rgft_jax._sparse import hold_masked
from rgft_jax._sparse import hold_skipped

# Deprecated alias of detachable_step for one release; left out of __all__ (a
# star import would shadow the caller's own train_step).
from rgft_jax._sparse import train_step as train_step
from rgft_jax._tracker import ErrorTracker
from rgft_jax._transform import ScaleByResidualErrorState
from rgft_jax._transform import residual_error_state
from rgft_jax._transform import rgft
from rgft_jax._transform import scale_by_residual_error

__version__ = "0.1.0"

__all__ = (
  "Budget",
  "Components",
  "DetachCosts",
  "ErrorTracker",
  "FreezeCosts",
  "Plan",
  "ScaleByAdamPerEntryState",
  "ScaleByResidualErrorState",
  "SparseTrainStep",
  "StepVariants",
  "best_within",
  "compiled_cost",
  "detach_costs",
  "detachable_step",
  "dropbp_rates",
  "dropbp_sensitivity",
  "flops_of",
  "freeze_costs",
  "freeze_step",
  "greentrainer_importance",
  "greentrainer_select",
  "hold_masked",
  "hold_skipped",
  "linear_threshold",
  "peak_bytes",
  "residual_error_state",
  "rgft",
  "scale_by_adam_per_entry",
  "scale_by_residual_error",
  "tensor_order",
)
