"""The interface every parallel strategy implements over the unified layout."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor

from ..groups import CommGroup
from ..shape import AttentionWeights, LayerShape, MlpWeights

__all__ = ["Strategy", "RECOMPUTE_MODES"]

RECOMPUTE_MODES = ("none", "selective", "full")
"""none: keep all activations; selective: recompute the MLP half of the layer (norm, gate/up,
SwiGLU, down) in backward; full: recompute the whole layer from its input."""


class Strategy(ABC):
    """A way to run one decoder layer's attention and MLP on a group of P ranks.

    Every strategy reads x as this rank's (T/P, H) tokens in the zigzag layout and the weights as
    its 1/P shards (`AttentionWeights`, `MlpWeights`), and returns (T/P, H) in the same layout, so
    consecutive layers may use different strategies without moving any tensor.
    """

    name: ClassVar[str]
    holds_whole_weights: ClassVar[bool]
    holds_whole_sequences: ClassVar[bool]

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
        batch: Any,
        group: CommGroup,
        *,
        recomputed: bool = False,
    ) -> Tensor:
        """Self-attention of the normalised local tokens: QKV projection, RoPE, causal varlen
        attention, output projection. `batch.layout` is the micro-batch's `ZigzagLayout`.
        `recomputed` is True inside an activation-checkpointed region."""

    @abstractmethod
    def mlp(
        self, x: Tensor, weights: MlpWeights, group: CommGroup, *, recomputed: bool = False
    ) -> Tensor:
        """SwiGLU MLP of the normalised local tokens."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
