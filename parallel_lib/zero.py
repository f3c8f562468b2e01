"""ZeRO-3 over the unified layout: a linear layer whose weight exists only as 1/P dim-0 shards.

The forward all-gathers the shards into the whole weight for one matmul and frees it; the backward
all-gathers again and reduce-scatters the weight gradient back to shards. Inside an activation-
checkpointed region (`keep_gathered=True`) the gathered weight is saved instead: the original
forward saves nothing there and the recomputation's gather is reused by the backward, so a
recomputed layer still gathers each weight twice per step, not three times. A frozen weight (no
gradient) saves no input and reduce-scatters nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .comm import all_gather_dim0, reduce_scatter_dim0
from .groups import CommGroup

__all__ = ["zero_linear", "gather_weight"]


def gather_weight(shard: Tensor, group: CommGroup) -> Tensor:
    """(rows, cols) shard per rank -> (P*rows, cols) whole weight, rank-major rows. No autograd."""
    return all_gather_dim0(shard, group)


def _matmul(x: Tensor, w: Tensor, input_major: bool) -> Tensor:
    return x @ w if input_major else x @ w.t()


class _ZeroLinear(torch.autograd.Function):
    """forward: all-gather weight shards, matmul; backward: all-gather again (unless kept),
    input gradient, reduce-scatter of the weight gradient along dim 0."""

    @staticmethod
    def forward(ctx, x, shard, group, input_major, keep_gathered):
        weight = gather_weight(shard, group)
        ctx.group, ctx.input_major, ctx.kept = group, input_major, keep_gathered
        # x serves only the weight gradient: a frozen weight keeps nothing of it
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None,
                              weight if keep_gathered else shard)  # fmt: skip
        return _matmul(x, weight, input_major)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dshard = None
        if ctx.needs_input_grad[0]:  # the weight gradient alone needs no whole weight
            if not ctx.kept:
                weight = gather_weight(weight, ctx.group)
            # y = x @ W (input-major W: (in, out)) or y = x @ W.T (W: (out, in))
            dx = dy @ weight.t() if ctx.input_major else dy @ weight
        if ctx.needs_input_grad[1]:
            dweight = x.t() @ dy if ctx.input_major else dy.t() @ x
            dshard = reduce_scatter_dim0(dweight, ctx.group)
        return dx, dshard, None, None, None


def zero_linear(
    x: Tensor, shard: Tensor, group: CommGroup, *, input_major: bool, keep_gathered: bool = False
) -> Tensor:
    """x (N, in) times the whole weight assembled from dim-0 shards.

    input_major=False: shards are output rows (column-parallel weight), y = x @ W.T, W (out, in),
    the output columns in rank-major order. input_major=True: shards are input rows (row-parallel
    weight), y = x @ W, W (in, out), x's columns in rank-major order."""
    if x.dim() != 2:
        raise ValueError(f"zero_linear expects (tokens, features), got {tuple(x.shape)}")
    return _ZeroLinear.apply(x, shard, group, input_major, keep_gathered)
