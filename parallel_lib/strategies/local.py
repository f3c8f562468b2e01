"""`local`: the plain single-rank layer (P = 1)."""

from __future__ import annotations

from ..shape import LayerShape
from .base import Strategy
from .common import attend_gathered


class LocalStrategy(Strategy):
    """Whole weights, whole sequences, one rank. Communication: none (0 bytes forward and
    backward, every recompute mode)."""

    name = "local"
    holds_whole_weights = True
    holds_whole_sequences = True
    mlp_mode = "local"

    def supports(self, shape: LayerShape, P: int) -> tuple[bool, str]:
        if P != 1:
            return False, (
                f"local runs on one rank only, but the group has P={P}; "
                "use tp_sp, ulysses, ring, usp or metp, or sp=1"
            )
        return super().supports(shape, P)

    def attention(self, x, weights, layout, group, *, recomputed=False):
        y = x @ weights.qkv.t()  # (T, H) -> (T, qkv_rows)
        o = attend_gathered(y, layout, weights.shape, 1, [0], 1, None, self.attn_backend)
        return o @ weights.out  # (T, heads*d) -> (T, H)
