"""Optimizer state parked in host memory between the steps that use it (GRASS's layer-wise
offload). A `HostStore` belongs to one `UnitOptimizer`: `park` takes the AdamW state out of
the optimizer into host memory (pinned when the weights live on CUDA), `prefetch` starts
bringing it back, and `restore` puts it back into the optimizer before the unit steps.

On CUDA the copies run on a side stream, so that the engine can prefetch the next unit's state
while the current one steps and write a leaving unit's state back while the step goes on; the
compute stream waits for a copy only where it needs its result. On CPU the same calls run in
order and move no bytes (host and device are one memory), but the optimizer still holds no
state for a parked unit, which is what the tests and the metrics count.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = ["HostStore", "state_bytes"]


def state_bytes(states) -> int:
    """Bytes of the tensors in an optimizer's per-parameter state dicts."""
    return sum(v.numel() * v.element_size() for s in states for v in s.values()
               if isinstance(v, Tensor))  # fmt: skip


class HostStore:
    """One unit's parked AdamW state, by the index of its optimizer parameter."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.parked: dict[int, dict[str, Tensor]] = {}
        self._coming: dict[int, dict[str, Tensor]] | None = None
        self._events: list = []  # copies in flight (CUDA), and the tensors they read
        self._keep: list = []

    def __bool__(self) -> bool:
        return bool(self.parked) or self._coming is not None

    @property
    def bytes(self) -> int:
        return state_bytes(self.parked.values())

    def _copy(self, value: Tensor, to: torch.device | str, pin: bool) -> Tensor:
        if not isinstance(value, Tensor) or value.dim() == 0:
            return value  # AdamW's step count: a scalar that stays where it is
        if not self.cuda:
            return value.to(to)
        out = torch.empty(value.shape, dtype=value.dtype, device=to, pin_memory=pin)
        out.copy_(value, non_blocking=True)
        return out

    def _on_side_stream(self):
        if not self.cuda:
            return contextlib.nullcontext()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self.stream)

    def _record(self, keep) -> None:
        if self.cuda:
            event = torch.cuda.Event()
            event.record(self.stream)
            self._events.append(event)
            self._keep.append(keep)

    def _wait(self) -> None:
        if self.cuda and self._events:
            for event in self._events:
                torch.cuda.current_stream(self.device).wait_event(event)
            self._events, self._keep = [], []

    def park(self, optimizer, params) -> None:
        """Move every parameter's state out of `optimizer` into host memory."""
        self.restore(optimizer, params)  # a prefetch in flight comes back first
        moved = {}
        with self._on_side_stream():
            for i, param in enumerate(params):
                state = optimizer.state.pop(param, None)
                if state:
                    moved[i] = state
                    self.parked[i] = {k: self._copy(v, "cpu", True) for k, v in state.items()}
        self._record(moved)  # the device tensors live until their copies are done

    def prefetch(self) -> None:
        """Start bringing the parked state back to the device (CUDA: on the side stream)."""
        if not self.parked or self._coming is not None:
            return
        with self._on_side_stream():
            self._coming = {i: {k: self._copy(v, self.device, False) for k, v in s.items()}
                            for i, s in self.parked.items()}  # fmt: skip
        self._record(self.parked)
        self.parked = {}

    def restore(self, optimizer, params) -> None:
        """Put the parked state back into `optimizer` (prefetched or brought now)."""
        self.prefetch()
        if self._coming is None:
            return
        self._wait()
        for i, state in self._coming.items():
            optimizer.state[params[i]] = state
        self._coming = None

    def moments(self, index: int) -> dict[str, Tensor] | None:
        """The parked state of parameter `index` (for checkpoints), without moving it."""
        if self._coming is not None and index in self._coming:
            self._wait()
            return self._coming[index]
        return self.parked.get(index)

    def forget(self) -> None:
        self._wait()
        self.parked, self._coming = {}, None
