"""The ZeRO-3 family: whole weights gathered one layer at a time, attention over a 2-D group.

`ulysses`, `ring` and `usp` are one algorithm on a factorisation P = u x c of the group: an
all-to-all inside inner groups of u ranks trades tokens for heads (Ulysses), then ring attention
runs across the c inner groups (each inner group's tokens form a zigzag layout over 2c
super-chunks). ulysses is u = P, c = 1; ring is u = 1, c = P; usp has both at least 2.
"""

from __future__ import annotations

from abc import abstractmethod

from ..comm import all_to_all
from ..groups import CommGroup
from ..zero import zero_linear
from .base import Strategy
from .common import attend_gathered


class Zero3Strategy(Strategy):
    """Shared implementation; subclasses choose the factorisation and document their volumes."""

    holds_whole_weights = True
    mlp_mode = "zero3"

    @abstractmethod
    def inner_degree(self, P: int) -> int:
        """u, the all-to-all degree; the ring runs over c = P / u."""

    def attention(self, x, weights, layout, group: CommGroup, *, recomputed=False):
        shape, P = weights.shape, group.size
        u = self.inner_degree(P)
        inner, outer = group.factor(u)
        y = zero_linear(x, weights.qkv, group, input_major=False, keep_gathered=recomputed)
        # (T/P, P*rows) -> (u*T/P, P/u*rows): tokens of the inner group, its 1/u of the heads
        y = all_to_all(y, inner, scatter_dim=1, gather_dim=0)
        o_index = group.rank - inner.rank  # first member of my inner group
        members = range(o_index, o_index + u)
        o = attend_gathered(y, layout, shape, P, members, P // u, outer, self.attn_backend)
        o = all_to_all(o, inner, scatter_dim=0, gather_dim=1)  # -> (T/P, heads*d)
        return zero_linear(o, weights.out, group, input_major=True, keep_gathered=recomputed)


_VOLUME_DOC = """
    Communication per layer and rank, with Tl = T/P tokens per rank, b bytes per element, a = 4
    (bytes of the float32 gradient accumulators; 8 for float64), S the rank's weight shard elements
    (attention (heads+2·kv_heads)·d·H/P + heads·d·H/P, MLP 3·F·H/P):
      forward:  all-gather (P-1)·S·b; all-to-all (u-1)/u·Tl·(2·heads+2·kv_heads)·d·b;
                p2p (c-1)·2·Tl·kv_heads·d·b
      backward: all-gather (P-1)·S·b; reduce-scatter (P-1)·S·b; the same all-to-all;
                p2p (c-1)·2·Tl·kv_heads·d·b + c·2·Tl·kv_heads·d·a (the latter only when c > 1)
      recompute selective: unchanged (the recomputation's weight gather replaces the backward's);
      recompute full: backward + the forward's all-to-all and p2p.
      frozen (no weight gradients): no reduce-scatter.
"""
