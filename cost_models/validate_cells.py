"""What `cost_models.validate` and `cost_models.validate_groups` measure and compare: the cell of
one strategy x recompute x token count, the batch's lengths, the measured and predicted peaks.
Imports torch (it measures), like `cost_models.validate`.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._tools.mem_tracker import MemTracker

from parallel_lib import LayerWeights

__all__ = ["Cell", "batch_lengths", "largest", "measured_peak", "predicted_peak"]


@dataclass
class Cell:
    strategy: str
    recompute: str
    tokens: int
    measured_s: float
    predicted_s: float
    measured_bytes: int
    predicted_bytes: int
    trainable: bool = True
    """False: a frozen layer (its weights get no gradient)."""

    @property
    def time_error(self) -> float:
        return abs(self.predicted_s - self.measured_s) / self.measured_s

    @property
    def memory_error(self) -> float:
        return abs(self.predicted_bytes - self.measured_bytes) / self.measured_bytes


def batch_lengths(tokens: int, sequences: int) -> list[int]:
    """Uneven lengths summing to `tokens`: sequence i gets a share proportional to i + 1."""
    weights = list(range(1, sequences + 1))
    lens = [max(1, tokens * w // sum(weights)) for w in weights]
    lens[-1] += tokens - sum(lens)
    return lens


def measured_peak(step, weights: LayerWeights, x, dy, device) -> int:
    """Peak bytes over one step, with the gradients already allocated (steady state), counting
    the weights, their gradients, x and dy: torch.cuda.max_memory_allocated on CUDA, MemTracker's
    peak elsewhere (DESIGN 6)."""
    step().backward(dy)
    gc.collect()
    if device.type == "cuda":
        held = sum(t.numel() * t.element_size() for t in (*weights.tensors(), x, dy))
        held += sum(t.grad.numel() * t.grad.element_size() for t in _with_grads(weights))
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step().backward(dy)
        return torch.cuda.max_memory_allocated(device) - before + held
    tracker = MemTracker()
    tracker.track_external(*weights.tensors(), *(t.grad for t in _with_grads(weights)), x, dy)
    with tracker:
        step().backward(dy)
    return tracker.get_tracker_snapshot("peak")[device]["Total"]


def _with_grads(weights: LayerWeights) -> list:
    return [t for t in weights.tensors() if t.grad is not None]


def predicted_peak(cost, weights: LayerWeights, x) -> int:
    """Weights, their gradients (none when frozen), the input and its gradient, plus the
    layer's worst moment."""
    held = sum(t.numel() * t.element_size() for t in weights.tensors())
    grads = sum(t.numel() * t.element_size() for t in weights.tensors() if t.requires_grad)
    io = 2 * x.numel() * x.element_size()
    return held + grads + io + max(cost.forward_peak_bytes, cost.backward_peak_bytes)


def largest(value: int, device) -> int:
    """The largest value over the ranks (a MoE layer's peak depends on its rank's routing)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
