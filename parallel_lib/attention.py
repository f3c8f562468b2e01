"""Varlen causal attention kernels behind one interface that returns the output and log-sum-exp.

Tensors are packed: q (Tq, heads, d), k and v (Tk, kv_heads, d) with GQA (kv_heads divides heads),
sequence boundaries as cumulative lengths `cu_q`, `cu_k` (Python ints). Outputs: out (Tq, heads, d)
in q's dtype and lse (heads, Tq) float32 (float64 for float64 inputs). Backends:
- "cpu_flash": torch's CPU flash kernel and its backward, one call per run of consecutive
  sequences of equal length (a batch of them: many short sequences cost one call, not many);
- "cuda_flash": the varlen flash attention shipped with torch (fp16/bf16 on CUDA);
- "reference": plain torch, any float dtype (float64 for tests);
- "auto": cuda_flash for half types on CUDA, cpu_flash on CPU, else reference (float32 on CUDA
  thus materialises each sequence's (heads, L, L) scores: train in bfloat16 on GPUs).
Causal masking is only defined here for equal query and key lengths per sequence.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "attention_forward",
    "attention_backward",
    "varlen_attention",
    "merge_lse",
    "resolve_backend",
    "accumulator_dtype",
]

BACKENDS = ("auto", "cpu_flash", "cuda_flash", "reference")


def resolve_backend(backend: str, q: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
    if backend != "auto":
        return backend
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        return "cuda_flash"
    if q.device.type == "cpu":
        return "cpu_flash"
    return "reference"


def _segments(cu_q: Sequence[int], cu_k: Sequence[int], causal: bool):
    for i in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        if causal and q1 - q0 != k1 - k0:
            raise ValueError("causal attention needs equal query and key lengths per sequence")
        if q1 > q0 and k1 > k0:
            yield q0, q1, k0, k1


def _runs(cu_q: Sequence[int], cu_k: Sequence[int], causal: bool, batched: bool):
    """(q0, q1, k0, k1, count): `count` consecutive sequences of equal query and key lengths
    at rows [q0, q1) and [k0, k1) (one sequence each unless `batched`)."""
    run = None
    for q0, q1, k0, k1 in _segments(cu_q, cu_k, causal):
        if run is not None and batched:
            rq0, rq1, rk0, rk1, n = run
            if (q0, k0) == (rq1, rk1) and (q1 - q0) * n == rq1 - rq0 and (k1 - k0) * n == rk1 - rk0:
                run = (rq0, q1, rk0, k1, n + 1)
                continue
        if run is not None:
            yield run
        run = (q0, q1, k0, k1, 1)
    if run is not None:
        yield run


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where partial attention results and gradient sums accumulate (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_bhsd(t: Tensor, count: int = 1) -> Tensor:
    return t.unflatten(0, (count, -1)).transpose(1, 2)  # (B*S, h, d) -> (B, h, S, d) view


def _from_bhsd(t: Tensor) -> Tensor:
    return t.transpose(1, 2).flatten(0, 1)  # (B, h, S, d) -> (B*S, h, d)


# ---------------------------------------------------------------- reference (plain torch)


def _ref_scores(q: Tensor, k: Tensor, causal: bool, scale: float) -> Tensor:
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k).to(accumulator_dtype(q.dtype)) * scale
    if causal:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    return s


def _ref_forward(q, k, v, causal, scale):
    s = _ref_scores(q, k, causal, scale)  # (h, Sq, Sk)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    group = q.shape[1] // k.shape[1]
    v = v.repeat_interleave(group, dim=1).to(p.dtype)
    out = torch.einsum("hqk,khd->qhd", p, v)
    return out.to(q.dtype), lse


def _ref_backward(dout, q, k, v, out, lse, causal, scale):
    group = q.shape[1] // k.shape[1]
    wide = accumulator_dtype(q.dtype)
    s = _ref_scores(q, k, causal, scale)
    p = torch.exp(s - lse[..., None].to(wide))  # (h, Sq, Sk)
    do, o = dout.to(wide), out.to(wide)
    vv = v.repeat_interleave(group, dim=1).to(wide)
    kk = k.repeat_interleave(group, dim=1).to(wide)
    dv = torch.einsum("hqk,qhd->khd", p, do)
    dp = torch.einsum("qhd,khd->hqk", do, vv)
    delta = (do * o).sum(-1).transpose(0, 1)  # (h, Sq)
    ds = p * (dp - delta[..., None]) * scale
    dq = torch.einsum("hqk,khd->qhd", ds, kk)
    dk = torch.einsum("hqk,qhd->khd", ds, q.to(wide))
    # GQA: sum the gradients of the query heads that share a key/value head
    dk = dk.unflatten(1, (k.shape[1], group)).sum(2)
    dv = dv.unflatten(1, (k.shape[1], group)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---------------------------------------------------------------- CPU flash


def _cpu_forward(q, k, v, causal, scale, count=1):
    """`count` sequences of equal length, rows one after another, in one kernel call."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _as_bhsd(q, count), _as_bhsd(k, count), _as_bhsd(v, count), 0.0, causal, scale=scale
    )
    return _from_bhsd(out), lse.transpose(0, 1).flatten(1)  # lse (B, h, S) -> (h, B*S)


def _cpu_backward(dout, q, k, v, out, lse, causal, scale, count=1):
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _as_bhsd(dout.contiguous(), count),
        _as_bhsd(q, count),
        _as_bhsd(k, count),
        _as_bhsd(v, count),
        _as_bhsd(out.contiguous(), count),
        lse.unflatten(1, (count, -1)).transpose(0, 1).contiguous(),  # (h, B*S) -> (B, h, S)
        0.0,
        causal,
        scale=scale,
    )
    return _from_bhsd(dq), _from_bhsd(dk), _from_bhsd(dv)


# ---------------------------------------------------------------- CUDA varlen flash


@functools.lru_cache(maxsize=64)
def _cuda_cu(cu: tuple[int, ...], device: torch.device) -> Tensor:
    """Device copy of cumulative lengths, made once per micro-batch: a host-to-device copy per
    call would synchronise the stream inside the ring's overlapped loop."""
    return torch.tensor(cu, dtype=torch.int32, device=device)


def _max_len(cu: Sequence[int]) -> int:
    return max(b - a for a, b in zip(cu[:-1], cu[1:], strict=True))


def _cuda_forward(q, k, v, cu_q, cu_k, causal, scale):
    out, lse, _, _, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, _cuda_cu(tuple(cu_q), q.device), _cuda_cu(tuple(cu_k), q.device),
        _max_len(cu_q), _max_len(cu_k), 0.0, causal, False, scale=scale,
    )  # fmt: skip
    if lse.shape != (q.shape[1], q.shape[0]):
        raise RuntimeError(f"unexpected varlen flash lse shape {tuple(lse.shape)}")
    return out, lse


def _cuda_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale):
    cq, ck = _cuda_cu(tuple(cu_q), q.device), _cuda_cu(tuple(cu_k), q.device)
    # no dropout, so the philox state is unused (as in torch.nn.attention.varlen)
    rng, unused = torch.zeros(2, dtype=torch.uint64, device=q.device), q.new_empty(0)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout.contiguous(), q, k, v, out.contiguous(), lse.contiguous(),
        cq, ck, _max_len(cu_q), _max_len(cu_k),
        0.0, causal, rng, unused, scale=scale,
    )  # fmt: skip
    return dq, dk, dv


# ---------------------------------------------------------------- public interface


def attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_q: Sequence[int],
    cu_k: Sequence[int],
    *,
    causal: bool,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Packed varlen attention: returns (out (Tq, h, d), lse (h, Tq)). No autograd."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    backend = resolve_backend(backend, q)
    if backend == "cuda_flash":
        return _cuda_forward(q, k, v, cu_q, cu_k, causal, scale)
    batched = backend == "cpu_flash"
    kernel = _cpu_forward if batched else _ref_forward
    out = q.new_zeros(q.shape)
    lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=accumulator_dtype(q.dtype))
    for q0, q1, k0, k1, n in _runs(cu_q, cu_k, causal, batched):
        o, m = kernel(q[q0:q1], k[k0:k1], v[k0:k1], causal, scale, *([n] if batched else []))
        out[q0:q1] = o
        lse[:, q0:q1] = m
    return out, lse


def attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_q: Sequence[int],
    cu_k: Sequence[int],
    *,
    causal: bool,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of packed varlen attention.

    `out` and `lse` may be the final results of a larger attention (e.g. merged over ring steps):
    the gradients are then this block's exact contribution to the whole."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    backend = resolve_backend(backend, q)
    if backend == "cuda_flash":
        return _cuda_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale)
    batched = backend == "cpu_flash"
    kernel = _cpu_backward if batched else _ref_backward
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for q0, q1, k0, k1, n in _runs(cu_q, cu_k, causal, batched):
        g = kernel(dout[q0:q1], q[q0:q1], k[k0:k1], v[k0:k1], out[q0:q1], lse[:, q0:q1],
                   causal, scale, *([n] if batched else []))  # fmt: skip
        dq[q0:q1] += g[0]
        dk[k0:k1] += g[1]
        dv[k0:k1] += g[2]
    return dq, dk, dv


def merge_lse(
    out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor
) -> tuple[Tensor, Tensor]:
    """Combine two partial attentions over disjoint key sets (online softmax).

    out, block_out: (T, h, d); lse, block_lse: (h, T). Rows with -inf in both stay -inf, 0."""
    new_lse = torch.logaddexp(lse, block_lse)
    safe = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    w_old = torch.exp(lse - safe).transpose(0, 1).unsqueeze(-1)  # (h, T) -> (T, h, 1)
    w_new = torch.exp(block_lse - safe).transpose(0, 1).unsqueeze(-1)
    return out * w_old + block_out.to(out.dtype) * w_new, new_lse


class _VarlenAttention(torch.autograd.Function):
    """Autograd wrapper: forward saves (q, k, v, out, lse); backward runs the kernel's backward."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, causal, scale, backend):
        out, lse = attention_forward(
            q, k, v, cu_q, cu_k, causal=causal, scale=scale, backend=backend
        )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (cu_q, cu_k, causal, scale, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        cu_q, cu_k, causal, scale, backend = ctx.args
        dq, dk, dv = attention_backward(
            dout, q, k, v, out, lse, cu_q, cu_k, causal=causal, scale=scale, backend=backend
        )
        return dq, dk, dv, None, None, None, None, None


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Sequence[int],
    *,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Autograd-aware packed attention with the same boundaries for queries and keys."""
    cu = tuple(int(c) for c in cu_seqlens)
    return _VarlenAttention.apply(q, k, v, cu, cu, causal, scale, backend)
