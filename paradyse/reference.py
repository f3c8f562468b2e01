"""The single-process reference decoder layer: whole weights, one sequence at a time, plain torch.

Written independently of `parallel_lib` (its own RoPE via complex rotation, its own masked softmax
attention) so that tests compare every strategy against code they do not share. Any float dtype;
float64 is the ground truth in tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parallel_lib import LayerShape

__all__ = ["ReferenceDecoderLayer", "init_full_weights", "FULL_WEIGHT_NAMES"]

DENSE_MLP_NAMES = ("w_gate", "w_up", "w_down")
FULL_WEIGHT_NAMES = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", *DENSE_MLP_NAMES)


def init_full_weights(
    shape: LayerShape, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """Whole weights in nn.Linear convention (out, in), drawn in float64 from `generator` so the
    draw does not depend on dtype or on how the layer is later sharded."""
    H, d, F_ = shape.hidden, shape.head_dim, shape.ffn_hidden

    def normal(rows: int, cols: int) -> Tensor:
        return torch.randn(rows, cols, generator=generator, dtype=torch.float64) / math.sqrt(cols)

    full = {
        "attn_norm": 1 + 0.1 * torch.randn(H, generator=generator, dtype=torch.float64),
        "wq": normal(shape.heads * d, H),
        "wk": normal(shape.kv_heads * d, H),
        "wv": normal(shape.kv_heads * d, H),
        "wo": normal(H, shape.heads * d),
        "mlp_norm": 1 + 0.1 * torch.randn(H, generator=generator, dtype=torch.float64),
        "w_gate": normal(F_, H),
        "w_up": normal(F_, H),
        "w_down": normal(H, F_),
    }
    return {k: v.to(dtype) for k, v in full.items()}


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _llama3_frequency(freq: float, scaling: tuple[float, float, float, float]) -> float:
    """One rotary frequency under Llama 3 scaling, case by case as Meta's reference states it."""
    factor, low_freq_factor, high_freq_factor, context = scaling
    wavelength = 2 * math.pi / freq
    if wavelength < context / high_freq_factor:
        return freq
    if wavelength > context / low_freq_factor:
        return freq / factor
    smooth = (context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    return (1 - smooth) * freq / factor + smooth * freq


def _rope(x: Tensor, theta: float, scaling=None) -> Tensor:
    """x (L, h, d): rotate each pair (x_i, x_{i+d/2}) by angle position * theta^(-2i/d)."""
    L, _, d = x.shape
    freqs = theta ** (-torch.arange(0, d // 2, dtype=torch.float64, device=x.device) * 2 / d)
    if scaling is not None:
        freqs = torch.tensor([_llama3_frequency(float(f), scaling) for f in freqs],
                             dtype=torch.float64, device=x.device)  # fmt: skip
    angles = torch.outer(torch.arange(L, dtype=torch.float64, device=x.device), freqs)  # (L, d/2)
    rot = torch.polar(torch.ones_like(angles), angles)[:, None, :]  # (L, 1, d/2) complex128
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double()) * rot
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


class ReferenceDecoderLayer(nn.Module):
    """h = x + attn(norm(x)); h + mlp(norm(h)), each sequence separately: forward([(L, H), ...])."""

    def __init__(self, shape: LayerShape, full: dict[str, Tensor], norm_eps: float = 1e-5):
        super().__init__()
        self.shape, self.eps = shape, norm_eps
        self.weights = nn.ParameterDict(
            {k: nn.Parameter(full[k].clone()) for k in FULL_WEIGHT_NAMES}
        )

    def _sequence(self, x: Tensor) -> Tensor:
        w, s = self.weights, self.shape
        L = x.shape[0]
        h = _rms_norm(x, w["attn_norm"], self.eps)
        q = _rope((h @ w["wq"].T).view(L, s.heads, s.head_dim), s.rope_theta, s.rope_scaling)
        k = _rope((h @ w["wk"].T).view(L, s.kv_heads, s.head_dim), s.rope_theta, s.rope_scaling)
        v = (h @ w["wv"].T).view(L, s.kv_heads, s.head_dim)
        rep = s.heads // s.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(s.head_dim)
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attn = torch.einsum("hij,jhd->ihd", probs, v).reshape(L, -1)
        x = x + attn @ w["wo"].T
        h = _rms_norm(x, w["mlp_norm"], self.eps)
        return x + (F.silu(h @ w["w_gate"].T) * (h @ w["w_up"].T)) @ w["w_down"].T

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        return [self._sequence(x) for x in xs]

    def grads(self) -> dict[str, Tensor]:
        return {k: p.grad for k, p in self.weights.items()}
