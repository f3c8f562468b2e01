"""The one way to build a planner: for the trainer, `planners.explain` and the benchmarks alike.

A `PlanningSetup` names everything a plan depends on (the model's shape, the machine and its
profile, the group sizes and nodes, the dtype, the budget, the optimizer's sharding, the loss's
logits chunk), prices the options once, and builds `Planner`s for any method over those shared
cost tables. Two callers with the same setup get the same plans and predicted peaks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from cost_models import LOGITS_CHUNK, CostModel, Hardware, Profile, detect, static_memory
from cost_models.counts import dtype_name
from cost_models.static import vocab_transient_bytes

from .method import Method
from .options import LayerCosts, Supports, config_supports, enumerate_options
from .planner import HYSTERESIS, Planner

__all__ = ["PlanningSetup"]


@dataclass(frozen=True)
class PlanningSetup:
    """A model on a machine: the cost tables, static memory and budget every planner of a run
    shares. `model` is any object with hidden, heads, kv_heads, head_dim, ffn_hidden, layers and
    vocab (`paradyse.ModelConfig`, `planners.ModelSpec`), and optionally `moe` (its MoE MLP, None:
    all dense) with `moe_layer(i)`: the MoE layers get their own cost rows."""

    model: Any
    hardware: Hardware | None = None
    """The machine (None: `cost_models.detect()`, this one)."""
    sp: int = 1
    dp: int = 1
    dtype: str = "float32"
    budget_bytes: float | None = None
    """Per rank; None: the device's memory."""
    profile: Profile | None = None
    """Measured rates (`cost_models.profile`); None: the hardware's datasheet rates."""
    shard_optimizer: bool = False
    """ZeRO-1: AdamW state sharded over dp."""
    devices_per_node: int | None = None
    """Ranks per node (torchrun's LOCAL_WORLD_SIZE); None: the hardware's devices per node."""
    strategies: Sequence[str] | None = None
    """The strategies to consider (None: all)."""
    recomputes: Sequence[str] | None = None
    """The recompute modes to consider (None: all)."""
    supports: Supports = field(default=config_supports, repr=False)
    """Which options can run (the cost model's check; the trainer passes parallel_lib's)."""
    group_sizes: Sequence[int] | None = None
    """Sub-group sizes g < sp a micro-batch may run on (`parallel_lib.group_size`). None: every
    divisor of sp when every strategy is allowed and no layer is a mixture of experts (MoE
    layers run on the whole group), else none."""
    group_size: int | None = None
    """Force sub-groups of this size on every micro-batch (with fewer sequences than sub-groups
    the last train one token with no target); None: the planner chooses."""
    logits_chunk: int = LOGITS_CHUNK
    """Tokens per chunk of the loss's head and cross-entropy (`train.logits_chunk`): the LM
    head's transient is one chunk's logits (`cost_models.logits_bytes`); 0: the whole logits."""

    def __post_init__(self) -> None:
        if self.hardware is None:
            object.__setattr__(self, "hardware", detect())
        moe = self.moe
        if self.moe_layers:
            shape = moe.shape if hasattr(moe, "shape") else moe  # a MoeConfig or a MoeShape
            problem = shape.layout_problem(self.sp)
            if problem:
                raise ValueError(problem)
        for name in ("sp", "dp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.logits_chunk, int) or self.logits_chunk < 0:
            raise ValueError(f"logits_chunk must be tokens >= 0, got {self.logits_chunk!r}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if self.budget_bytes is not None and not self.budget_bytes > 0:
            raise ValueError(f"the memory budget must be positive, got {self.budget_bytes}")
        if self.profile is not None:
            self.profile.check_matches(dtype=self.dtype)
        if self.group_size is not None and (self.group_size < 1 or self.sp % self.group_size):
            divisors = [d for d in range(1, self.sp + 1) if self.sp % d == 0]
            raise ValueError(
                f"parallel.group_size={self.group_size} does not divide sp={self.sp}; choose "
                f"among {divisors} (0: the planner chooses)"
            )
        if self.group_size is not None and self.group_size < self.sp and self.moe_layers:
            raise ValueError(
                f"parallel.group_size={self.group_size}: mixture-of-experts layers run on the "
                "whole sp group; leave it 0 (or set it to sp)"
            )

    @property
    def sub_group_sizes(self) -> tuple[int, ...]:
        """The sub-group sizes g < sp whose options are priced (see `group_sizes`)."""
        if self.group_size is not None:
            return (self.group_size,) if self.group_size < self.sp else ()
        if self.group_sizes is not None:
            return tuple(int(g) for g in self.group_sizes if g < self.sp)
        if self.strategies is not None or self.moe_layers:
            return ()
        return tuple(d for d in range(1, self.sp) if self.sp % d == 0)

    @property
    def budget(self) -> float:
        """The per-rank budget in bytes."""
        if self.budget_bytes is None:
            return float(self.hardware.memory_bytes)
        return float(self.budget_bytes)

    @property
    def nodes_spanned(self) -> int:
        """Nodes one sp group spans (its collectives use the inter-node link when above 1)."""
        per_node = self.devices_per_node or self.hardware.devices_per_node
        return -(-self.sp // max(1, per_node))

    @property
    def shape(self):
        """The layer shape: the model's `shape` (a `paradyse.ModelConfig`'s LayerShape), or the
        model itself (a `ModelSpec` has the shape fields)."""
        return getattr(self.model, "shape", self.model)

    @property
    def moe(self):
        """The model's mixture-of-experts MLP shape (its `moe`: a `paradyse.moe.MoeConfig`, a
        `parallel_lib.moe.MoeShape`), or None."""
        return getattr(self.model, "moe", None)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The layers with the MoE MLP: the model's `moe_layer(i)`, else those from the MoE
        config's `first_dense_layers` (default 0) on."""
        moe = self.moe
        if moe is None:
            return ()
        is_moe = getattr(self.model, "moe_layer", None)
        if is_moe is None:
            first = getattr(moe, "first_dense_layers", 0)
            return tuple(range(first, self.model.layers))
        return tuple(i for i in range(self.model.layers) if is_moe(i))

    @cached_property
    def costs(self) -> LayerCosts:
        """The options the setup allows, priced per micro-batch (cached)."""
        options = enumerate_options(
            self.shape, self.sp, self.strategies, self.recomputes, supports=self.supports,
            group_sizes=self.sub_group_sizes,
        )  # fmt: skip
        return LayerCosts(
            CostModel(self.hardware, self.profile), self.shape, self.model.layers, self.sp,
            options, dtype=self.dtype, vocab=self.model.vocab, nodes_spanned=self.nodes_spanned,
            moe=self.moe, moe_layers=self.moe_layers, logits_chunk=self.logits_chunk,
        )  # fmt: skip

    @cached_property
    def static(self):
        """Weights, gradients and optimizer state per rank (`cost_models.StaticMemory`)."""
        m = self.model
        return static_memory(
            self.shape, m.layers, m.vocab, sp=self.sp, dp=self.dp, dtype=self.dtype,
            tied_embeddings=getattr(m, "tie_embeddings", False),
            shard_optimizer=self.shard_optimizer, moe=self.moe, moe_layers=len(self.moe_layers),
        )  # fmt: skip

    @property
    def static_bytes(self) -> int:
        """What a micro-batch's plan must fit beside: the static memory and the vocabulary
        weight and gradient the embedding and head gather."""
        m = self.model
        return self.static.total + vocab_transient_bytes(m.vocab, m.hidden, self.dtype)

    def planner(
        self, method: str | Method = "exact", hysteresis: float = HYSTERESIS,
        budget_bytes: float | None = None,
    ) -> Planner:  # fmt: skip
        """A planner of `method` over the shared cost tables (ValueError, one line, for a static
        method naming no option of the setup); `budget_bytes` replaces the setup's budget."""
        return Planner(
            self.costs, self.budget if budget_bytes is None else float(budget_bytes),
            static_bytes=self.static_bytes,
            offloadable_bytes=self._per_layer("layer_moments"),
            frozen_bytes=self._per_layer("layer_gradients"),
            method=method, hysteresis=hysteresis, group_size=self.group_size,
        )  # fmt: skip

    def _per_layer(self, name: str) -> list[int]:
        """`static.<name>` of every layer (a MoE layer's `moe_<name>`)."""
        moe = set(self.moe_layers)
        dense, expert = getattr(self.static, name), getattr(self.static, f"moe_{name}")
        return [expert if i in moe else dense for i in range(self.model.layers)]
