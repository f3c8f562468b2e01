"""One cost description per strategy of `parallel_lib`, registered by name (DESIGN 5, 6).

A new strategy is one new `StrategyCost` subclass here, added to `STRATEGY_COSTS` in the order of
`parallel_lib.STRATEGY_NAMES`; the counts, memory replay and pricing ask it. Pure Python.
"""

from __future__ import annotations

from .base import StrategyCost, Traffic
from .local import LocalCost
from .metp import MetpCost
from .tp_sp import TensorSequenceParallelCost
from .zero3 import RingCost, UlyssesCost, UspCost, Zero3Cost

__all__ = [
    "STRATEGY_COSTS",
    "StrategyCost",
    "Traffic",
    "Zero3Cost",
    "strategy_cost",
]

STRATEGY_COSTS: dict[str, StrategyCost] = {
    cost.name: cost
    for cost in (
        LocalCost(),
        TensorSequenceParallelCost(),
        UlyssesCost(),
        RingCost(),
        UspCost(),
        MetpCost(),
    )
}


def strategy_cost(name: str) -> StrategyCost:
    """The description of strategy `name`; ValueError, one line, for an unknown name."""
    cost = STRATEGY_COSTS.get(name) if isinstance(name, str) else None
    if cost is None:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGY_COSTS)}")
    return cost
