"""The planner of a training run: the cost model, the options the strategies support, the
static memory, and the method the run's `--strategy`/`--planner`/`--recompute` ask for."""

from __future__ import annotations

import os

from cost_models import CostModel, Hardware, Profile, detect, static_memory
from cost_models.counts import dtype_name, itemsize
from parallel_lib import get_strategy
from planners import LayerCosts, Option, Planner, enumerate_options

from .model import ModelConfig

__all__ = [
    "ADAPTIVE", "build_planner", "planner_method", "strategy_supports", "vocab_transient_bytes"
]  # fmt: skip

ADAPTIVE = "adaptive"


def strategy_supports(option: Option, shape, P: int) -> tuple[bool, str]:
    """parallel_lib's own check of an option (what the engine will actually run)."""
    options = {"inner": option.inner} if option.inner else {}
    return get_strategy(option.strategy, **options).supports(shape, P)


def vocab_transient_bytes(config: ModelConfig, dtype: str) -> int:
    """The embedding's and LM head's whole (vocab, hidden) weight, gathered for a micro-batch,
    and its dense gradient before the reduce-scatter: live beside the logits in the head's
    backward, so counted with the static memory."""
    return 2 * config.vocab * config.hidden * itemsize(dtype)


def planner_method(strategy: str, planner: str, recompute: str | None) -> str:
    """`adaptive` -> the planner method; a strategy name -> static:NAME[+RECOMPUTE]."""
    if strategy == ADAPTIVE:
        return planner
    return f"static:{strategy}" + (f"+{recompute}" if recompute else "")


def build_planner(
    config: ModelConfig,
    *,
    sp: int,
    dp: int,
    strategy: str = ADAPTIVE,
    planner: str = "exact",
    recompute: str | None = None,
    budget_bytes: float | None = None,
    dtype: str = "float32",
    shard_optimizer: bool = False,
    profile: Profile | None = None,
    hardware: Hardware | None = None,
) -> Planner:
    """A Planner for `config` on a switchable group of `sp` (ValueError, one line, when the
    strategy cannot run the model there). budget_bytes None: the device's memory."""
    shape = config.shape
    dtype = dtype_name(dtype)
    hardware = hardware or detect()
    if strategy != ADAPTIVE:
        ok, reason = get_strategy(strategy).supports(shape, sp)
        if not ok:
            raise ValueError(f"--strategy {strategy}: {reason}")
    strategies = None if strategy == ADAPTIVE else [strategy]
    recomputes = [recompute] if recompute else None
    options = enumerate_options(shape, sp, strategies, recomputes, supports=strategy_supports)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(sp)) or sp)
    nodes_spanned = max(1, -(-sp // max(1, local)))
    costs = LayerCosts(
        CostModel(hardware, profile), shape, config.layers, sp, options,
        dtype=dtype, vocab=config.vocab, nodes_spanned=nodes_spanned,
    )  # fmt: skip
    static = static_memory(
        shape, config.layers, config.vocab, sp=sp, dp=dp, dtype=dtype,
        shard_optimizer=shard_optimizer,
    ).total + vocab_transient_bytes(config, dtype)  # fmt: skip
    budget = hardware.memory_bytes if budget_bytes is None else budget_bytes
    return Planner(
        costs, budget, static_bytes=static, method=planner_method(strategy, planner, recompute)
    )
