"""The context-parallel strategy of every micro-batch, chosen by ParaDySe's cost model and planner.

Megatron-Core keeps the weights (sharded over tensor parallelism) and every projection; what is
left to choose is how the core attention of a micro-batch runs over the context-parallel group
of P ranks: `ring` (zigzag ring attention, K/V travel round the group), `ulysses` (an all-to-all
trades tokens for heads, exact attention over whole sequences: needs P to divide the rank's query
and key/value heads) or `usp` (Ulysses inside groups of u ranks, ring across them: needs
`init_usp_groups`). All three take and return the same zigzag token layout, so any layer may use
any of them on any micro-batch.

`StrategyChooser` prices these options for the layer's shape on this rank (heads/tp, ffn/tp) with
`cost_models.CostModel` (the hardware's datasheet rates, or a measured profile) and asks a
`planners.Planner` for each micro-batch's length signature. The weights' collectives the cost
model counts for ParaDySe's own ZeRO-3 strategies are the same for the three options, so they do
not move the choice. Hysteresis is 0: switching costs nothing here (the layout is the same), and a
plan that is a pure function of the lengths is the same on every cp rank, in every layer and in
the recomputation of an activation-checkpointed forward.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace

from cost_models import Hardware, Profile, detect
from parallel_lib import CommGroup
from planners import Option, PlanningSetup
from planners.models import ModelSpec

__all__ = ["CP_COMM_TYPES", "Choice", "StrategyChooser"]

CP_COMM_TYPES = {"p2p": "ring", "a2a": "ulysses", "a2a+p2p": "usp"}
"""Megatron's `TransformerConfig.cp_comm_type` -> the strategy it forces (None: the planner)."""

STRATEGIES = ("ring", "ulysses", "usp")


@dataclass(frozen=True)
class Choice:
    """How one layer's core attention runs a micro-batch over the cp group."""

    strategy: str
    """ring, ulysses or usp; local on a cp group of one rank."""
    inner: int
    """u, the all-to-all degree (ring 1, ulysses P); the ring runs over P/u ranks."""

    @property
    def name(self) -> str:
        return self.strategy if self.strategy != "usp" else f"usp{self.inner}"


def heads_allow(strategy: str, heads: int, kv_heads: int, P: int, inner: int | None) -> str:
    """'' when the strategy can run `heads`/`kv_heads` local heads on P cp ranks, else why not."""
    if strategy == "ring":
        return ""
    u = P if strategy == "ulysses" else inner
    if u is None or u < 2:
        return f"{strategy} needs an all-to-all degree of at least 2"
    if heads % u or kv_heads % u:
        return (
            f"{strategy} splits the rank's heads over {u} ranks, and its {heads} query / "
            f"{kv_heads} key-value heads are not divisible by {u}"
        )
    return ""


class StrategyChooser:
    """Chooses ring, ulysses or usp per micro-batch and layer (see the module doc). One chooser is
    shared by every layer of a model (`paradyse_gpt_layer_spec` passes it to them all).

    hardware: the machine the rates come from (None: `cost_models.detect()`); profile: measured
    rates (`python -m cost_models.profile`), else the hardware's datasheet rates; strategies: the
    ones to consider; method: the planner's method ('exact', 'paradyse' or 'static:NAME')."""

    def __init__(
        self,
        hardware: Hardware | None = None,
        profile: Profile | None = None,
        strategies: tuple[str, ...] = STRATEGIES,
        method: str = "exact",
    ) -> None:
        unknown = [s for s in strategies if s not in STRATEGIES]
        if unknown or not strategies:
            raise ValueError(f"strategies must be among {STRATEGIES}, got {strategies}")
        self.hardware, self.profile = hardware, profile
        self.strategies, self.method = tuple(strategies), method
        self._planners: dict[tuple, object] = {}
        self.counts: Counter[str] = Counter()
        """How often each choice was made (by `Choice.name`), every layer and call counted."""

    def planner(self, shape: ModelSpec, group: CommGroup, dtype: str):
        """The planner of this shape on this cp group (built once)."""
        P = group.size
        key = (shape, P, tuple(sorted(group.factors)), dtype)
        found = self._planners.get(key)
        if found is not None:
            return found

        def supports(option: Option, layer, size: int) -> tuple[bool, str]:
            if option.strategy == "usp" and option.inner not in group.factors:
                return False, "usp needs init_usp_groups() (its inner x outer groups)"
            reason = heads_allow(option.strategy, layer.heads, layer.kv_heads, size, option.inner)
            return not reason, reason

        setup = PlanningSetup(
            shape,
            hardware=self.hardware if self.hardware is not None else detect(),
            sp=P,
            dtype=dtype,
            budget_bytes=math.inf,  # Megatron sizes memory itself; the choice is about time
            profile=self.profile,
            strategies=[s for s in self.strategies if s != "usp" or P >= 4],
            recomputes=("none",),  # Megatron's own recompute settings stay in force
            supports=supports,
            group_sizes=(),
        )
        planner = setup.planner(self.method, hysteresis=0.0)
        self._planners[key] = planner
        return planner

    def choose(
        self, shape: ModelSpec, group: CommGroup, padded_lens, layer: int, dtype: str = "float32"
    ) -> Choice:
        """The choice for layer `layer` (0-based) of a micro-batch of these padded lengths."""
        P = group.size
        if P == 1:  # no context parallelism: varlen attention over whole sequences
            self.counts["local"] += 1
            return Choice("local", 1)
        if shape.heads % P or shape.kv_heads % P or self.strategies == ("ring",):
            # no all-to-all can split these heads over the group (and the cost model prices
            # heads split over all P ranks only): the ring is the one option
            choice = Choice("ring", 1)
        else:
            ffn = -(-shape.ffn_hidden // P) * P  # the MLP costs the same under every option
            priced = replace(shape, ffn_hidden=ffn)
            plan = self.planner(priced, group, dtype).plan(list(padded_lens))
            option = plan.options[min(layer, len(plan.options) - 1)]
            inner = {"ring": 1, "ulysses": P}.get(option.strategy, option.inner)
            choice = Choice(option.strategy, inner)
        self.counts[choice.name] += 1
        return choice
