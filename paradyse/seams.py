"""The engine's seams for integrations (DESIGN 10): `LayerHooks` around every switchable layer
and an `OptimizerWrapper` that decides which layers train, which steps only measure gradients,
and where each layer's optimizer state lives. Integrations override what they need and never
patch the engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .batch import PackedBatch
    from .engine import StepResult

__all__ = ["LayerHooks", "OptimizerWrapper"]


class LayerHooks:
    """Callbacks around every switchable layer; override what you need. `index` is the layer's
    position in `model.switchable_layers()`."""

    def before_forward(self, index: int, x: Tensor, batch: PackedBatch) -> None:
        """Called with the layer's input (T/P, H) before it runs."""

    def after_forward(self, index: int, y: Tensor, batch: PackedBatch) -> Tensor | None:
        """Called with the layer's output; return a tensor to replace it (same shape), or None."""

    def after_backward(self, index: int, grads: dict[str, Tensor]) -> None:
        """Called once the micro-batch's gradients of the layer's trainable parameters are
        computed, with those gradients (this micro-batch's contribution, before any reduction)."""


class OptimizerWrapper:
    """Which layers train in a step and where their optimizer state lives (GRASS's seam)."""

    def trainable_layers(self, step: int, layers: int) -> Sequence[int] | None:
        """Indices of the layers that train in `step`; None: all of them. Layers left out get
        no weight gradients and no update."""
        return None

    def state_device(self, index: int, trainable: bool) -> torch.device | str | None:
        """Where layer `index`'s optimizer state stays between steps; None: with its weights."""
        return None

    def updates(self, step: int) -> bool:
        """False: `step` computes the trainable layers' gradients and their norms (in the
        StepResult) but updates no weight and no optimizer state (GRASS's probing steps)."""
        return True

    def forget_state(self, index: int, trainable: bool) -> bool:
        """True: drop layer `index`'s optimizer state after this step (BAdam's reset of a layer
        leaving the trained set); it starts afresh when the layer next trains."""
        return False

    def after_step(self, result: StepResult) -> None:
        """Called on every rank with every step's result (its per-layer gradient norms)."""
