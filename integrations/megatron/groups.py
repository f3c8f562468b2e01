"""Megatron-Core's context-parallel process group as the `CommGroup` ParaDySe's attention takes.

`cp_comm_group(pg)` wraps megatron's cp group as it is (ring and Ulysses need nothing more).
USP (Ulysses inside x ring outside) needs the inner x outer sub-groups of every cp group; they are
process groups, so they are made collectively, once, by `init_usp_groups()` after
`parallel_state.initialize_model_parallel` (every rank calls it); until then the planner is not
offered usp.
"""

from __future__ import annotations

import torch.distributed as dist

from parallel_lib import CommGroup, new_sp_groups

__all__ = ["cp_comm_group", "init_usp_groups", "reset_groups"]

_FACTORED: dict[tuple[int, ...], CommGroup] = {}
"""Global ranks of a cp group -> its CommGroup with the inner x outer factorisations."""
_PLAIN: dict[int, CommGroup] = {}
"""id(process group) -> its CommGroup without factorisations (the pg object is kept alive)."""
_KEEP: list = []


def cp_comm_group(pg: dist.ProcessGroup | None) -> CommGroup:
    """The `CommGroup` of this rank's context-parallel group `pg` (None or one rank: alone), with
    usp's factorisations where `init_usp_groups` made them."""
    if pg is None or dist.get_world_size(pg) == 1:
        return CommGroup.single(dist.get_rank() if dist.is_initialized() else 0)
    ranks = tuple(dist.get_process_group_ranks(pg))
    factored = _FACTORED.get(ranks)
    if factored is not None:
        return factored
    group = _PLAIN.get(id(pg))
    if group is None or group.ranks != ranks:
        group = CommGroup(pg=pg, ranks=ranks, rank=dist.get_rank(pg))
        _PLAIN[id(pg)] = group
        _KEEP.append(pg)  # an id stays unique while its object lives
    return group


def init_usp_groups(pg: dist.ProcessGroup | None = None) -> CommGroup:
    """Make the inner x outer sub-groups of every context-parallel group (collective: every rank
    of the world calls it, after `parallel_state.initialize_model_parallel`); returns this rank's
    cp group with them. `pg`: this rank's cp group (default: megatron's)."""
    if pg is None:
        from megatron.core import parallel_state

        pg = parallel_state.get_context_parallel_group()
    mine = tuple(dist.get_process_group_ranks(pg))
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    partition = sorted(set(every))
    group = new_sp_groups(partition, dist.get_rank())
    _FACTORED[group.ranks] = group
    return group


def reset_groups() -> None:
    """Forget every wrapped group (after `parallel_state.destroy_model_parallel`)."""
    _FACTORED.clear()
    _PLAIN.clear()
    _KEEP.clear()
