"""Gradient reduction and AdamW over flat per-unit buffers (fp32 master weights, optional ZeRO-1).

The parameters of each unit (one switchable layer, or everything else) are views into one flat
buffer, and so are their gradients: autograd accumulates micro-batches in place, and each
reduction is one collective per unit. Within a buffer the sp-sharded parameters come first and
the replicated ones last, so the replicated tail is summed over sp with one all-reduce and the
two regions get their own weight decay (matrices decayed, norms not).

Data parallelism sums gradients over dp: an all-reduce, or with `shard_optimizer` a
reduce-scatter, after which each dp rank updates its 1/dp slice of the flat buffer (its AdamW
state is 1/dp) and the slices are all-gathered back. 16-bit parameters keep float32 master
weights; float32 parameters are their own masters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from parallel_lib import CommGroup, all_reduce_

from .model import is_sharded

__all__ = ["OptimConfig", "FlatUnit", "UnitOptimizer", "learning_rate"]


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its schedule."""

    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr * min_lr_ratio."""
    warmup_steps: int = 2
    """Linear warm-up steps from lr / (warmup_steps + 1)."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Decoupled weight decay of the sp-sharded parameters (matrices, embeddings); replicated
    ones (norm weights, a custom model's unmarked parameters) are not decayed."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    shard_optimizer: bool = False
    """ZeRO-1: AdamW state and master weights sharded over dp."""

    def __post_init__(self) -> None:
        checks = (
            ("lr", 0 < self.lr < math.inf),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1),
            ("warmup_steps", self.warmup_steps >= 0),
            ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)),
            ("eps", self.eps > 0),
            ("weight_decay", self.weight_decay >= 0),
            ("grad_clip", self.grad_clip >= 0),
        )
        for name, ok in checks:
            if not ok:
                raise ValueError(f"optim.{name} is out of range: {getattr(self, name)!r}")


def learning_rate(config: OptimConfig, step: int, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at `total_steps` (step from 0)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / (config.warmup_steps + 1)
    span = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class FlatUnit:
    """The parameters of one unit as views into a flat buffer, with a flat gradient buffer.

    Layout: [sharded params | replicated params | padding to a multiple of dp]."""

    def __init__(self, name: str, params: Sequence[nn.Parameter], dp: int) -> None:
        if not params:
            raise ValueError(f"unit {name} has no parameters")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(f"unit {name}: parameters must share dtype and device, got {dtypes}")
        ordered = [p for p in params if is_sharded(p)] + [p for p in params if not is_sharded(p)]
        self.name, self.params = name, ordered
        self.sharded_numel = sum(p.numel() for p in ordered if is_sharded(p))
        self.numel = sum(p.numel() for p in ordered)
        padded = -(-self.numel // dp) * dp
        kw = {"dtype": ordered[0].dtype, "device": ordered[0].device}
        self.data = torch.zeros(padded, **kw)
        self.grad = torch.zeros(padded, **kw)
        offset = 0
        with torch.no_grad():
            for p in ordered:
                n = p.numel()
                self.data[offset : offset + n].copy_(p.detach().reshape(-1))
                p.data = self.data[offset : offset + n].view_as(p)
                p.grad = self.grad[offset : offset + n].view_as(p)
                offset += n

    @property
    def regions(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(start, end) of the sharded and of the replicated parameters in the flat buffer."""
        return (0, self.sharded_numel), (self.sharded_numel, self.numel)

    def set_trainable(self, trainable: bool) -> None:
        for p in self.params:
            p.requires_grad_(trainable)

    def zero_grad(self) -> None:
        self.grad.zero_()


class UnitOptimizer:
    """AdamW for one FlatUnit on this dp rank's slice (all of it without ZeRO-1).

    `reduce()` sums the gradient over sp (replicated region) and dp; `square_norms()` gives the
    slice's squared gradient norm by region for global clipping; `step()` updates the slice and
    brings every dp rank's parameters up to date."""

    def __init__(
        self,
        unit: FlatUnit,
        config: OptimConfig,
        *,
        sp_group: CommGroup,
        dp_group: CommGroup,
    ) -> None:
        self.unit, self.config = unit, config
        self.sp_group, self.dp_group = sp_group, dp_group
        dp, rank = dp_group.size, dp_group.rank
        self.sharded = config.shard_optimizer and dp > 1
        size = unit.data.numel() // dp if self.sharded else unit.data.numel()
        self.start = rank * size if self.sharded else 0
        self.stop = self.start + size
        self.separate_master = unit.data.dtype != torch.float32
        self.master = (
            unit.data[self.start : self.stop].float()
            if self.separate_master
            else unit.data[self.start : self.stop]
        )
        self.shard_grad = torch.zeros_like(self.master) if self.sharded else None
        self.pieces = self._pieces()
        groups = []
        for (lo, hi), decay in self.pieces:
            param = nn.Parameter(self.master[lo - self.start : hi - self.start], requires_grad=True)
            groups.append({"params": [param], "weight_decay": config.weight_decay * decay})
        self.optim_params = [g["params"][0] for g in groups]
        self.optimizer = torch.optim.AdamW(
            groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=True
        )

    def _pieces(self) -> list[tuple[tuple[int, int], float]]:
        """This slice cut at the region boundary: ((start, end), 1 for decayed / 0 for not)."""
        pieces = []
        for (lo, hi), decay in zip(self.unit.regions, (1.0, 0.0), strict=True):
            lo, hi = max(lo, self.start), min(hi, self.stop)
            if hi > lo:
                pieces.append(((lo, hi), decay))
        return pieces

    # ------------------------------------------------------------------ gradients
    def reduce(self) -> None:
        """Sum over sp (replicated parameters) and over dp (every parameter)."""
        unit = self.unit
        (_, _), (rep_lo, rep_hi) = unit.regions
        if self.sp_group.size > 1 and rep_hi > rep_lo:
            all_reduce_(unit.grad[rep_lo:rep_hi], self.sp_group)
        if self.dp_group.size == 1:
            return
        if self.sharded:
            # (dp * n,) partial per rank -> (n,) summed slice of this dp rank
            dist.reduce_scatter_tensor(self.shard_grad, unit.grad.float()
                                       if self.separate_master else unit.grad,
                                       group=self.dp_group.pg)  # fmt: skip
        else:
            all_reduce_(unit.grad, self.dp_group)

    def _slice_grad(self) -> Tensor:
        """This rank's reduced gradient slice, float32, aligned with `master`."""
        if self.sharded:
            return self.shard_grad
        grad = self.unit.grad[self.start : self.stop]
        return grad.float() if self.separate_master else grad

    def square_norms(self) -> tuple[float, float]:
        """Squared gradient norm of this rank's slice: (sharded region, replicated region)."""
        grad = self._slice_grad()
        sums = [0.0, 0.0]
        for (lo, hi), decay in self.pieces:
            piece = grad[lo - self.start : hi - self.start]
            sums[0 if decay else 1] += float(piece.double().square().sum())
        return sums[0], sums[1]

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def step(self, lr: float, scale: float) -> None:
        """One AdamW step on the slice with gradients multiplied by `scale` (clipping)."""
        grad = self._slice_grad()
        for param, ((lo, hi), _) in zip(self.optim_params, self.pieces, strict=True):
            g = grad[lo - self.start : hi - self.start]
            param.grad = g * scale if scale != 1.0 else g
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.state_to(self.master.device)  # back from where the wrapper kept it, if elsewhere
        self.optimizer.step()
        for param in self.optim_params:
            param.grad = None
        unit = self.unit
        if self.separate_master:
            unit.data[self.start : self.stop].copy_(self.master)
        if self.sharded:
            # (n,) slice per dp rank -> (dp * n,) whole flat buffer
            mine = unit.data[self.start : self.stop].clone()
            dist.all_gather_into_tensor(unit.data, mine, group=self.dp_group.pg)

    def state_to(self, device: torch.device) -> None:
        """Move this unit's optimizer state (moments, and separate master weights) to `device`
        (the optimizer wrapper's `state_device`, e.g. the CPU for frozen layers); a step
        moves it back first."""
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, Tensor) and value.device != device and value.dim() > 0:
                    state[key] = value.to(device)

    def state_bytes(self) -> int:
        total = sum(
            v.numel() * v.element_size()
            for state in self.optimizer.state.values()
            for v in state.values()
            if isinstance(v, Tensor)
        )
        return total + (self.master.numel() * 4 if self.separate_master else 0)
