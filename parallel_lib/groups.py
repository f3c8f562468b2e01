"""Process groups as every communicating function receives them, and byte counting.

A `CommGroup` wraps a torch ProcessGroup with its size, this rank's index and the members' global
ranks (for point-to-point), plus the 2-D factorisations (inner x outer) the `usp` strategy uses.
All groups are created collectively, up front, by `new_sp_groups`; nothing is created lazily.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import torch.distributed as dist

__all__ = ["CommGroup", "CommCounter", "count_bytes", "new_sp_groups", "new_groups", "divisors"]


class CommCounter:
    """Bytes this rank sent, by collective kind, while the counter was active.

    Bytes follow one convention for every kind, so formulas can be checked exactly: all-gather of an
    n-byte input sends (P-1)n; reduce-scatter and all-to-all of an n-byte input send (P-1)n/P;
    all-reduce sends 2(P-1)n/P; a point-to-point send of n bytes sends n.
    """

    def __init__(self) -> None:
        self.bytes: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] += nbytes
        self.calls[kind] += 1

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def snapshot(self) -> dict[str, int]:
        return {k: v for k, v in self.bytes.items() if v}


class _Monitor:
    """The counters listening to a group and its factor groups (shared between them)."""

    def __init__(self) -> None:
        self.active: list[CommCounter] = []

    def record(self, kind: str, nbytes: int) -> None:
        for counter in self.active:
            counter.add(kind, nbytes)


@dataclass(frozen=True, eq=False)
class CommGroup:
    """A process group and what communicating code needs to know about it."""

    pg: dist.ProcessGroup | None
    """The torch process group; None for a group of one rank (nothing is ever sent)."""
    ranks: tuple[int, ...]
    """Global ranks of the members, in group order."""
    rank: int
    """This process's index in `ranks`."""
    monitor: _Monitor = field(default_factory=_Monitor, repr=False)
    factors: dict[int, tuple[CommGroup, CommGroup]] = field(default_factory=dict, repr=False)
    """inner degree u (1 < u < size) -> (inner group of u ranks, outer group of size/u ranks),
    both holding this rank; see `factor`."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < len(self.ranks):
            raise ValueError(f"rank {self.rank} outside a group of {len(self.ranks)}")
        if self.pg is None and len(self.ranks) > 1:
            raise ValueError("a group of more than one rank needs a process group")

    @property
    def size(self) -> int:
        return len(self.ranks)

    @cached_property
    def backend(self) -> str:
        """The process group's backend ('gloo', 'nccl'; 'none' for a group of one rank)."""
        return "none" if self.pg is None else str(dist.get_backend(self.pg))

    def global_rank(self, index: int) -> int:
        return self.ranks[index % self.size]

    def factor(self, inner: int) -> tuple[CommGroup, CommGroup]:
        """(inner, outer) groups for size = inner x outer: inner consecutive, outer strided.

        inner = 1 and inner = size need no process group of their own; other factorisations
        exist only on groups made by `new_sp_groups`."""
        if inner == 1:
            return self.alone(), self
        if inner == self.size:
            return self, self.alone()
        if inner not in self.factors:
            raise ValueError(
                f"no {inner} x {self.size // max(inner, 1)} factorisation of a group of "
                f"{self.size}; available inner degrees: {sorted({1, self.size, *self.factors})}"
            )
        return self.factors[inner]

    def alone(self) -> CommGroup:
        """A group of this process only, counted by the same monitor."""
        return CommGroup(pg=None, ranks=(self.ranks[self.rank],), rank=0, monitor=self.monitor)

    @classmethod
    def single(cls, global_rank: int = 0) -> CommGroup:
        """A group holding only this process."""
        return cls(pg=None, ranks=(global_rank,), rank=0)


@contextmanager
def count_bytes(group: CommGroup) -> Iterator[CommCounter]:
    """Count bytes sent through `group` and its factor groups inside the block."""
    counter = CommCounter()
    group.monitor.active.append(counter)
    try:
        yield counter
    finally:
        group.monitor.active.remove(counter)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def new_groups(
    partition: Sequence[Sequence[int]],
    my_rank: int,
    monitor: _Monitor | None = None,
    factors: dict[int, tuple[CommGroup, CommGroup]] | None = None,
) -> CommGroup:
    """Create one group per member list (collective: every process calls with the same partition).

    Returns the group containing `my_rank`. Lists of one rank get no torch process group."""
    mine = None
    for members in partition:
        members = tuple(members)
        pg = dist.new_group(list(members)) if len(members) > 1 else None
        if my_rank in members:
            mine = CommGroup(
                pg=pg,
                ranks=members,
                rank=members.index(my_rank),
                monitor=monitor or _Monitor(),
                factors=factors or {},
            )
    if mine is None:
        raise ValueError(f"rank {my_rank} is in none of the groups {partition}")
    return mine


def new_sp_groups(sp_partition: Sequence[Sequence[int]], my_rank: int) -> CommGroup:
    """Create the switchable groups and every inner x outer factorisation of them (collective).

    For each divisor u of P (1 < u < P) the inner groups are u consecutive members and the outer
    groups take every u-th member, so inner group o holds members o*u .. o*u+u-1."""
    P = len(sp_partition[0])
    if any(len(members) != P for members in sp_partition):
        raise ValueError(f"switchable groups must all have the same size, got {sp_partition}")
    monitor = _Monitor()
    factors = {}
    for u in divisors(P)[1:-1]:
        inner_part = [m[o * u : (o + 1) * u] for m in sp_partition for o in range(P // u)]
        outer_part = [m[j::u] for m in sp_partition for j in range(u)]
        inner = new_groups(inner_part, my_rank, monitor)
        factors[u] = (inner, new_groups(outer_part, my_rank, monitor))
    return new_groups(sp_partition, my_rank, monitor, factors)
