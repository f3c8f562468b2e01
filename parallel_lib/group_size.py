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


def _interleave(gathered: Tensor, blocks: Sequence[int], parts: int) -> Tensor:
    """Rows of `parts` gathered shards, each [block 0; block 1; ...] of the row counts `blocks`,
    reordered as [every shard's block 0; every shard's block 1; ...]."""
    if parts == 1 or len(blocks) == 1:
        return gathered
    per_shard = gathered.view(parts, sum(blocks), gathered.shape[-1])
    pieces = per_shard.split(list(blocks), dim=1)
    return torch.cat([p.reshape(-1, gathered.shape[-1]) for p in pieces])


def regroup_attention(w: AttentionWeights, split: GroupSplit) -> AttentionWeights:
    """This rank's 1/P attention shards -> the 1/g shards of its sub-group position (forward:
    all-gather over the gather group; backward: reduce-scatter of the gradients)."""
    if split.gather.size == 1:
        return w
    shape, u, P = w.shape, split.gather.size, split.sp
    hq, hk = shape.heads // P * shape.head_dim, shape.kv_heads // P * shape.head_dim
    qkv = _interleave(all_gather_tokens(w.qkv, split.gather), (hq, hk, hk), u)
    return AttentionWeights(qkv, all_gather_tokens(w.out, split.gather), shape)


def regroup_mlp(w: MlpWeights, split: GroupSplit) -> MlpWeights:
    """The dense SwiGLU's 1/P shards -> 1/g shards (gate_up = [gate rows; up rows] per shard)."""
    if split.gather.size == 1:
        return w
    u, f = split.gather.size, w.shape.ffn_hidden // split.sp
    gate_up = _interleave(all_gather_tokens(w.gate_up, split.gather), (f, f), u)
    return MlpWeights(gate_up, all_gather_tokens(w.down, split.gather), w.shape)
