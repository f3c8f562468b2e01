"""Which parameters are this rank's shard of a whole weight, and which are replicated over sp."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["mark_sharded", "is_sharded"]


def mark_sharded(param: nn.Parameter) -> nn.Parameter:
    """Mark a parameter as this rank's shard of a whole weight: its gradient is complete on this
    rank. Unmarked parameters are replicated over the sp group and their gradients are summed
    over it by the engine."""
    param.sp_sharded = True
    return param


def is_sharded(param: Tensor) -> bool:
    return bool(getattr(param, "sp_sharded", False))
