"""The strategy registry: a name -> a strategy object with supports(), attention(), mlp()."""

from __future__ import annotations

from .base import RECOMPUTE_MODES, Strategy
from .local import LocalStrategy
from .metp import MemoryEfficientTP
from .ring import RingAttention
from .tp_sp import TensorSequenceParallel
from .ulysses import Ulysses
from .usp import UnifiedSequenceParallel

__all__ = [
    "STRATEGY_NAMES",
    "RECOMPUTE_MODES",
    "Strategy",
    "get_strategy",
]

_REGISTRY: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        LocalStrategy,
        TensorSequenceParallel,
        Ulysses,
        RingAttention,
        UnifiedSequenceParallel,
        MemoryEfficientTP,
    )
}

STRATEGY_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_strategy(name: str, **options) -> Strategy:
    """A new strategy object; options: attn_backend ("auto", "cpu_flash", "cuda_flash",
    "reference") for every strategy, inner (u) for usp."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGY_NAMES)}")
    return _REGISTRY[name](**options)
