"""The MLP half of a switchable layer as a pluggable module: its parameters (this rank's 1/P
shards) and the `parallel_lib.mlp` kind that runs them under every strategy.

A module here owns three things: its parameters, how they are cut out of whole weights
(`load_full`), and their logical whole tensors for checkpoints (`logical_parts`). A new MLP (a
mixture of experts) is a new module with its own `parallel_lib` kind.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from parallel_lib import SWIGLU, LayerShape, MlpWeights

from .sharding import mark_sharded

__all__ = ["DenseMLP", "LogicalPart"]

LogicalPart = tuple[str, int, int, int | None]
"""(name, row start, row stop, global rows): rows [start, stop) of a stored parameter are this
rank's block of the logical whole tensor `name` of `global rows` rows (None: replicated)."""


class DenseMLP(nn.Module):
    """The dense SwiGLU MLP's shards: gate_up (2F/P, H) = [gate rows; up rows] (column shards of
    W_gate, W_up) and down (F/P, H) (this rank's input columns of W_down, transposed)."""

    kind = SWIGLU

    def __init__(
        self, shape: LayerShape, P: int, *, dtype: torch.dtype, device: torch.device | str | None
    ) -> None:
        super().__init__()
        self.shape, self.P = shape, P
        kw = {"dtype": dtype, "device": device}
        f = shape.ffn_hidden // P
        self.gate_up = mark_sharded(nn.Parameter(torch.empty(2 * f, shape.hidden, **kw)))
        self.down = mark_sharded(nn.Parameter(torch.empty(f, shape.hidden, **kw)))

    def weights(self, batch=None) -> MlpWeights:
        return MlpWeights(self.gate_up, self.down, self.shape)

    @staticmethod
    def shards_of(full: dict[str, Tensor], shape: LayerShape, P: int, rank: int) -> dict:
        """{'gate_up', 'down'}: rank `rank`'s shards of whole w_gate, w_up, w_down."""
        f = shape.ffn_hidden // P
        rows = slice(rank * f, (rank + 1) * f)
        return {
            "gate_up": torch.cat([full["w_gate"][rows], full["w_up"][rows]]),
            "down": full["w_down"][:, rows].t(),
        }

    @staticmethod
    def whole_from(shards: list[dict[str, Tensor]], shape: LayerShape) -> dict[str, Tensor]:
        """Inverse of `shards_of` over every rank's shards (rank order)."""
        f = shape.ffn_hidden // len(shards)
        gate_up = [s["gate_up"] for s in shards]
        return {
            "w_gate": torch.cat([t[:f] for t in gate_up]),
            "w_up": torch.cat([t[f:] for t in gate_up]),
            "w_down": torch.cat([s["down"] for s in shards]).t(),
        }

    def replicated_parameters(self) -> list[nn.Parameter]:
        return []

    def logical_parts(self, prefix: str) -> dict[str, list[LogicalPart]]:
        """Per parameter name: the logical whole tensors its rows belong to."""
        f, F = self.shape.ffn_hidden // self.P, self.shape.ffn_hidden
        return {
            "gate_up": [(f"{prefix}w_gate", 0, f, F), (f"{prefix}w_up", f, 2 * f, F)],
            "down": [(f"{prefix}w_down_t", 0, f, F)],
        }
