"""A tiny ring-communication object: send to the next rank, receive from the previous one."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .groups import CommGroup

__all__ = ["RingExchange", "circulate", "circulate_accumulating"]


class RingExchange:
    """One in-flight ring step: `start(t)` posts send(t -> next) and recv(prev -> buffer) together
    (batch_isend_irecv), `wait()` returns the buffer.

    Two exchanges in flight at once between the same ranks are matched in posting order, so every
    rank must post them in the same order (the callers here do); distinct tags additionally keep
    them apart on backends that honour tags (gloo; NCCL ignores tags)."""

    def __init__(self, group: CommGroup, tag: int = 0) -> None:
        self.group = group
        self.tag = tag
        self._next = group.global_rank(group.rank + 1)
        self._prev = group.global_rank(group.rank - 1)
        self._works: list | None = None
        self._buffer: Tensor | None = None

    def start(self, tensor: Tensor) -> None:
        if self._works is not None:
            raise RuntimeError("RingExchange.start called twice without wait")
        tensor = tensor.contiguous()
        self._buffer = torch.empty_like(tensor)
        self.group.monitor.record("p2p", tensor.numel() * tensor.element_size())
        ops = [
            dist.P2POp(dist.isend, tensor, self._next, self.group.pg, self.tag),
            dist.P2POp(dist.irecv, self._buffer, self._prev, self.group.pg, self.tag),
        ]
        self._works = dist.batch_isend_irecv(ops)
        self._sent = tensor  # keep the send buffer alive until the send completes

    def wait(self) -> Tensor:
        if self._works is None:
            raise RuntimeError("RingExchange.wait called before start")
        for work in self._works:
            work.wait()
        buffer, self._buffer, self._works, self._sent = self._buffer, None, None, None
        return buffer


def circulate(
    payload: Tensor, group: CommGroup, visit: Callable[[int, Tensor], None], *, tag: int
) -> None:
    """Pass `payload` round the ring: at step s (0..n-1) this rank holds the payload of ring index
    (rank - s) mod n and calls visit(s, it) while the next one is already in flight."""
    n = group.size
    ring = RingExchange(group, tag)
    for step in range(n):
        if step < n - 1:
            ring.start(payload)
        visit(step, payload)
        if step < n - 1:
            payload = ring.wait()


def circulate_accumulating(
    payload: Tensor,
    group: CommGroup,
    visit: Callable[[int, Tensor], Tensor],
    *,
    tags: tuple[int, int],
) -> Tensor:
    """As `circulate`, where visit returns this rank's contribution to a sum owed to the payload's
    owner (e.g. the gradient of a weight shard). Each sum travels one step behind its payload,
    picking up every rank's contribution, and reaches its owner after n hops; returns the sum owed
    to this rank."""
    n = group.size
    ring, sums = RingExchange(group, tags[0]), RingExchange(group, tags[1])
    total = None
    for step in range(n):
        if step < n - 1:
            ring.start(payload)
        total = visit(step, payload)
        if step > 0:  # the sum for this payload, sent by the previous rank one step ago
            total += sums.wait()
        if n > 1:
            sums.start(total)
        if step < n - 1:
            payload = ring.wait()
    return sums.wait() if n > 1 else total
