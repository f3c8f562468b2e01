"""The MLP half of a decoder layer, pluggable: one class per kind of MLP, with one implementation
for every way a strategy holds weights and tokens (its `mlp_mode`).

Modes: `local` (whole weights, one rank), `tensor_parallel` (Megatron column/row TP over the
gathered tokens), `zero3` (whole weights gathered one layer at a time, local tokens) and
`streamed` (weight shards stream round the ring, no rank holds a whole weight). A new MLP (a
mixture of experts) is a new `Mlp` subclass; the strategies and the layer step stay as they are.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from .comm import reduce_scatter_tokens
from .groups import CommGroup
from .ops import swiglu
from .sequence_parallel import gather_tokens_linear
from .shape import LayerShape, MlpWeights, random_shard
from .streaming import streamed_linear
from .zero import zero_linear

__all__ = ["MLP_MODES", "Mlp", "SwiGLU", "SWIGLU", "get_mlp", "MLP_NAMES"]

MLP_MODES = ("local", "tensor_parallel", "zero3", "streamed")
"""How a strategy holds the MLP's weights and tokens (`Strategy.mlp_mode`)."""


class Mlp(ABC):
    """One kind of MLP: `mlp(x, weights, group, mode)` maps the normalised local tokens (T/P, H)
    to (T/P, H) in the same layout, with the implementation of `mode`. `recomputed` is True
    inside an activation-checkpointed region (gathered operands may be kept for the backward)."""

    name: ClassVar[str]

    def __call__(
        self, x: Tensor, weights: Any, group: CommGroup, mode: str, *, recomputed: bool = False
    ) -> Tensor:
        if mode not in MLP_MODES:
            raise ValueError(f"unknown MLP mode {mode!r}; choose from {', '.join(MLP_MODES)}")
        return getattr(self, mode)(x, weights, group, recomputed=recomputed)

    @abstractmethod
    def random_weights(self, shape: LayerShape, P: int, generator: torch.Generator, **kw) -> Any:
        """One rank's shards drawn at random (for measuring; `kw`: dtype, device)."""

    @abstractmethod
    def local(self, x: Tensor, weights: Any, group: CommGroup, *, recomputed: bool) -> Tensor:
        """P = 1: whole weights, whole sequences."""

    @abstractmethod
    def tensor_parallel(
        self, x: Tensor, weights: Any, group: CommGroup, *, recomputed: bool
    ) -> Tensor:
        """Weights stay as shards; tokens are gathered and the partial outputs reduce-scattered."""

    @abstractmethod
    def zero3(self, x: Tensor, weights: Any, group: CommGroup, *, recomputed: bool) -> Tensor:
        """Whole weights gathered for the layer, local tokens."""

    @abstractmethod
    def streamed(self, x: Tensor, weights: Any, group: CommGroup, *, recomputed: bool) -> Tensor:
        """Weight shards stream round the ring; no rank holds a whole weight."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SwiGLU(Mlp):
    """The dense SwiGLU MLP, down(silu(gate(x)) * up(x)), on `MlpWeights` shards (gate_up
    (2F/P, H) = [gate rows; up rows], down (F/P, H))."""

    name = "swiglu"

    def random_weights(self, shape, P, generator, **kw) -> MlpWeights:
        f, H = shape.ffn_hidden // P, shape.hidden
        return MlpWeights(
            random_shard(2 * f, H, generator, **kw), random_shard(f, H, generator, **kw), shape
        )

    def local(self, x, weights: MlpWeights, group, *, recomputed):
        return swiglu(x @ weights.gate_up.t(), 1) @ weights.down

    def tensor_parallel(self, x, weights: MlpWeights, group, *, recomputed):
        y = gather_tokens_linear(x, weights.gate_up, group, keep_gathered=recomputed)
        h = swiglu(y, 1)  # (T, 2F/P) -> (T, F/P)
        return reduce_scatter_tokens(h @ weights.down, group)  # (T, H) partial -> (T/P, H)

    def zero3(self, x, weights: MlpWeights, group, *, recomputed):
        P = group.size
        y = zero_linear(x, weights.gate_up, group, input_major=False, keep_gathered=recomputed)
        h = swiglu(y, P)  # (T/P, 2F) -> (T/P, F), rank-major columns
        return zero_linear(h, weights.down, group, input_major=True, keep_gathered=recomputed)

    def streamed(self, x, weights: MlpWeights, group, *, recomputed):
        P = group.size
        y = streamed_linear(x, weights.gate_up, group, input_major=False)  # (T/P, 2F)
        return streamed_linear(swiglu(y, P), weights.down, group, input_major=True)


SWIGLU = SwiGLU()
"""The dense MLP every layer has unless it says otherwise."""

_REGISTRY: dict[str, Mlp] = {SWIGLU.name: SWIGLU}
MLP_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_mlp(name: str) -> Mlp:
    """The MLP kind registered under `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown MLP {name!r}; choose from {', '.join(MLP_NAMES)}")
    return _REGISTRY[name]
