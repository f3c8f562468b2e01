"""Zigzag ring attention: K/V chunks travel round the ring, partial results merge by log-sum-exp.

Layout (see layout.py): on a ring of n ranks, each sequence's local segment is two equal halves,
chunks i and 2n-1-i of that sequence for the rank at ring index i. At ring step s the rank holds the
K/V of ring index src = (i - s) mod n, and by the zigzag structure
- s == 0:  causal attention of the local segment on itself;
- src < i: every local query attends, unmasked, to the first half of src's segment;
- src > i: only the second half of the local queries attends, unmasked, to all of src's segment.
So every step does half a segment-squared of work: the ring is balanced. The next K/V is in flight
while the current block is computed. Backward recomputes block gradients from the merged output and
log-sum-exp (exact), K/V circulate again, and their gradient sums travel one step behind them
and arrive home after n hops (`parallel_lib.ring.circulate_accumulating`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from .attention import (
    accumulator_dtype,
    attention_backward,
    attention_forward,
    merge_lse,
    varlen_attention,
)
from .groups import CommGroup
from .layout import concat_ranges
from .ring import circulate, circulate_accumulating

__all__ = ["ring_attention"]

_KV_TAG, _GRAD_TAG = 11, 12


@functools.lru_cache(maxsize=64)
def _halves(
    local_bounds: tuple[int, ...], device: torch.device
) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Index of the first and second halves of every local segment, and the halves' bounds.
    Cached: the same micro-batch asks once per layer, forward and backward."""
    bounds = torch.tensor(local_bounds, dtype=torch.int64)
    starts, half = bounds[:-1], (bounds[1:] - bounds[:-1]) // 2
    first = concat_ranges(starts, half)
    second = concat_ranges(starts + half, half)
    return first.to(device), second.to(device), tuple(c // 2 for c in local_bounds)


def _block(step: int, src: int, me: int, bounds, halves):
    """(query rows or None for all, key rows or None, cu_q, cu_k, causal) of one ring step."""
    first, second, half_bounds = halves
    if step == 0:
        return None, None, bounds, bounds, True
    if src < me:
        return None, first, bounds, half_bounds, False
    return second, None, half_bounds, bounds, False


def _rows(t: Tensor, idx: Tensor | None, dim: int = 0) -> Tensor:
    return t if idx is None else t.index_select(dim, idx)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bounds, group, scale, backend):
        n, me = group.size, group.rank
        halves = _halves(bounds, q.device)
        acc_dtype = accumulator_dtype(q.dtype)
        out = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=acc_dtype, device=q.device)

        def visit(step: int, kv: Tensor) -> None:
            nonlocal out, lse
            q_idx, k_idx, cu_q, cu_k, causal = _block(step, (me - step) % n, me, bounds, halves)
            o, m = attention_forward(
                _rows(q, q_idx), _rows(kv[0], k_idx), _rows(kv[1], k_idx), cu_q, cu_k,
                causal=causal, scale=scale, backend=backend,
            )  # fmt: skip
            if q_idx is None:
                out, lse = merge_lse(out, lse, o, m)
            else:
                out[q_idx], lse[:, q_idx] = merge_lse(out[q_idx], lse[:, q_idx], o, m)

        # (2, T_local, kv_heads, d): K and V travel as one message
        circulate(torch.stack([k, v]), group, visit, tag=_KV_TAG)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (bounds, group, scale, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        bounds, group, scale, backend = ctx.args
        n, me = group.size, group.rank
        halves = _halves(bounds, q.device)
        acc_dtype = accumulator_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)

        def visit(step: int, kv: Tensor) -> Tensor:
            q_idx, k_idx, cu_q, cu_k, causal = _block(step, (me - step) % n, me, bounds, halves)
            g_q, g_k, g_v = attention_backward(
                _rows(dout, q_idx), _rows(q, q_idx), _rows(kv[0], k_idx), _rows(kv[1], k_idx),
                _rows(out, q_idx), _rows(lse, q_idx, 1), cu_q, cu_k,
                causal=causal, scale=scale, backend=backend,
            )  # fmt: skip
            dkv = torch.zeros((2, *k.shape), dtype=acc_dtype, device=k.device)
            if q_idx is None:
                dq.add_(g_q)
            else:
                dq.index_add_(0, q_idx, g_q.to(acc_dtype))
            if k_idx is None:
                dkv[0], dkv[1] = g_k, g_v
            else:
                dkv[0].index_add_(0, k_idx, g_k.to(acc_dtype))
                dkv[1].index_add_(0, k_idx, g_v.to(acc_dtype))
            return dkv

        dkv = circulate_accumulating(torch.stack([k, v]), group, visit, tags=(_KV_TAG, _GRAD_TAG))
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    local_bounds: Sequence[int],
    group: CommGroup,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Causal attention over sequences spread zigzag over `group`; q (T_local, h, d), k/v GQA.

    `local_bounds` are the cumulative lengths of each sequence's local segment (equal halves)."""
    bounds = tuple(int(b) for b in local_bounds)
    if group.size == 1:
        return varlen_attention(q, k, v, bounds, scale=scale, backend=backend)
    if any((b - a) % 2 for a, b in zip(bounds[:-1], bounds[1:], strict=True)):
        raise ValueError("ring attention needs every local segment to be two equal halves")
    return _RingAttention.apply(q, k, v, bounds, group, scale, backend)
