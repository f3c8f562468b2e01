"""The optimizer wrapper that runs GRASS's schedule: probing steps, then windows of `period`
steps, each training `gamma` drawn layers (all of them in `full` mode)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from paradyse import OptimizerWrapper

from .sampler import MeanGradientNorms, sampling_probabilities

__all__ = ["Grass", "MODES"]

MODES = ("grass", "static", "uniform", "full")


class Grass(OptimizerWrapper):
    """Which layers train in each step, which steps only probe, where optimizer state lives.

    Step s < probe_steps probes (grass and static modes): every layer computes its gradient,
    nothing is updated, and the MGN of every layer is their mean. After it, window
    w = (s - probe_steps) // period trains the layers drawn at its start."""

    def __init__(self, options, numels: Sequence[int], seed: int) -> None:
        self.options = options
        self.layers = len(numels)
        self.mgn = MeanGradientNorms(self.layers, numels)
        self.generator = np.random.Generator(np.random.PCG64(seed))
        self.probe_steps = options.probe_steps if options.mode in ("grass", "static") else 0
        self.window: int | None = None
        """The window the current draw belongs to; None before the first draw."""
        self.current: list[int] = []
        """The layers that train in the current window."""
        self.history: list[list[int]] = []
        """Every drawn set, in order (for the metrics and the tests)."""

    # ---------------------------------------------------------------- the schedule
    def trainable_layers(self, step: int, layers: int) -> Sequence[int] | None:
        if self.options.mode == "full" or step < self.probe_steps:
            return None
        window = (step - self.probe_steps) // self.options.period
        if window != self.window:
            self._new_window(window)
        return self.current

    def _new_window(self, window: int) -> None:
        mode, options = self.options.mode, self.options
        if self.window is None:  # after probing: every layer measured at once
            self.mgn.close_window(None, alpha=1.0)
        elif mode == "grass":  # the layers of the window that ends refresh their MGN
            self.mgn.close_window(self.current, options.alpha)
        uniform = np.full(self.layers, 1.0 / self.layers)
        p = uniform if mode == "uniform" else self.probabilities()
        drawn = self.generator.choice(self.layers, options.gamma, replace=False, p=p)
        self.window, self.current = window, sorted(int(i) for i in drawn)
        self.history.append(self.current)

    def probabilities(self) -> np.ndarray:
        """The sampling probabilities of the layers now (unmeasured layers count as the mean)."""
        values = self.mgn.values.copy()
        known = ~np.isnan(values)
        values[~known] = values[known].mean() if known.any() else 0.0
        return sampling_probabilities(values, self.options.tau, floor=self.options.min_prob,
                                      relative=self.options.relative_tau)  # fmt: skip

    def updates(self, step: int) -> bool:
        return step >= self.probe_steps

    def after_step(self, result) -> None:
        """Probing steps measure every layer; grass windows measure the drawn ones."""
        if result.step < self.probe_steps or self.options.mode == "grass":
            self.mgn.record(result.layer_grad_norms)

    # ---------------------------------------------------------------- optimizer state
    def state_device(self, index: int, trainable: bool) -> str | None:
        return "cpu" if self.options.offload and not trainable else None

    def forget_state(self, index: int, trainable: bool) -> bool:
        return self.options.reset_state and not trainable

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "mgn": self.mgn.state_dict(),
            "window": self.window,
            "current": list(self.current),
            "history": [list(s) for s in self.history],
            "generator": self.generator.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mgn.load_state_dict(state["mgn"])
        self.window = state["window"]
        self.current = [int(i) for i in state["current"]]
        self.history = [[int(i) for i in s] for s in state["history"]]
        self.generator.bit_generator.state = state["generator"]
