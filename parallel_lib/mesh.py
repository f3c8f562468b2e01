"""The device mesh: world = dp x sp, built once from the torchrun environment.

It lives with the communication code so that measuring tools (the cost-model profiler and
validator) run on the same groups and host-memory settings as training; `paradyse.Mesh` and
`paradyse.init_mesh` are these."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .groups import CommGroup, new_groups, new_sp_groups
from .host_memory import keep_freed_host_memory

__all__ = ["Mesh", "init_mesh", "rank0_value"]


@dataclass(frozen=True, eq=False)
class Mesh:
    """Who this process is and the groups it communicates in.

    `sp` ranks form the switchable group inside which strategies change per layer (consecutive
    global ranks, so an sp group stays inside a node when sp divides the GPUs per node); `dp`
    copies of that group train on different data (ranks with equal sp rank)."""

    world: int
    """Number of processes."""
    dp: int
    """Data-parallel degree (copies of the switchable group)."""
    sp: int
    """Switchable group size P."""
    rank: int
    """Global rank."""
    local_rank: int
    """Rank on this node (selects the CUDA device)."""
    device: torch.device
    """cuda:LOCAL_RANK with nccl where CUDA is present, else cpu with gloo."""
    backend: str
    """torch.distributed backend ("gloo" or "nccl"; "none" for one process without a group)."""
    sp_group: CommGroup
    """The switchable group, with every inner x outer factorisation for `usp`."""
    dp_group: CommGroup
    """The data-parallel group."""

    def __post_init__(self) -> None:
        if self.dp * self.sp != self.world:
            raise ValueError(f"dp ({self.dp}) x sp ({self.sp}) != world size ({self.world})")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside a world of {self.world}")

    @property
    def sp_rank(self) -> int:
        return self.sp_group.rank

    @property
    def dp_rank(self) -> int:
        return self.dp_group.rank


def _init_process_group(backend: str) -> None:
    """The default group from the torchrun environment, its store keys prefixed by the elastic
    restart count: after `--max-restarts` restarts the workers, the new ones must not read the
    addresses the failed attempt left in the launcher's store (they would connect to dead
    ranks)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(backend)
        return
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    # torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE); otherwise rank 0 does
    hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and rank == 0
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=hosts, timeout=timedelta(minutes=10))  # fmt: skip
    prefixed = dist.PrefixStore(f"paradyse/attempt{attempt}", store)
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world)


def init_mesh(sp: int | None = None, *, backend: str | None = None) -> Mesh:
    """Build the mesh (collective across all processes). sp defaults to the world size.

    Under torchrun (WORLD_SIZE set) the default process group is initialised if it is not yet
    (nccl where CUDA is present, else gloo, unless `backend` says otherwise); a process group
    initialised by the caller is used as it is. A plain process without torchrun is a world of
    one, on cuda:0 where CUDA is present. The device follows the backend: nccl -> cuda:LOCAL_RANK
    (made current), gloo -> cpu; on cpu, malloc keeps freed memory for reuse
    (`parallel_lib.host_memory.keep_freed_host_memory`)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        _init_process_group(backend)
    if dist.is_initialized():
        world, rank, backend = dist.get_world_size(), dist.get_rank(), dist.get_backend()
        on_cuda = "nccl" in backend  # a gloo group (also on a CUDA machine) communicates on CPU
    else:
        world, rank, backend = 1, 0, "none"
        on_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if on_cuda else torch.device("cpu")
    if on_cuda:
        torch.cuda.set_device(device)
    else:
        keep_freed_host_memory()  # CPU tensors live in malloc's heap: keep it, like CUDA's cache
    sp = world if sp is None else sp
    if sp < 1 or world % sp:
        raise ValueError(
            f"sp={sp} does not divide the world size {world}; choose sp among "
            f"{[d for d in range(1, world + 1) if world % d == 0]}"
        )
    dp = world // sp
    sp_partition = [list(range(k * sp, (k + 1) * sp)) for k in range(dp)]
    dp_partition = [list(range(j, world, sp)) for j in range(sp)]
    if world == 1:
        sp_group, dp_group = CommGroup.single(), CommGroup.single()
    else:
        sp_group = new_sp_groups(sp_partition, rank)
        dp_group = new_groups(dp_partition, rank)
    return Mesh(
        world=world,
        dp=dp,
        sp=sp,
        rank=rank,
        local_rank=local_rank,
        device=device,
        backend=backend,
        sp_group=sp_group,
        dp_group=dp_group,
    )


def rank0_value(value, device: torch.device):
    """Rank 0's JSON-serialisable `value` on every rank (collective). What every rank must
    agree on (hardware, profile, the outcome of rank 0's file checks) is decided once, there."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    data = json.dumps(value).encode() if dist.get_rank() == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, 0)
    buffer = torch.zeros(int(size), dtype=torch.uint8, device=device)
    if dist.get_rank() == 0:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, 0)
    return json.loads(buffer.cpu().numpy().tobytes())
