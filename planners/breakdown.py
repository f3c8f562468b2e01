"""Where a plan's memory goes: one rank's peak split into the terms the planner adds up, and the
longest single sequence each option fits with that split (`benchmarks/simulate_paper.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cost_models import layer_memory, logits_bytes

from .build import PlanningSetup
from .method import Method
from .options import Option

__all__ = ["MemoryBreakdown", "plan_breakdown", "longest_with_breakdown"]


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on one rank at a plan's peak, as `Planner` counts them: the fixed bytes, the
    gathered vocabulary, every layer's saved activations and the larger of the largest layer
    transient (its weight buffers included) and the LM head's logits."""

    weights: int
    gradients: int
    optimizer: int
    vocabulary: int
    """The embedding's and LM head's whole weight and gradient, gathered for the micro-batch."""
    saved: int
    """Every layer's saved activations (each layer's input included)."""
    transient: int
    """The largest layer transient, less its weight buffers."""
    layer_weights: int
    """That layer's gathered or streamed weights and their gradient buffers at its peak: what its
    transient would lose if they took no memory."""
    logits: int
    """The LM head's logits: one more transient, the peak takes the larger."""

    @property
    def fixed(self) -> int:
        """Weights, gradients and optimizer state."""
        return self.weights + self.gradients + self.optimizer

    @property
    def gathers(self) -> int:
        """Weight gathers: the vocabulary's and the largest transient layer's."""
        return self.vocabulary + self.layer_weights

    @property
    def peak(self) -> int:
        return (
            self.fixed + self.vocabulary + self.saved
            + max(self.transient + self.layer_weights, self.logits)
        )  # fmt: skip


def plan_breakdown(
    setup: PlanningSetup, options: Sequence[Option], seq_lens: Sequence[int]
) -> MemoryBreakdown:
    """The breakdown of a micro-batch of `seq_lens` with `options[l]` on layer l (dense,
    trainable layers on the whole group); its `peak` is the planner's predicted peak."""
    if len(options) != setup.model.layers:
        raise ValueError(f"{len(options)} options for {setup.model.layers} layers")
    if setup.moe_layers or any(o.group is not None for o in options):
        raise ValueError("a memory breakdown takes dense layers on the whole group")
    costs, static = setup.costs, setup.static
    model, P, lens = costs.model, setup.sp, list(seq_lens)
    rows = {}
    for o in dict.fromkeys(options):
        cost = model.layer_cost(setup.shape, o.strategy, o.recompute, lens, P, dtype=setup.dtype,
                                inner=o.inner, nodes_spanned=setup.nodes_spanned)  # fmt: skip
        free = layer_memory(setup.shape, o.strategy, lens, P, dtype=setup.dtype,
                            recompute=o.recompute, inner=o.inner, weights_free=True,
                            reduce_scatter_copy=model.reduce_scatter_copy)  # fmt: skip
        rows[o] = (cost.saved_bytes, cost.transient_bytes, cost.transient_bytes - free.transient)
    largest = max(options, key=lambda o: rows[o][1])
    vocab = setup.model.vocab
    tokens = sum(costs.signature(lens))
    return MemoryBreakdown(
        weights=static.weights, gradients=static.gradients, optimizer=static.optimizer,
        vocabulary=setup.static_bytes - static.total,
        saved=sum(rows[o][0] for o in options),
        transient=rows[largest][1] - rows[largest][2], layer_weights=rows[largest][2],
        logits=logits_bytes(tokens, vocab, P, setup.logits_chunk) if vocab else 0,
    )  # fmt: skip


def longest_with_breakdown(
    setup: PlanningSetup, option: Option, budget_bytes: float
) -> tuple[int, MemoryBreakdown | None]:
    """The longest single sequence `option` on every layer fits within `budget_bytes` (0: none),
    with the breakdown at that length."""
    planner = setup.planner(Method("static", option.fixed_label), budget_bytes=budget_bytes)
    tokens = planner.longest_fitting()
    if not tokens:
        return 0, None
    return tokens, plan_breakdown(setup, [option] * setup.model.layers, [tokens])
