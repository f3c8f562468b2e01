"""The planning side of a run: its `PlanningSetup` (the model on this machine, with this run's
budget, dtype, groups and options), its method, and the cost-model profile it prices with."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from cost_models import Hardware, Profile, ProfileError
from cost_models.counts import dtype_name
from cost_models.profile import measure_profile
from cost_models.profile_check import startup_check
from cost_models.stability import CHECK_THRESHOLD, profile_warnings, ranks_here
from parallel_lib import Mesh, get_strategy, rank0_value
from planners import Method, Option, PlanningSetup

from .config import Config

__all__ = [
    "ADAPTIVE", "exact_setup", "resolve_profile", "run_method", "run_setup", "strategy_supports"
]  # fmt: skip

ADAPTIVE = "adaptive"


def strategy_supports(option: Option, shape, P: int) -> tuple[bool, str]:
    """parallel_lib's own check of an option (what the engine will actually run)."""
    options = {"inner": option.inner} if option.inner else {}
    return get_strategy(option.strategy, **options).supports(shape, P)


def run_method(config: Config) -> Method:
    """The method of --strategy, --planner and --recompute."""
    par = config.parallel
    return Method.for_run(par.strategy, par.planner, par.recompute or None)


def run_setup(
    config: Config,
    *,
    sp: int,
    dp: int,
    hardware: Hardware,
    profile: Profile | None = None,
    every_option: bool = False,
) -> PlanningSetup:
    """The run's PlanningSetup: its model, sp x dp, dtype, --memory-budget, ZeRO-1 switch, logits
    chunk and ranks per node (LOCAL_WORLD_SIZE), over the options --strategy and --recompute
    allow (all of them with `every_option`). ValueError, one line, when the strategy cannot run
    the model."""
    par, model = config.parallel, config.model
    strategies = recomputes = None
    if not every_option:
        if par.strategy != ADAPTIVE:
            ok, reason = get_strategy(par.strategy).supports(model.shape, sp)
            if not ok:
                raise ValueError(f"--strategy {par.strategy}: {reason}")
            strategies = [par.strategy]
        recomputes = [par.recompute] if par.recompute else None
    per_node = ranks_here(sp)
    return PlanningSetup(
        model, hardware, sp=sp, dp=dp, dtype=config.train.dtype, budget_bytes=par.budget_bytes,
        profile=profile, shard_optimizer=config.optim.shard_optimizer, devices_per_node=per_node,
        strategies=strategies, recomputes=recomputes, supports=strategy_supports,
        group_size=par.group_size or None,
        logits_chunk=config.train.logits_chunk,
    )  # fmt: skip


def exact_setup(setup: PlanningSetup) -> PlanningSetup:
    """The same model and machine over every option (what the exact planner may choose from)."""
    return dataclasses.replace(setup, strategies=None, recomputes=None)


def resolve_profile(template: str, mesh: Mesh, shape, dtype, *, max_tokens: int = 8192,
                    log=print, warn=print,
                    check: float = CHECK_THRESHOLD) -> Profile | None:  # fmt: skip
    """The cost-model profile at `template` ({sp}, {dtype} and {device} filled in; '' = None):
    rank 0 reads it, or measures this machine (collective) and writes it there when missing,
    and every rank gets rank 0's numbers, so the ranks of an sp group plan alike. A profile
    read from the file is checked against this machine (`cost_models.profile_check`; `check`:
    the measured / profiled ratio beyond which it warns, 0 = no check); a measured one warns
    when the machine was busy or a coefficient would not settle. ValueError, one line, for a
    bad template, an unusable file or a folder that cannot be created."""
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
        profile = Profile.from_dict(found["profile"], source=str(path))
        line = startup_check(mesh, profile, shape, dtype, path=path, max_tokens=max_tokens,
                             threshold=check)  # fmt: skip
        if line and mesh.rank == 0:
            warn(line)
        return profile
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
        for line in profile_warnings(profile, str(path)):
            warn(line)
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
