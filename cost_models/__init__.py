"""Hybrid time and memory cost models (DESIGN 6): analytic counts with profiled coefficients.

Pure Python; imports nothing of this project's and no torch.distributed (its profiler module,
when it exists, may import torch and parallel_lib)."""

__all__: list[str] = []
