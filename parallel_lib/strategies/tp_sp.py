"""`tp_sp`: Megatron tensor parallelism with sequence parallelism."""

from __future__ import annotations

import torch

from ..comm import all_gather_tokens, reduce_scatter_tokens
from ..ops import swiglu
from .base import CommVolume, Strategy
from .common import attend_gathered


class TensorSequenceParallel(Strategy):
    """Weights stay as shards; tokens are all-gathered before each projection and the partial
    outputs reduce-scattered back (Korthikanti et al. 2022). Each rank attends with heads/P heads
    over whole sequences.

    Communication per layer and rank, with Tl = T/P tokens per rank, H hidden, b bytes per element,
    v = (P-1)·Tl·H·b:
      forward:  all-gather 2v (attention, MLP inputs), reduce-scatter 2v (their outputs)
      backward: all-gather 2v, reduce-scatter 2v (the transposes)
      recompute selective: backward all-gather +v (MLP input gathered again)
      recompute full: backward all-gather +2v, reduce-scatter +v (the MLP's output reduce-scatter
      is not recomputed: nothing after it is saved)
    """

    name = "tp_sp"
    holds_whole_weights = False
    holds_whole_sequences = True

    def attention(self, x, weights, batch, group, *, recomputed=False):
        layout, shape, P = batch.layout, weights.shape, group.size
        xg = all_gather_tokens(x, group)  # (T/P, H) -> (T, H) gathered order
        y = xg @ weights.qkv.t()  # (T, qkv_rows): this rank's heads for every token
        alone = group.factor(P)[1]  # attention needs no further communication
        o = attend_gathered(y, layout, shape, P, range(P), 1, alone, self.attn_backend)
        return reduce_scatter_tokens(o @ weights.out, group)  # (T, H) partial -> (T/P, H)

    def mlp(self, x, weights, group, *, recomputed=False):
        xg = all_gather_tokens(x, group)  # (T/P, H) -> (T, H)
        h = swiglu(xg @ weights.gate_up.t(), 1)  # (T, F/P)
        return reduce_scatter_tokens(h @ weights.down, group)  # (T, H) partial -> (T/P, H)

    def comm_volume(self, shape, tokens, P, dtype: torch.dtype, recompute="none") -> CommVolume:
        vol = CommVolume()
        v = (P - 1) * (tokens // P) * shape.hidden * torch.empty((), dtype=dtype).element_size()
        for phase in ("forward", "backward"):
            vol.add(phase, "all_gather", 2 * v)
            vol.add(phase, "reduce_scatter", 2 * v)
        if recompute == "selective":
            vol.add("backward", "all_gather", v)
        elif recompute == "full":
            vol.add("backward", "all_gather", 2 * v)
            vol.add("backward", "reduce_scatter", v)
        return vol
