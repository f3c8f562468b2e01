"""Megatron sequence-parallel linear: all-gather the tokens, multiply by the local weight shard.

The gathered (T, H) input is needed again for the weight gradient; saving it would keep H-wide
activations of the whole sequence, so only the local (T/P, H) input is saved and the backward
gathers it again (Korthikanti et al. 2022). Inside an activation-checkpointed region
(`keep_gathered=True`) the gathered input is saved instead: the original forward saves nothing
there and the recomputation's gather serves the backward. A frozen weight (no gradient) saves
no input at all: the input gradient needs only the weight.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .comm import all_gather_dim0, reduce_scatter_dim0
from .groups import CommGroup

__all__ = ["gather_tokens_linear"]


class _GatherTokensLinear(torch.autograd.Function):
    """forward: all-gather x along dim 0, y = x_all @ W.T; backward: all-gather x again (unless
    kept), dW = dy.T @ x_all, reduce-scatter of dy @ W along dim 0."""

    @staticmethod
    def forward(ctx, x, weight, group, keep_gathered):
        gathered = all_gather_dim0(x, group)
        ctx.group, ctx.kept = group, keep_gathered
        # the input serves only the weight gradient: a frozen weight keeps nothing of it
        kept = (gathered if keep_gathered else x) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(kept, weight)
        return gathered @ weight.t()

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dweight = None
        if ctx.needs_input_grad[1]:
            gathered = x if ctx.kept else all_gather_dim0(x, ctx.group)
            dweight = dy.t() @ gathered
        if ctx.needs_input_grad[0]:
            dx = reduce_scatter_dim0(dy @ weight, ctx.group)
        return dx, dweight, None, None


def gather_tokens_linear(
    x: Tensor, weight: Tensor, group: CommGroup, *, keep_gathered: bool = False
) -> Tensor:
    """(T/P, H) local tokens -> (T, out) = all-gathered tokens @ weight.T (gathered order)."""
    if x.dim() != 2:
        raise ValueError(f"gather_tokens_linear expects (tokens, features), got {tuple(x.shape)}")
    return _GatherTokensLinear.apply(x, weight, group, keep_gathered)
