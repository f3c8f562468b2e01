"""The interface every parallel strategy implements over the unified layout."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor

from ..groups import CommGroup
from ..layout import ZigzagLayout
from ..mlp import SWIGLU, Mlp
from ..shape import AttentionWeights, LayerShape

__all__ = ["Strategy", "RECOMPUTE_MODES"]

RECOMPUTE_MODES = ("none", "selective", "full")
"""none: keep all activations; selective: recompute the MLP half of the layer (norm, gate/up,
SwiGLU, down) in backward; full: recompute the whole layer from its input."""


class Strategy(ABC):
    """A way to run one decoder layer's attention and MLP on a group of P ranks.

    Every strategy reads x as this rank's (T/P, H) tokens in the zigzag layout and the weights as
    its 1/P shards (`AttentionWeights`, an MLP's weights), and returns (T/P, H) in the same
    layout, so consecutive layers may use different strategies without moving any tensor. The
    MLP half is the MLP kind's own implementation of the strategy's `mlp_mode` (`parallel_lib.mlp`).
    """

    name: ClassVar[str]
    holds_whole_weights: ClassVar[bool]
    holds_whole_sequences: ClassVar[bool]
    mlp_mode: ClassVar[str]
    """How the MLP half runs: one of `parallel_lib.mlp.MLP_MODES`."""

    def __init__(self, attn_backend: str = "auto") -> None:
        self.attn_backend = attn_backend

    def supports(self, shape: LayerShape, P: int) -> tuple[bool, str]:
        """(True, "") or (False, a reason that says what to change)."""
        if P < 1:
            return False, f"group size must be positive, got {P}"
        problem = shape.layout_problem(P)
        if problem:
            return False, f"{self.name}: {problem}"
        return True, ""

    def check(self, shape: LayerShape, P: int) -> None:
        ok, reason = self.supports(shape, P)
        if not ok:
            raise ValueError(reason)

    @abstractmethod
    def attention(
        self,
        x: Tensor,
        weights: AttentionWeights,
        layout: ZigzagLayout,
        group: CommGroup,
        *,
        recomputed: bool = False,
    ) -> Tensor:
        """Self-attention of the normalised local tokens: QKV projection, RoPE, causal varlen
        attention, output projection, over the micro-batch's `layout`. `recomputed` is True
        inside an activation-checkpointed region."""

    def mlp(
        self,
        x: Tensor,
        weights: Any,
        group: CommGroup,
        *,
        recomputed: bool = False,
        kind: Mlp = SWIGLU,
    ) -> Tensor:
        """The MLP of the normalised local tokens: `kind`'s implementation of this strategy's
        `mlp_mode` (the dense SwiGLU by default, on `MlpWeights`)."""
        return kind(x, weights, group, self.mlp_mode, recomputed=recomputed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
