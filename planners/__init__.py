"""Layer-wise strategy and recompute selection per micro-batch (DESIGN 7). Pure Python/numpy.

`choose(time, mem, transient, budget, method)` is the pure core: an option index per layer that
minimises total time with sum(mem) + max(transient) <= budget. `Planner` wraps it with the cost
model, the options the strategies support, a plan cache and hysteresis, and returns `Plan`s;
`PlanningSetup` is the one way to build planners for a model on a machine.
"""

from .build import PlanningSetup
from .choose import METHODS, choose, parse_option_label
from .method import Method
from .options import CostTables, LayerCosts, Option, config_supports, enumerate_options
from .planner import HYSTERESIS, Plan, Planner
from .problem import InfeasibleError, plan_memory, plan_time
from .units import format_bytes, parse_bytes

__all__ = [
    "HYSTERESIS",
    "METHODS",
    "CostTables",
    "InfeasibleError",
    "LayerCosts",
    "Method",
    "Option",
    "Plan",
    "Planner",
    "PlanningSetup",
    "choose",
    "config_supports",
    "enumerate_options",
    "format_bytes",
    "parse_bytes",
    "parse_option_label",
    "plan_memory",
    "plan_time",
]
