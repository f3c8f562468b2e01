"""The engine's seams for integrations (DESIGN 10): `LayerHooks` around every switchable layer
and an `OptimizerWrapper` that decides which layers train, which steps only measure gradients,
and where each layer's optimizer state lives. Integrations override what they need and never
patch the engine."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .batch import PackedBatch
    from .engine import StepResult

__all__ = ["LayerHooks", "OptimizerWrapper", "AttachedHooks"]


class LayerHooks:
    """Callbacks around every switchable layer; override what you need. `index` is the layer's
    position in `model.switchable_layers()`. On a sub-group dealt no sequence of the
    micro-batch the batch is the engine's one idle token (`batch.num_loss_tokens == 0`)."""

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


class AttachedHooks:
    """`LayerHooks` attached to a model's switchable layers through torch module hooks (what
    the engine installs): before and after every layer's forward, and after its backward once
    the gradients of all its trainable parameters exist."""

    def __init__(self, hooks: Sequence[LayerHooks], layers: Sequence[torch.nn.Module]) -> None:
        self.hooks = list(hooks)
        self._pending: dict[int, object] = {}
        self._handles = []
        if not self.hooks:
            return
        for i, layer in enumerate(layers):
            self._handles += [
                layer.register_forward_pre_hook(partial(self._before_layer, i), with_kwargs=True),
                layer.register_forward_hook(partial(self._after_layer, i), with_kwargs=True),
            ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @staticmethod
    def _call_args(args, kwargs):
        """(x, batch) of a layer call, given positionally or by keyword."""
        named = dict(zip(("x", "batch"), args, strict=False)) | kwargs
        return named["x"], named["batch"]

    def _before_layer(self, index: int, module, args, kwargs) -> None:
        x, batch = self._call_args(args, kwargs)
        for hook in self.hooks:
            hook.before_forward(index, x, batch)

    def _after_layer(self, index: int, module, args, kwargs, output):
        batch = self._call_args(args, kwargs)[1]
        for hook in self.hooks:
            replaced = hook.after_forward(index, output, batch)
            if replaced is not None:
                output = replaced
        if torch.is_grad_enabled():
            self._watch_backward(index, module)
        return output

    def _watch_backward(self, index: int, layer: torch.nn.Module) -> None:
        named = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
        if not named:
            return

        def fire(grads) -> None:
            handle = self._pending.pop(index, None)
            if handle is not None:
                handle.remove()
            given = {n: g for (n, _), g in zip(named, grads, strict=True) if g is not None}
            for hook in self.hooks:
                hook.after_backward(index, given)

        old = self._pending.pop(index, None)
        if old is not None:
            old.remove()
        self._pending[index] = torch.autograd.graph.register_multi_grad_hook(
            [p for _, p in named], fire, mode="all"
        )
