"""Memory-efficient tensor parallelism (METP): weight shards stream round the ring.

No rank ever holds a whole weight: at ring step i rank r holds shard g = (r - i) mod P, computes
that shard's part of the product for its own tokens, and passes the shard on while computing (the
next shard is in flight). The backward streams the shards again for the input gradient, and each
shard's gradient accumulator travels one step behind it, picking up every rank's contribution, and
arrives at its owner after P hops. Sums of partial products over the P shards accumulate locally
in float32; the travelling weight-gradient sums keep the weight's dtype, as a reduce-scatter would.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import accumulator_dtype
from .groups import CommGroup
from .ring import circulate, circulate_accumulating

__all__ = ["streamed_linear"]

_WEIGHT_TAG, _GRAD_TAG = 21, 22


def _block(t: Tensor, g: int, P: int) -> Tensor:
    width = t.shape[1] // P
    return t[:, g * width : (g + 1) * width]


class _StreamedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shard, group, input_major):
        P, r = group.size, group.rank
        acc = accumulator_dtype(x.dtype)  # sums of P partial products accumulate in float32
        if input_major:  # y = sum_g x[:, block g] @ W_g, W_g (rows, out)
            y = x.new_zeros((x.shape[0], shard.shape[1]), dtype=acc)
        else:  # y[:, block g] = x @ W_g.T, W_g (rows, in)
            y = x.new_empty((x.shape[0], P * shard.shape[0]))

        def visit(step: int, weight: Tensor) -> None:
            g = (r - step) % P
            if input_major:
                y.add_(_block(x, g, P) @ weight)
            else:
                _block(y, g, P).copy_(x @ weight.t())

        circulate(shard, group, visit, tag=_WEIGHT_TAG)
        ctx.group, ctx.input_major, ctx.x_shape = group, input_major, x.shape
        # x serves only the weight gradient: a frozen weight keeps nothing of it
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, shard)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, shard = ctx.saved_tensors
        group, input_major = ctx.group, ctx.input_major
        P, r = group.size, group.rank
        dtype = dy.dtype  # the input's: y was cast back to it
        dx = dy.new_zeros(ctx.x_shape, dtype=accumulator_dtype(dtype))
        want_dweight = ctx.needs_input_grad[1]  # frozen weights: stream weights, not gradients

        def visit(step: int, weight: Tensor) -> Tensor | None:
            g = (r - step) % P
            if input_major:  # y = x_g @ W_g: dx_g = dy @ W_g.T, dW_g = x_g.T @ dy
                _block(dx, g, P).copy_(dy @ weight.t())
                return _block(x, g, P).t() @ dy if want_dweight else None
            # y_g = x @ W_g.T: dx += dy_g @ W_g, dW_g = dy_g.T @ x
            dx.add_(_block(dy, g, P) @ weight)
            return _block(dy, g, P).t() @ x if want_dweight else None

        if not want_dweight:
            circulate(shard, group, visit, tag=_WEIGHT_TAG)
            return dx.to(dtype), None, None, None
        dweight = circulate_accumulating(shard, group, visit, tags=(_WEIGHT_TAG, _GRAD_TAG))
        return dx.to(dtype), dweight, None, None


def streamed_linear(x: Tensor, shard: Tensor, group: CommGroup, *, input_major: bool) -> Tensor:
    """Same result as `zero_linear(x, shard, group, input_major=...)` without gathering weights."""
    if x.dim() != 2:
        raise ValueError(f"streamed_linear expects (tokens, features), got {tuple(x.shape)}")
    return _StreamedLinear.apply(x, shard, group, input_major)
