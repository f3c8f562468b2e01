"""`metp`: memory-efficient tensor parallelism: no rank holds a whole weight or a whole sequence."""

from __future__ import annotations

import torch

from ..ops import apply_rotary, split_qkv
from ..ring_attention import ring_attention
from ..streaming import streamed_linear
from .base import Strategy


class MemoryEfficientTP(Strategy):
    """Weight shards stream round the ring one at a time: each rank projects its own T/P tokens
    with whichever shard it holds (`streamed_linear`), so no rank holds a whole weight. Attention
    then runs as ring attention once per head group of heads/P heads, so no rank holds a whole
    sequence and only one head group's K/V chunk is in flight.

    Communication per layer and rank (all point-to-point), with Tl = T/P, b bytes per element,
    S the rank's weight shard elements (attention (heads+2·kv_heads)·d·H/P + heads·d·H/P, MLP
    3·F·H/P), S_mlp = 3·F·H/P, a = 4 (float32 K/V-gradient accumulators; 8 for float64):
      forward:  weights (P-1)·S·b + K/V (P-1)·2·Tl·kv_heads·d·b
      backward: weights (P-1)·S·b + weight gradients P·S·b
                + K/V (P-1)·2·Tl·kv_heads·d·b + K/V gradients P·2·Tl·kv_heads·d·a
                (P = 1: nothing is sent)
      recompute selective: backward + (P-1)·S_mlp·b; recompute full: backward + the forward.
      frozen (no weight gradients): no weight-gradient sums travel.
    """

    name = "metp"
    holds_whole_weights = False
    holds_whole_sequences = False
    mlp_mode = "streamed"

    def attention(self, x, weights, layout, group, *, recomputed=False):
        shape, P = weights.shape, group.size
        y = streamed_linear(x, weights.qkv, group, input_major=False)  # (T/P, P*qkv_rows)
        q, k, v = split_qkv(y, P, shape, P)  # (T/P, heads | kv_heads, d), rank-major heads
        d, theta, scaling = shape.head_dim, shape.rope_theta, shape.rope_scaling
        tables = layout.rotary([layout.rank], d, theta, scaling, q.dtype)
        q = apply_rotary(q, layout.positions, theta, tables=tables)
        k = apply_rotary(k, layout.positions, theta, tables=tables)
        hq, hk = shape.heads // P, shape.kv_heads // P
        outputs = []
        for g in range(P):  # one head group (one weight shard's heads) at a time
            qg = q[:, g * hq : (g + 1) * hq].contiguous()
            kg = k[:, g * hk : (g + 1) * hk].contiguous()
            vg = v[:, g * hk : (g + 1) * hk].contiguous()
            outputs.append(
                ring_attention(qg, kg, vg, layout.local_bounds, group, backend=self.attn_backend)
            )
        o = torch.cat(outputs, dim=1).flatten(1)  # (T/P, heads*d)
        return streamed_linear(o, weights.out, group, input_major=True)
