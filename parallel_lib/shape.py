"""Shapes of one decoder layer and the weight shards every strategy reads (the unified layout)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["LayerShape", "AttentionWeights", "MlpWeights", "random_shard"]


@dataclass(frozen=True)
class LayerShape:
    """Dimensions of a LLaMA-style decoder layer (GQA attention, SwiGLU MLP)."""

    hidden: int
    """Model width H."""
    heads: int
    """Query heads."""
    kv_heads: int
    """Key/value heads (GQA: a divisor of `heads`)."""
    head_dim: int
    """Width of one head (even, for rotary embeddings)."""
    ffn_hidden: int
    """SwiGLU intermediate width F."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    rope_scaling: tuple[float, float, float, float] | None = None
    """Llama 3 frequency scaling (factor, low_freq_factor, high_freq_factor, original context
    length), or None (`parallel_lib.ops.rotary_frequencies`)."""

    def __post_init__(self) -> None:
        for name in ("hidden", "heads", "kv_heads", "head_dim", "ffn_hidden"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LayerShape.{name} must be positive, got {getattr(self, name)}")
        if self.heads % self.kv_heads:
            raise ValueError(
                f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads}) for GQA"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None:
            factor, low, high, context = self.rope_scaling
            if not (factor > 0 and 0 < low < high and context > 0):
                raise ValueError(
                    "rope_scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and "
                    f"a positive original context, got {self.rope_scaling}"
                )

    def layout_problem(self, P: int) -> str | None:
        """Why a group of P ranks cannot hold this layer as head-aligned 1/P shards, or None."""
        for name, value in (
            ("query heads", self.heads),
            ("key/value heads", self.kv_heads),
            ("ffn_hidden", self.ffn_hidden),
        ):
            if value % P:
                return (
                    f"{name} ({value}) are not divisible by the group size {P}; "
                    f"choose sp among {self.valid_group_sizes()} or change the model shape"
                )
        return None

    def valid_group_sizes(self) -> list[int]:
        """Group sizes P that divide heads, kv_heads and ffn_hidden (the layout's requirement)."""
        return [
            p
            for p in range(1, self.kv_heads + 1)
            if self.heads % p == 0 and self.kv_heads % p == 0 and self.ffn_hidden % p == 0
        ]

    def qkv_rows(self, P: int) -> int:
        """Rows of one rank's fused Q/K/V shard: its heads/P query and kv_heads/P K and V heads."""
        return (self.heads + 2 * self.kv_heads) // P * self.head_dim

    def shard_numels(self, P: int) -> tuple[int, int]:
        """Elements of one rank's attention and MLP weight shards (norm weights excluded)."""
        attn = (self.qkv_rows(P) + self.heads // P * self.head_dim) * self.hidden
        mlp = 3 * (self.ffn_hidden // P) * self.hidden
        return attn, mlp


class AttentionWeights(NamedTuple):
    """One rank's attention shards, stored so that the shard axis is dim 0 of each tensor.

    qkv: (rows, H) with rows = [q heads of the rank; its k heads; its v heads] x head_dim (column
    shard of W_q, W_k, W_v; output = x @ qkv.T). out: (heads/P * head_dim, H), the rank's input rows
    of W_o (row shard; output = o @ out). Gathering shards of all ranks along dim 0 gives whole
    weights whose outputs are in rank-major order, which is natural head order.
    """

    qkv: Tensor
    out: Tensor
    shape: LayerShape


class MlpWeights(NamedTuple):
    """One rank's SwiGLU shards: gate_up (2F/P, H) = [gate rows; up rows], down (F/P, H)."""

    gate_up: Tensor
    down: Tensor
    shape: LayerShape


def random_shard(rows: int, cols: int, generator: torch.Generator, **kw) -> Tensor:
    """(rows, cols) drawn at N(0, 1/cols), for measuring (`kw`: dtype, device)."""
    return (torch.randn(rows, cols, generator=generator) / math.sqrt(cols)).to(**kw)
