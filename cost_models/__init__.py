"""Hybrid time and memory cost models (DESIGN 6): analytic counts with profiled coefficients.

Pure Python: imports nothing of this project's and no torch. The measuring modules, the entry
points `python -m cost_models.profile` and `python -m cost_models.validate` (they run
`parallel_lib.decoder_layer_step`), their timing (`cost_models.timing`) and the start-up check of
a cached profile (`cost_models.profile_check`), import torch and parallel_lib; nothing here
imports them.
"""

from .counts import (
    RECOMPUTE_MODES,
    STRATEGIES,
    LayerCounts,
    attention_flops,
    comm_bytes,
    layer_counts,
    layer_flops,
)
from .hardware import PRESETS, Hardware, Link, detect, get_preset
from .memory import LayerMemory, layer_memory
from .model import Cost, CostModel, StepCost
from .moe_costs import MoeLoads, moe_comm_bytes, moe_layer_counts
from .moe_memory import moe_layer_memory
from .profile_data import Profile, ProfileError
from .static import (
    LOGITS_CHUNK,
    StaticMemory,
    layer_parameters,
    logits_bytes,
    moe_layer_parameters,
    static_memory,
)

__all__ = [
    "LOGITS_CHUNK",
    "PRESETS",
    "RECOMPUTE_MODES",
    "STRATEGIES",
    "Cost",
    "CostModel",
    "Hardware",
    "LayerCounts",
    "LayerMemory",
    "Link",
    "MoeLoads",
    "Profile",
    "ProfileError",
    "StaticMemory",
    "StepCost",
    "attention_flops",
    "comm_bytes",
    "detect",
    "get_preset",
    "layer_counts",
    "layer_flops",
    "layer_memory",
    "layer_parameters",
    "logits_bytes",
    "moe_comm_bytes",
    "moe_layer_counts",
    "moe_layer_memory",
    "moe_layer_parameters",
    "static_memory",
]
