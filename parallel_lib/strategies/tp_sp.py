"""`tp_sp`: Megatron tensor parallelism with sequence parallelism."""

from __future__ import annotations

from ..comm import reduce_scatter_tokens
from ..sequence_parallel import gather_tokens_linear
from .base import Strategy
from .common import attend_gathered


class TensorSequenceParallel(Strategy):
    """Weights stay as shards; tokens are all-gathered before each projection and the partial
    outputs reduce-scattered back (Korthikanti et al. 2022). Each rank attends with heads/P heads
    over whole sequences; only the local (T/P, H) inputs of the projections are saved, the backward
    gathers them again.

    Communication per layer and rank, with Tl = T/P tokens per rank, H hidden, b bytes per element,
    v = (P-1)·Tl·H·b:
      forward:  all-gather 2v (attention, MLP inputs), reduce-scatter 2v (their outputs)
      backward: all-gather 4v (the inputs again, the output gradients), reduce-scatter 2v
      recompute selective: unchanged (the recomputation's gather of the MLP input is kept for the
      backward); recompute full: reduce-scatter +v (the attention output is recomputed; the MLP's
      output reduce-scatter is not, nothing after it is saved)
      frozen (no weight gradients): backward all-gather 2v; a recomputation's gathers are then
      extra (+v selective, +2v full)
    """

    name = "tp_sp"
    holds_whole_weights = False
    holds_whole_sequences = True
    mlp_mode = "tensor_parallel"

    def attention(self, x, weights, layout, group, *, recomputed=False):
        shape, P = weights.shape, group.size
        # (T/P, H) -> (T, qkv_rows): this rank's heads for every token, gathered order
        y = gather_tokens_linear(x, weights.qkv, group, keep_gathered=recomputed)
        o = attend_gathered(y, layout, shape, P, range(P), 1, None, self.attn_backend)
        return reduce_scatter_tokens(o @ weights.out, group)  # (T, H) partial -> (T/P, H)
