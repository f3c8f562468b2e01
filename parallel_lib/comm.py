"""Autograd-aware collectives over a `CommGroup`, written in the Megatron style.

Three tiers: private functional helpers that talk to torch.distributed (and count bytes), autograd
Function pairs whose backward is the transposed collective, and public snake_case wrappers.
Every helper returns its input unchanged when the group has one rank.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from .groups import CommGroup

__all__ = [
    "all_gather_tokens",
    "reduce_scatter_tokens",
    "all_to_all",
    "all_gather_dim0",
    "reduce_scatter_dim0",
    "all_reduce_",
    "all_to_all_uneven",
    "exchange_counts",
]


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


# torch 2.13 renamed the single-tensor collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# gloo's all-gather and all-reduce are rings: P-1 and 2(P-1) rounds of messages, one after the
# other, and its reduce-scatter is an all-reduce of the whole input. Its all-to-all posts every
# message at once: one round. Where the ranks share few cores each round waits for the peers
# to be scheduled, so on gloo (CPU tensors) the helpers below run as one all-to-all where that
# was measured faster (benchmarks/step_profile.py; docs/benchmarks.md, "Lean steps"): a
# reduce-scatter always (an all-to-all of the input, then each rank sums its P blocks, in rank
# order), an all-gather up to DIRECT_GATHER_BYTES of output (each rank sends its rows to all),
# and an all-reduce up to DIRECT_REDUCE_BYTES (so gathered, then summed in rank order: the same
# bits on every rank). Byte counts follow the same convention either way; nccl is unchanged.
DIRECT_GATHER_BYTES = 256 << 10
DIRECT_REDUCE_BYTES = 256 << 10


def _direct(x: Tensor, group: CommGroup) -> bool:
    """Whether the collective may run as gloo's one-round all-to-all (see above)."""
    return x.device.type == "cpu" and group.backend == "gloo"


def _gather_into(out: Tensor, x: Tensor, group: CommGroup, direct: bool | None = None) -> None:
    """out (P*N, ...) = every rank's contiguous x (N, ...), rank-major; no byte counting.
    `direct`: the all-to-all form (default: where it was measured faster)."""
    P = group.size
    if direct is None:
        direct = _direct(x, group) and _nbytes(out) <= DIRECT_GATHER_BYTES
    if direct:
        dist.all_to_all(list(out.chunk(P)), [x] * P, group=group.pg)
    else:
        _all_gather_single(out, x, group=group.pg)


# ---------------------------------------------------------------- functional helpers (no autograd)


def all_gather_dim0(x: Tensor, group: CommGroup) -> Tensor:
    """(N, ...) on each rank -> (P*N, ...), rank r's rows at [r*N, (r+1)*N)."""
    P = group.size
    if P == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((P * x.shape[0], *x.shape[1:]))
    group.monitor.record("all_gather", (P - 1) * _nbytes(x))
    _gather_into(out, x, group)
    return out


def reduce_scatter_dim0(x: Tensor, group: CommGroup) -> Tensor:
    """(P*N, ...) on each rank -> (N, ...): rank r gets rows [r*N, (r+1)*N) summed over ranks."""
    P = group.size
    if P == 1:
        return x
    if x.shape[0] % P:
        raise ValueError(f"reduce-scatter of {x.shape[0]} rows over {P} ranks")
    x = x.contiguous()
    group.monitor.record("reduce_scatter", (P - 1) * _nbytes(x) // P)
    if _direct(x, group):  # block j to rank j, then this rank's P blocks summed in rank order
        blocks = torch.empty_like(x)
        dist.all_to_all_single(blocks, x, group=group.pg)
        return blocks.view(P, x.shape[0] // P, *x.shape[1:]).sum(0)
    out = x.new_empty((x.shape[0] // P, *x.shape[1:]))
    _reduce_scatter_single(out, x, group=group.pg)
    return out


def _all_to_all(x: Tensor, group: CommGroup, scatter_dim: int, gather_dim: int) -> Tensor:
    """Split x in P chunks along scatter_dim, chunk j to rank j; concatenate along gather_dim."""
    P = group.size
    if P == 1:
        return x
    if x.shape[scatter_dim] % P:
        raise ValueError(f"all-to-all of dim {scatter_dim} (size {x.shape[scatter_dim]}) over {P}")
    send = torch.stack(x.chunk(P, dim=scatter_dim))  # (P, ...chunk...), contiguous
    recv = torch.empty_like(send)
    group.monitor.record("all_to_all", (P - 1) * _nbytes(send) // P)
    dist.all_to_all_single(recv, send, group=group.pg)
    return torch.cat(recv.unbind(0), dim=gather_dim)


def _all_to_all_rows(x: Tensor, send: list[int], recv: list[int], group: CommGroup) -> Tensor:
    """Rows [sum(send[:j]), sum(send[:j+1])) of x to rank j; rows from rank i land in order."""
    x = x.contiguous()
    out = x.new_empty((sum(recv), *x.shape[1:]))
    row = x.element_size() * math.prod(x.shape[1:])
    group.monitor.record("all_to_all", (sum(send) - send[group.rank]) * row)
    dist.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send, group=group.pg)
    return out


def exchange_counts(counts: Tensor, group: CommGroup) -> Tensor:
    """(P, ...) int64 counts, row j meant for rank j -> (P, ...), row i from rank i (no
    autograd): how many rows an uneven all-to-all will bring from each rank."""
    if group.size == 1:
        return counts
    counts = counts.contiguous()
    out = torch.empty_like(counts)
    group.monitor.record("all_to_all", (group.size - 1) * _nbytes(counts[0]))
    dist.all_to_all_single(out, counts, group=group.pg)
    return out


def all_reduce_(x: Tensor, group: CommGroup, op: str = "sum") -> Tensor:
    """In-place sum (or `op="max"`: maximum) over the group (no autograd): for gradients of
    replicated parameters and step metrics. Every rank gets the same bits."""
    P = group.size
    if P == 1:
        return x
    if op not in ("sum", "max"):
        raise ValueError(f"all_reduce_ sums or takes the maximum, got op={op!r}")
    group.monitor.record("all_reduce", 2 * (P - 1) * _nbytes(x) // P)
    if _direct(x, group) and _nbytes(x) <= DIRECT_REDUCE_BYTES:
        every = x.new_empty((P, x.numel()))
        _gather_into(every, x.reshape(1, -1).contiguous(), group, direct=True)
        x.copy_((every.sum(0) if op == "sum" else every.amax(0)).view_as(x))
        return x
    reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    if x.is_contiguous():
        dist.all_reduce(x, op=reduce_op, group=group.pg)
    else:
        buf = x.contiguous()
        dist.all_reduce(buf, op=reduce_op, group=group.pg)
        x.copy_(buf)
    return x


# ---------------------------------------------------------------- autograd functions


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    """forward: all-gather, backward: reduce-scatter, along dim 0."""

    @staticmethod
    def forward(ctx, x: Tensor, group: CommGroup) -> Tensor:
        ctx.group = group
        return all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return reduce_scatter_dim0(grad, ctx.group), None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """forward: reduce-scatter, backward: all-gather, along dim 0."""

    @staticmethod
    def forward(ctx, x: Tensor, group: CommGroup) -> Tensor:
        ctx.group = group
        return reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return all_gather_dim0(grad, ctx.group), None


class _AllToAll(torch.autograd.Function):
    """forward: all-to-all scattering scatter_dim and gathering gather_dim; backward: the same
    collective with the two dims swapped."""

    @staticmethod
    def forward(ctx, x: Tensor, group: CommGroup, scatter_dim: int, gather_dim: int) -> Tensor:
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.group, gather_dim, scatter_dim), None, None, None


class _AllToAllRows(torch.autograd.Function):
    """forward: uneven all-to-all of rows (send[j] rows to rank j, recv[i] from rank i);
    backward: the same collective with the splits swapped."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group: CommGroup) -> Tensor:
        ctx.group, ctx.splits = group, (send, recv)
        return _all_to_all_rows(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        send, recv = ctx.splits
        return _all_to_all_rows(grad, recv, send, ctx.group), None, None, None


# ---------------------------------------------------------------- public wrappers


def all_gather_tokens(x: Tensor, group: CommGroup) -> Tensor:
    """Sequence-parallel -> whole: forward all-gather, backward reduce-scatter, dim 0.

    # (T/P, H) -> (T, H) in gathered order (rank 0's tokens, then rank 1's, ...)
    """
    if group.size == 1:
        return x
    return _GatherFromSequenceParallelRegion.apply(x, group)


def reduce_scatter_tokens(x: Tensor, group: CommGroup) -> Tensor:
    """Whole partial sums -> sequence-parallel: forward reduce-scatter, backward all-gather, dim 0.

    # (T, H) partial, gathered order -> (T/P, H) summed over ranks
    """
    if group.size == 1:
        return x
    return _ReduceScatterToSequenceParallelRegion.apply(x, group)


def all_to_all(x: Tensor, group: CommGroup, scatter_dim: int, gather_dim: int) -> Tensor:
    """forward: all-to-all (scatter_dim -> ranks, gathered along gather_dim); backward: swapped."""
    if group.size == 1:
        return x
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


def all_to_all_uneven(x: Tensor, send: list[int], recv: list[int], group: CommGroup) -> Tensor:
    """Rows to ranks in uneven counts (expert parallelism): x (sum(send), ...) -> (sum(recv), ...);
    `recv` from `exchange_counts`. forward: all-to-all, backward: the swapped all-to-all."""
    if group.size == 1:
        return x
    return _AllToAllRows.apply(x, list(send), list(recv), group)
