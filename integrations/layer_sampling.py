"""Layer sampling: `count` random switchable layers train for `period` steps at a time, the others
are frozen (no weight gradients; the planner prices them as frozen) and, with `offload`, keep
their optimizer state on the CPU. The embedding, the head and the final norm train every step.

Turn it on from the config alone:

    [integrations.layer_sampling]
    count = 2      # layers trained at a time
    period = 3     # steps between draws
    offload = true # frozen layers' AdamW moments on the CPU

The draws come from one seeded generator that advances with every draw; its state is saved in
checkpoints (`state_dict`), so a resumed run samples exactly the layers an uninterrupted one does.
Every rank holds the same generator, so every rank picks the same layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from paradyse import OptimizerWrapper
from paradyse.integration import Integration, RunContext

__all__ = ["Options", "LayerSampling", "plug_in"]


@dataclass(frozen=True)
class Options:
    """The keys of [integrations.layer_sampling]."""

    count: int = 1
    """Switchable layers trained at a time."""
    period: int = 5
    """Steps between draws."""
    seed: int = -1
    """Seed of the draws (-1: the run's train.seed)."""
    offload: bool = True
    """Keep frozen layers' optimizer state on the CPU."""

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"count must be at least 1, got {self.count}")
        if self.period < 1:
            raise ValueError(f"period must be at least 1, got {self.period}")


class LayerSampling(OptimizerWrapper):
    """The optimizer wrapper: which layers train in a step, where frozen layers' state lives."""

    def __init__(self, options: Options, layers: int, seed: int) -> None:
        if options.count > layers:
            raise ValueError(
                f"[integrations.layer_sampling] count {options.count} exceeds the model's "
                f"{layers} layers"
            )
        self.options, self.layers = options, layers
        self.generator = np.random.Generator(np.random.PCG64(seed))
        self.window: int | None = None
        """The period the current draw belongs to (step // period)."""
        self.current: list[int] = []
        """The layers that train in the current period."""
        self.draws = 0

    def trainable_layers(self, step: int, layers: int) -> Sequence[int]:
        window = step // self.options.period
        if window != self.window:
            chosen = self.generator.choice(layers, self.options.count, replace=False)
            self.window, self.current = window, sorted(int(i) for i in chosen)
            self.draws += 1
        return self.current

    def state_device(self, index: int, trainable: bool) -> str | None:
        return "cpu" if self.options.offload and not trainable else None

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "current": list(self.current),
            "draws": self.draws,
            "generator": self.generator.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window, self.current = state["window"], [int(i) for i in state["current"]]
        self.draws = int(state["draws"])
        self.generator.bit_generator.state = state["generator"]


def plug_in(options: Options, run: RunContext) -> Integration:
    seed = run.seed if options.seed < 0 else options.seed
    sampler = LayerSampling(options, run.layers, seed)
    return Integration(optimizer_wrapper=sampler, state=sampler)
