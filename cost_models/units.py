"""The units every count is in: bytes per element of a dtype, and a sequence's padded length in
the unified layout. Pure Python; `cost_models.counts` re-exports these names."""

from __future__ import annotations

__all__ = ["dtype_name", "itemsize", "accumulator_itemsize", "pad_length"]

_ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


def dtype_name(dtype) -> str:
    """'float32' for torch.float32, 'torch.float32' or 'float32'."""
    name = str(dtype).removeprefix("torch.")
    if name not in _ITEMSIZE:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(_ITEMSIZE)}")
    return name


def itemsize(dtype) -> int:
    return _ITEMSIZE[dtype_name(dtype)]


def accumulator_itemsize(dtype) -> int:
    """Bytes of the float32 (float64 for float64) sums: LSE, ring K/V-gradient accumulators."""
    return 8 if dtype_name(dtype) == "float64" else 4


def pad_length(length: int, P: int) -> int:
    """A sequence's length in the unified layout: rounded up to a multiple of 2P."""
    if length <= 0:
        raise ValueError(f"sequence lengths must be positive, got {length}")
    return -(-length // (2 * P)) * (2 * P)
