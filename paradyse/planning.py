"""The planner of a training run: the cost model, the options the strategies support, the
static memory, and the method the run's `--strategy`/`--planner`/`--recompute` ask for."""

from __future__ import annotations

import os
import time
from pathlib import Path

from cost_models import CostModel, Hardware, Profile, ProfileError, detect, static_memory
from cost_models.counts import dtype_name, itemsize
from cost_models.profile import measure_profile
from parallel_lib import get_strategy
from planners import LayerCosts, Option, Planner, enumerate_options

from .mesh import Mesh, rank0_value
from .model import ModelConfig

__all__ = [
    "ADAPTIVE", "build_planner", "planner_method", "resolve_profile", "strategy_supports",
    "vocab_transient_bytes",
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


def resolve_profile(template: str, mesh: Mesh, shape, dtype, *, max_tokens: int = 8192,
                    log=print, warn=print) -> Profile | None:  # fmt: skip
    """The cost-model profile at `template` ({sp}, {dtype} and {device} filled in; '' = None):
    rank 0 reads it, or measures this machine (collective) and writes it there when missing,
    and every rank gets rank 0's numbers, so the ranks of an sp group plan alike. ValueError,
    one line, for a bad template, an unusable file or a folder that cannot be created."""
    if not template:
        return None
    name = dtype_name(dtype)
    try:
        path = Path(template.format(sp=mesh.sp, dtype=name, device=mesh.device.type))
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"parallel.profile {template!r}: only {{sp}}, {{dtype}} and {{device}} can be "
            f"filled in ({type(error).__name__}: {error})"
        ) from None
    found = _read_profile(path, name, mesh.sp) if mesh.rank == 0 else None
    found = rank0_value(found, mesh.device)
    if "error" in found:
        raise ValueError(found["error"])
    if "profile" in found:
        return Profile.from_dict(found["profile"], source=str(path))
    if mesh.rank == 0:
        log(f"no cost-model profile at {path}: measuring this machine (sp={mesh.sp})")
    start = time.perf_counter()
    profile = measure_profile(mesh, shape, dtype, max_tokens)
    if mesh.rank == 0:
        try:
            profile.save(path)
            log(f"wrote {path} ({time.perf_counter() - start:.0f} s)")
        except (OSError, ProfileError) as error:
            warn(f"warning: could not write the profile to {path}: {error}")
    return Profile.from_dict(rank0_value(profile.to_dict(), mesh.device), source=str(path))


def _read_profile(path: Path, dtype: str, sp: int) -> dict:
    """{'profile': ...}, {'measure': True} (and its folder exists) or {'error': ...}."""
    if path.exists():
        try:
            profile = Profile.load(path)
            profile.check_matches(dtype=dtype, sp=sp)
        except ProfileError as error:
            return {"error": f"parallel.profile: {error}"}
        return {"profile": profile.to_dict()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return {"error": f"parallel.profile {str(path)!r}: cannot create its folder "
                         f"({error.strerror or error})"}  # fmt: skip
    return {"measure": True}
