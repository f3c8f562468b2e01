"""Measured peak memory of a training step (DESIGN 6): torch.cuda.max_memory_allocated on CUDA,
torch's MemTracker (parameters, gradients, optimizer state, activations, temporaries) elsewhere."""

from __future__ import annotations

import gc
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker

__all__ = ["PeakMemory", "TotalMemTracker"]


class TotalMemTracker(MemTracker):
    """MemTracker without its per-parameter gradient hooks: they only label gradients for the
    per-module breakdown (totals count every tensor anyway), and a frozen parameter
    (requires_grad False, e.g. a layer GRASS freezes) refuses hooks."""

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks=True):
        return super()._track_module_params_and_buffers(module, install_grad_hooks=False)


class PeakMemory:
    """`with PeakMemory(device, model, optimizers): ...` then `.peak_bytes`: the most bytes this
    rank held at once inside the block. On CPU the tracker sees every tensor the modules and
    optimizers own plus everything allocated inside the block; `enabled=False` measures nothing
    (peak_bytes stays 0)."""

    def __init__(
        self,
        device: torch.device,
        model: nn.Module,
        optimizers: Iterable[torch.optim.Optimizer] = (),
        *,
        enabled: bool = True,
    ) -> None:
        self.device, self.model, self.optimizers = device, model, list(optimizers)
        self.enabled = enabled
        self.peak_bytes = 0
        self._tracker: MemTracker | None = None

    def __enter__(self) -> PeakMemory:
        if not self.enabled:
            return self
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._tracker = TotalMemTracker()
            self._tracker.track_external(self.model, *self.optimizers)
            self._tracker.__enter__()
        return self

    def next_micro_batch(self) -> None:
        """Call between micro-batches: the tracker keeps per-module statistics of one forward
        and backward only (the step's peak so far is kept)."""
        if self._tracker is not None:
            self._tracker.reset_mod_stats()

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            tracker, self._tracker = self._tracker, None
            tracker.__exit__(*exc)
            if exc[0] is None:
                self.peak_bytes = int(tracker.get_tracker_snapshot("peak")[self.device]["Total"])
