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
    """inner degree u -> (inner group of u ranks, outer group of size/u ranks), both holding me."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < len(self.ranks):
            raise ValueError(f"rank {self.rank} outside a group of {len(self.ranks)}")
        if self.pg is None and len(self.ranks) > 1:
            raise ValueError("a group of more than one rank needs a process group")

    @property
    def size(self) -> int:
        return len(self.ranks)

    def global_rank(self, index: int) -> int:
        return self.ranks[index % self.size]

    def factor(self, inner: int) -> tuple[CommGroup, CommGroup]:
        """(inner, outer) groups for size = inner x outer: inner consecutive, outer strided."""
        if inner not in self.factors:
            raise ValueError(
                f"no {inner} x {self.size // max(inner, 1)} factorisation of a group of "
                f"{self.size}; "
                f"available inner degrees: {sorted(self.factors)}"
            )
        return self.factors[inner]

    @classmethod
    def single(cls, global_rank: int = 0) -> CommGroup:
        """A group holding only this process."""
        group = cls(pg=None, ranks=(global_rank,), rank=0)
        group.factors[1] = (group, group)
        return group


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
    partition: Sequence[Sequence[int]], my_rank: int, monitor: _Monitor | None = None
) -> CommGroup:
    """Create one group per member list (collective: every process calls with the same partition).

    Returns the group containing `my_rank`. Lists of one rank get no torch process group.
    """
    mine = None
    for members in partition:
        members = tuple(members)
        pg = dist.new_group(list(members)) if len(members) > 1 else None
        if my_rank in members:
            kwargs = {"monitor": monitor} if monitor is not None else {}
            mine = CommGroup(pg=pg, ranks=members, rank=members.index(my_rank), **kwargs)
    if mine is None:
        raise ValueError(f"rank {my_rank} is in none of the groups {partition}")
    return mine


def new_sp_groups(sp_partition: Sequence[Sequence[int]], my_rank: int) -> CommGroup:
    """Create the switchable groups and every inner x outer factorisation of them (collective).

    For each divisor u of P the inner groups are u consecutive members and the outer groups take
    every u-th member, so inner group o holds members o*u .. o*u+u-1.
    """
    sp = new_groups(sp_partition, my_rank)
    P = sp.size
    if any(len(members) != P for members in sp_partition):
        raise ValueError(f"switchable groups must all have the same size, got {sp_partition}")
    for u in divisors(P):
        if u == 1:
            inner = CommGroup(pg=None, ranks=(my_rank,), rank=0, monitor=sp.monitor)
            sp.factors[1] = (inner, sp)
        elif u == P:
            outer = CommGroup(pg=None, ranks=(my_rank,), rank=0, monitor=sp.monitor)
            sp.factors[P] = (sp, outer)
        else:
            inner_part = [m[o * u : (o + 1) * u] for m in sp_partition for o in range(P // u)]
            outer_part = [m[j::u] for m in sp_partition for j in range(u)]
            inner = new_groups(inner_part, my_rank, sp.monitor)
            outer = new_groups(outer_part, my_rank, sp.monitor)
            sp.factors[u] = (inner, outer)
    return sp
