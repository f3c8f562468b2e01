"""Pointwise pieces shared by every strategy: rotary embeddings, SwiGLU, splitting fused outputs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .shape import LayerShape

__all__ = ["apply_rotary", "rotary_frequencies", "rotary_tables", "swiglu", "split_qkv"]


def rotary_frequencies(
    d: int, theta: float, scaling: tuple[float, float, float, float] | None = None, device=None
) -> Tensor:
    """(d/2,) float64 rotation frequencies theta^(-2i/d), optionally rescaled as Llama 3 does.

    `scaling` = (factor, low_freq_factor, high_freq_factor, original context): frequencies whose
    wavelength exceeds context / low_freq_factor are divided by `factor`, those shorter than
    context / high_freq_factor are kept, and the band between moves linearly in
    context / wavelength from one to the other."""
    inv_freq = theta ** (-torch.arange(0, d // 2, dtype=torch.float64, device=device) * 2 / d)
    if scaling is None:
        return inv_freq
    factor, low, high, context = scaling
    ratio = context * inv_freq / (2 * math.pi)  # context / wavelength
    # 0 at the low-frequency edge (divide by factor), 1 at the high-frequency edge (keep)
    keep = ((ratio - low) / (high - low)).clamp(0.0, 1.0)
    return inv_freq * (keep + (1 - keep) / factor)


def rotary_tables(
    positions: Tensor,
    d: int,
    theta: float,
    scaling: tuple[float, float, float, float] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (N, 1, d/2) in `dtype`, of the rotary angles at integer positions (N,)
    with the frequencies of `rotary_frequencies`. What `apply_rotary` multiplies by: a layout
    makes them once per micro-batch (`ZigzagLayout.rotary`) for every layer's q and k.

    Angles are computed in float64: position * frequency in float32 loses ~pos * 6e-8 radians,
    which is visible at long context."""
    inv_freq = rotary_frequencies(d, theta, scaling, positions.device)  # (d/2,)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None]  # (N, d/2)
    return torch.cos(angles).to(dtype)[:, None, :], torch.sin(angles).to(dtype)[:, None, :]


def apply_rotary(
    x: Tensor,
    positions: Tensor,
    theta: float,
    scaling: tuple[float, float, float, float] | None = None,
    *,
    tables: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Rotate-half rotary embedding of x (N, heads, d) at integer positions (N,), with the
    frequencies of `rotary_frequencies`; `tables`: the (cos, sin) of `rotary_tables` for these
    positions, when already made (then positions, theta and scaling are not read)."""
    d = x.shape[-1]
    cos, sin = tables or rotary_tables(positions, d, theta, scaling, x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def split_qkv(y: Tensor, blocks: int, shape: LayerShape, P: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split a fused projection output into q, k, v heads.

    y (N, blocks * rows) holds `blocks` consecutive rank shards' outputs, each [q; k; v] for
    heads/P query and kv_heads/P key/value heads (rows = shape.qkv_rows(P)).
    Returns q (N, blocks*heads/P, d), k and v (N, blocks*kv_heads/P, d), heads in rank-major order.
    """
    d = shape.head_dim
    hq, hk = shape.heads // P, shape.kv_heads // P
    y = y.unflatten(1, (blocks, (hq + 2 * hk) * d))  # (N, blocks, rows)
    q, k, v = y.split([hq * d, hk * d, hk * d], dim=2)
    n = y.shape[0]
    return (
        q.reshape(n, blocks * hq, d),
        k.reshape(n, blocks * hk, d),
        v.reshape(n, blocks * hk, d),
    )


def swiglu(y: Tensor, blocks: int) -> Tensor:
    """SwiGLU of a fused gate/up output y (N, blocks * 2f), each block [gate (f); up (f)].

    # (N, blocks*2f) -> (N, blocks*f), columns in the same rank-major order as the down shards
    """
    y = y.unflatten(1, (blocks, -1))
    gate, up = y.chunk(2, dim=2)
    return (F.silu(gate) * up).flatten(1)
