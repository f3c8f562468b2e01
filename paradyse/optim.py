"""Gradient reduction and AdamW over flat per-unit buffers (fp32 master weights, optional ZeRO-1).

The parameters of each unit (one switchable layer, or everything else) are views into one flat
buffer, and so are their gradients: autograd accumulates micro-batches in place, and each
reduction over dp is one collective per unit. Within a buffer the sp-sharded parameters come
first and the replicated ones after them in one run; the runs of every unit are summed over sp
by one all-reduce per dtype and device (`reduce_replicated`: they are small, so latency is
their cost). Matrices are weight-decayed, vectors (norms) not.

Data parallelism sums gradients over dp: an all-reduce, or with `shard_optimizer` a
reduce-scatter, after which each dp rank updates its 1/dp slice of the flat buffer (its AdamW
state is 1/dp) and the slices are all-gathered back. 16-bit parameters keep float32 master
weights; float32 parameters are their own masters.

Without data parallelism a step's reductions over sp are one collective: the replicated gradients
and the sharded squared norms (for clipping) travel together (`reduce_replicated_with_norms`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from parallel_lib import CommGroup, all_gather_dim0, all_reduce_, reduce_scatter_dim0

from .offload import HostStore, state_bytes
from .sharding import is_sharded

__all__ = [
    "OptimConfig", "FlatUnit", "Segment", "UnitOptimizer", "learning_rate", "decays",
    "reduce_replicated", "reduce_replicated_with_norms",
]  # fmt: skip


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
    """Decoupled weight decay of matrices and embeddings (parameters of 2 or more dims); vectors
    (norm weights, biases, gates) are not decayed."""
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
    progress = min(1.0, (step - config.warmup_steps) / max(1, span - 1))
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def decays(param: Tensor) -> bool:
    """Weight decay for matrices and embeddings, not for vectors (norm weights, biases, gates)."""
    return param.dim() >= 2


@dataclass(frozen=True)
class Segment:
    """A run of parameters in a flat buffer that reduce and decay alike."""

    start: int
    stop: int
    sharded: bool
    decay: bool


class FlatUnit:
    """The parameters of one unit as views into a flat buffer, with a flat gradient buffer.

    Layout: [sharded, decayed | sharded, not decayed | replicated, not decayed | replicated,
    decayed | padding to a multiple of dp]: the replicated parameters (summed over sp) are one
    contiguous run."""

    ORDER = ((True, True), (True, False), (False, False), (False, True))

    def __init__(self, name: str, params: Sequence[nn.Parameter], dp: int) -> None:
        if not params:
            raise ValueError(f"unit {name} has no parameters")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(f"unit {name}: parameters must share dtype and device, got {dtypes}")
        ordered, self.segments, offset = [], [], 0
        for sharded, decay in self.ORDER:
            group = [p for p in params if is_sharded(p) == sharded and decays(p) == decay]
            size = sum(p.numel() for p in group)
            if size:
                self.segments.append(Segment(offset, offset + size, sharded, decay))
            ordered += group
            offset += size
        self.name, self.params, self.numel = name, ordered, offset
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
    def replicated(self) -> tuple[int, int]:
        """(start, stop) of the replicated parameters in the flat buffer (empty: start == stop)."""
        runs = [s for s in self.segments if not s.sharded]
        return (runs[0].start, runs[-1].stop) if runs else (self.numel, self.numel)

    def set_trainable(self, trainable: bool) -> None:
        """Turn the unit's gradients on or off; a frozen unit frees its gradient buffer (the
        planner leaves it out of a step's static memory) and gets a zeroed one back."""
        if trainable and self.grad.numel() != self.data.numel():
            self.grad = torch.zeros_like(self.data)
            self._point_grads()
        elif not trainable and self.grad.numel():
            for p in self.params:
                p.grad = None
            self.grad = self.grad.new_empty(0)
        for p in self.params:
            p.requires_grad_(trainable)

    def _point_grads(self) -> None:
        """Every parameter's .grad as its view of the flat gradient buffer."""
        offset = 0
        for p in self.params:
            p.grad = self.grad[offset : offset + p.numel()].view_as(p)
            offset += p.numel()

    def zero_grad(self) -> None:
        self.grad.zero_()


def reduce_replicated(optimizers: Sequence[UnitOptimizer]) -> None:
    """Sum the replicated gradients of every unit over sp with one all-reduce per dtype and
    device, not one per unit (they are small: norm weights; latency dominates their cost).
    Follow with `reduce(over_sp=False)` on each unit."""
    buckets: dict[tuple, list[Tensor]] = {}
    groups: dict[tuple, CommGroup] = {}
    for opt in optimizers:
        lo, hi = opt.unit.replicated
        if opt.sp_group.size > 1 and hi > lo:
            grad = opt.unit.grad
            key = (grad.dtype, grad.device, id(opt.sp_group))
            buckets.setdefault(key, []).append(grad[lo:hi])
            groups[key] = opt.sp_group
    for key, views in buckets.items():
        flat = torch.cat(views) if len(views) > 1 else views[0]
        all_reduce_(flat, groups[key])
        if len(views) > 1:
            offset = 0
            for view in views:
                view.copy_(flat[offset : offset + view.numel()])
                offset += view.numel()


def reduce_replicated_with_norms(optimizers: Sequence[UnitOptimizer], group: CommGroup) -> Tensor:
    """For a step without data parallelism (dp = 1), in ONE collective over the sp `group`: sum
    every unit's replicated gradients and its sharded squared gradient norm (as float64).
    Returns per unit (sharded squares summed over sp, squares of the summed replicated
    gradients), (units, 2) float64: what `reduce_replicated`, `square_norms` and an all-reduce of
    the sharded column give in two collectives."""
    device = optimizers[0].unit.grad.device
    views = []
    for opt in optimizers:
        lo, hi = opt.unit.replicated
        views.append(opt.unit.grad[lo:hi])
    sharded = torch.tensor([opt.square_norm(sharded=True) for opt in optimizers],
                           dtype=torch.float64, device=device)  # fmt: skip
    flat = torch.cat([sharded, *(v.to(device=device, dtype=torch.float64) for v in views)])
    all_reduce_(flat, group)
    offset = len(optimizers)
    for view in views:
        view.copy_(flat[offset : offset + view.numel()])
        offset += view.numel()
    replicated = [opt.square_norm(sharded=False) for opt in optimizers]
    return torch.stack([flat[: len(optimizers)], flat.new_tensor(replicated)], dim=1)


class UnitOptimizer:
    """AdamW for one FlatUnit on this dp rank's slice (all of it without ZeRO-1).

    `reduce()` sums the gradient over sp (replicated region) and dp; `square_norms()` gives the
    slice's squared gradient norm by region for global clipping; `step()` updates the slice and
    brings every dp rank's parameters up to date. Separate (float32) master weights are copied
    again from the parameters whenever these changed in place outside the optimizer (e.g.
    `load_state_dict` after the engine was built)."""

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
        self._synced = self._versions()
        self.shard_grad = torch.zeros_like(self.master) if self.sharded else None
        self.pieces = self._pieces()
        groups = []
        for piece in self.pieces:
            view = self.master[piece.start - self.start : piece.stop - self.start]
            decay = config.weight_decay if piece.decay else 0.0
            groups.append({"params": [nn.Parameter(view)], "weight_decay": decay})
        self.optim_params = [g["params"][0] for g in groups]
        self.host = HostStore(self.master.device)
        """This unit's AdamW state while the optimizer wrapper parks it in host memory."""
        # a ZeRO-1 slice may hold only padding: no optimizer, but the collectives still run
        self.optimizer = (
            torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=True)
            if groups
            else None
        )

    def _pieces(self) -> list[Segment]:
        """The unit's segments cut to this rank's slice."""
        pieces = []
        for seg in self.unit.segments:
            lo, hi = max(seg.start, self.start), min(seg.stop, self.stop)
            if hi > lo:
                pieces.append(Segment(lo, hi, seg.sharded, seg.decay))
        return pieces

    # ------------------------------------------------------------------ gradients
    def reduce(self, *, over_sp: bool = True) -> None:
        """Sum over sp (replicated parameters) and over dp (every parameter). over_sp=False
        leaves the sp sum to `reduce_replicated`, which does it for many units at once."""
        unit = self.unit
        rep_lo, rep_hi = unit.replicated
        if over_sp and self.sp_group.size > 1 and rep_hi > rep_lo:
            all_reduce_(unit.grad[rep_lo:rep_hi], self.sp_group)
        if self.dp_group.size == 1:
            return
        if self.sharded:
            # (dp * n,) partial per rank -> (n,) summed slice of this dp rank
            grad = unit.grad.float() if self.separate_master else unit.grad
            self.shard_grad.copy_(reduce_scatter_dim0(grad, self.dp_group))
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
        return self.square_norm(sharded=True), self.square_norm(sharded=False)

    def square_norm(self, *, sharded: bool) -> float:
        """Squared gradient norm of this rank's slice, of its sharded or its replicated region."""
        grad = self._slice_grad()
        total = 0.0
        for piece in self.pieces:
            if piece.sharded == sharded:
                part = grad[piece.start - self.start : piece.stop - self.start]
                total += float(part.double().square().sum())
        return total

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def step(self, lr: float, scale: float) -> None:
        """One AdamW step on the slice with gradients multiplied by `scale` (clipping)."""
        unit = self.unit
        if self.separate_master and self._versions() != self._synced:
            self.master.copy_(unit.data[self.start : self.stop])  # weights loaded since
        if self.optimizer is not None:
            grad = self._slice_grad()
            for param, piece in zip(self.optim_params, self.pieces, strict=True):
                g = grad[piece.start - self.start : piece.stop - self.start]
                param.grad = g * scale if scale != 1.0 else g
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.host.restore(self.optimizer, self.optim_params)  # parked: back first
            self.state_to(self.master.device)  # back from where the wrapper kept it, if elsewhere
            self.optimizer.step()
            for param in self.optim_params:
                param.grad = None
        if self.separate_master:
            unit.data[self.start : self.stop].copy_(self.master)
        if self.sharded:
            # (n,) slice per dp rank -> (dp * n,) whole flat buffer
            unit.data.copy_(all_gather_dim0(unit.data[self.start : self.stop], self.dp_group))
        self._synced = self._versions()

    def _versions(self) -> list[int]:
        """In-place writes to the parameters (not to the flat buffer behind them) bump these."""
        return [p._version for p in self.unit.params]

    def state_to(self, device: torch.device) -> None:
        """Move this unit's AdamW moments to `device` (the optimizer wrapper's `state_device`,
        e.g. the CPU for frozen layers); a step moves them back first. Separate float32 master
        weights stay with the parameters."""
        if self.optimizer is None:
            return
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, Tensor) and value.device != device and value.dim() > 0:
                    state[key] = value.to(device)

    def forget_state(self) -> None:
        """Drop the AdamW state (moments and step counts); the next step starts it afresh."""
        if self.optimizer is not None:
            self.optimizer.state.clear()
        self.host.forget()

    def park_state(self) -> None:
        """Move the AdamW state into host memory (`paradyse.offload.HostStore`); the next step
        (or `prefetch_state`) brings it back."""
        if self.optimizer is not None:
            self.host.park(self.optimizer, self.optim_params)

    def prefetch_state(self) -> None:
        """Start bringing parked state back (overlapped on CUDA; in order on CPU)."""
        self.host.prefetch()

    def moments(self, index: int) -> dict[str, Tensor] | None:
        """The AdamW state of optimizer parameter `index`, wherever it is kept; None before the
        unit's first step."""
        if self.optimizer is None:
            return None
        return self.optimizer.state.get(self.optim_params[index]) or self.host.moments(index)

    def state_bytes(self) -> tuple[int, int]:
        """Bytes of AdamW state (held by the optimizer on the device, parked in host memory)."""
        held = state_bytes(self.optimizer.state.values()) if self.optimizer is not None else 0
        return held, self.host.bytes

    def state_off_device(self) -> bool:
        """Whether this unit's AdamW moments exist and are kept away from its weights' device
        (moved by `state_to`); a unit without state yet counts as on the device."""
        if self.optimizer is None:
            return False
        if self.host:
            return True
        master = self.master.device
        return any(
            value.device != master
            for state in self.optimizer.state.values()
            for value in state.values()
            if isinstance(value, Tensor) and value.dim() > 0
        )
