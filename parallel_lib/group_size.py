"""A micro-batch on sub-groups: the switchable group of P ranks run as P/g groups of g.

With group size g, sub-group o (of P/g) trains its own share of the micro-batch's sequences with
any strategy at P = g. Its ranks need the layer's weights as 1/g shards, while every rank stores
its 1/P shard (the unified layout). The ranks whose stored shards make up one 1/g shard are
consecutive: P/g of them, the *gather group* (the inner group of `CommGroup.factor(P/g)`), and
every member of a gather group sits in a different sub-group (the strided outer groups). So:

    sub-group o  = sp ranks {o, o + P/g, o + 2P/g, ...}     (position j = sp_rank // (P/g))
    gather group = sp ranks {j P/g, ..., j P/g + P/g - 1}   (its shards = the 1/g shard j)

forward: all-gather the layer's shards over the gather group and re-lay them out as the 1/g
shard; backward: the transposed re-layout, then a reduce-scatter that sums the sub-groups'
gradients into each rank's own 1/P shard. No stored weight moves (the ZeRO-3 property of the
unified layout). g = P is today's single group; g = 1 runs every rank on its own sequences with
whole weights (`local`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .comm import all_gather_tokens
from .groups import CommGroup
from .shape import AttentionWeights, MlpWeights

__all__ = ["GroupSplit", "split_group", "regroup_attention", "regroup_mlp"]


@dataclass(frozen=True, eq=False)
class GroupSplit:
    """This rank's place when its switchable group runs as sub-groups of `size` ranks."""

    size: int
    """g: ranks per sub-group (a divisor of P)."""
    compute: CommGroup
    """The sub-group this rank computes in (size g)."""
    gather: CommGroup
    """The P/g ranks whose 1/P shards make up this rank's 1/g shard."""
    index: int
    """Which sub-group (0 .. P/g - 1), the index of its share of the micro-batch's sequences
    (dealt by `cost_models.group_size.assign_sequences`)."""

    @property
    def groups(self) -> int:
        """P/g: how many sub-groups."""
        return self.gather.size

    @property
    def sp(self) -> int:
        """P: the switchable group's size."""
        return self.size * self.groups

    @property
    def position(self) -> int:
        """This rank's place in its sub-group (its zigzag chunks there)."""
        return self.compute.rank


def split_group(group: CommGroup, size: int) -> GroupSplit:
    """The sub-groups of `size` ranks of `group` (made at mesh creation: no group is created).
    ValueError, one line, when `size` does not divide the group."""
    P = group.size
    if size < 1 or P % size:
        divisors = [d for d in range(1, P + 1) if P % d == 0]
        raise ValueError(f"group size {size} does not divide sp={P}; choose among {divisors}")
    if size == P:
        return GroupSplit(size, group, group.alone(), 0)
    if size == 1:
        return GroupSplit(1, group.alone(), group, group.rank)
    gather, compute = group.factor(P // size)
    return GroupSplit(size, compute, gather, group.rank % (P // size))


def _gather_pair(first: Tensor, second: Tensor, split: GroupSplit) -> tuple[Tensor, Tensor]:
    """Two (rows, H) shards gathered over the gather group in one all-gather (backward: one
    reduce-scatter): every member's [first; second] rows, returned as (u, rows, H) views."""
    u, a = split.gather.size, first.shape[0]
    both = all_gather_tokens(torch.cat([first, second]), split.gather)
    both = both.view(u, a + second.shape[0], first.shape[-1])
    return both[:, :a], both[:, a:]


def _blocks_major(per_shard: Tensor, blocks: Sequence[int]) -> Tensor:
    """(u, sum(blocks), H) rows of u shards, each [block 0; block 1; ...], reordered as
    [every shard's block 0; every shard's block 1; ...] (2-D)."""
    H = per_shard.shape[-1]
    return torch.cat([p.reshape(-1, H) for p in per_shard.split(list(blocks), dim=1)])


def regroup_attention(w: AttentionWeights, split: GroupSplit) -> AttentionWeights:
    """This rank's 1/P attention shards -> the 1/g shards of its sub-group position (forward:
    one all-gather over the gather group; backward: one reduce-scatter of the gradients)."""
    if split.gather.size == 1:
        return w
    shape, P = w.shape, split.sp
    hq, hk = shape.heads // P * shape.head_dim, shape.kv_heads // P * shape.head_dim
    qkv, out = _gather_pair(w.qkv, w.out, split)
    return AttentionWeights(_blocks_major(qkv, (hq, hk, hk)), out.reshape(-1, out.shape[-1]),
                            shape)  # fmt: skip


def regroup_mlp(w: MlpWeights, split: GroupSplit) -> MlpWeights:
    """The dense SwiGLU's 1/P shards -> 1/g shards (gate_up = [gate rows; up rows] per shard)."""
    if split.gather.size == 1:
        return w
    f = w.shape.ffn_hidden // split.sp
    gate_up, down = _gather_pair(w.gate_up, w.down, split)
    return MlpWeights(_blocks_major(gate_up, (f, f)), down.reshape(-1, down.shape[-1]), w.shape)
