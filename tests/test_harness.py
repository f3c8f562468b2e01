"""Tests of the multi-process harness itself: results, env, gloo, and every way a rank can fail."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tests import harness
from tests.harness import RemoteError, RemoteTimeout, run_distributed

# Module-level functions, run on the workers (they import this module by name).


def rank_info(scale: int = 1) -> dict:
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    everyone = dist.new_group(list(range(dist.get_world_size())))  # groups use the same store
    dist.all_reduce(t, group=everyone)
    env = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "OMP_NUM_THREADS")
    return {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "env": {k: os.environ[k] for k in env},
        "port": os.environ["MASTER_PORT"],
        "threads": torch.get_num_threads(),
        "sum": t.item(),
        "tensor": torch.full((2,), float(dist.get_rank() * scale)),
        "pid": os.getpid(),
    }


def raise_on_rank_1() -> None:
    if dist.get_rank() == 1:
        raise ValueError("bad input on rank 1")
    dist.all_reduce(torch.ones(1))  # rank 0 blocks here forever: rank 1 never joins


def exit_on_rank_1() -> None:
    if dist.get_rank() == 1:
        os._exit(3)
    dist.all_reduce(torch.ones(1))


def recv_from_next() -> None:
    dist.recv(torch.zeros(1), src=(dist.get_rank() + 1) % dist.get_world_size())


def raise_everywhere() -> None:
    raise KeyError(f"rank {dist.get_rank()}")


def pid() -> int:
    return os.getpid()


# Tests, run in the pytest process.


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_results_in_rank_order(world_size: int) -> None:
    infos = run_distributed(world_size, rank_info, scale=10)
    assert [i["rank"] for i in infos] == list(range(world_size))
    for rank, info in enumerate(infos):
        assert info["world_size"] == world_size and info["backend"] == "gloo"
        assert info["env"] == {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "OMP_NUM_THREADS": "1",
        }
        assert info["threads"] == 1
        assert info["sum"] == sum(range(world_size)) * world_size
        assert torch.equal(info["tensor"], torch.full((2,), rank * 10.0))
    assert len({i["port"] for i in infos}) == 1 and len({i["pid"] for i in infos}) == world_size


def test_pools_are_reused_and_separate() -> None:
    pids2, pids4 = run_distributed(2, pid), run_distributed(4, pid)
    assert run_distributed(2, pid) == pids2 and run_distributed(4, pid) == pids4
    assert not set(pids2) & set(pids4)
    ports = {run_distributed(ws, rank_info)[0]["port"] for ws in (1, 2, 4)}
    assert len(ports) == 3


def test_exception_on_one_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "GRACE_PERIOD_S", 2.0)
    old = run_distributed(2, pid)
    with pytest.raises(RemoteError, match=r"rank\(s\) \[1\] failed") as excinfo:
        run_distributed(2, raise_on_rank_1)
    message = str(excinfo.value)
    assert "ValueError: bad input on rank 1" in message and "raise_on_rank_1" in message
    assert "ranks [0] did not answer within the 2 s grace period" in message
    assert "all_reduce" in message  # rank 0's stack, dumped before the kill
    new = run_distributed(2, pid)
    assert not set(new) & set(old)  # a fresh pool
    assert [i["sum"] for i in run_distributed(2, rank_info)] == [2.0, 2.0]


def test_exception_on_every_rank_keeps_the_pool() -> None:
    old = run_distributed(2, pid)
    with pytest.raises(RemoteError, match=r"rank\(s\) \[0, 1\] failed") as excinfo:
        run_distributed(2, raise_everywhere)
    assert "KeyError: 'rank 0'" in str(excinfo.value) and "KeyError: 'rank 1'" in str(excinfo.value)
    assert run_distributed(2, pid) == old  # nobody was stuck: no restart needed


def test_rank_dies() -> None:
    old = run_distributed(2, pid)
    with pytest.raises(RemoteError, match=r"rank\(s\) \[.*1\] failed") as excinfo:
        run_distributed(2, exit_on_rank_1)
    assert "--- rank 1 failed ---\nworker process died (exit code 3)" in str(excinfo.value)
    new = run_distributed(2, pid)
    assert not set(new) & set(old)


def test_deadlock_times_out() -> None:
    old = run_distributed(2, pid)
    with pytest.raises(RemoteTimeout, match=r"ranks \[0, 1\] did not answer within 3 s") as excinfo:
        run_distributed(2, recv_from_next, timeout=3.0)
    assert "recv_from_next" in str(excinfo.value)  # where each rank was stuck
    assert not set(run_distributed(2, pid)) & set(old)


def test_unpicklable_function_is_rejected() -> None:
    with pytest.raises(TypeError, match="module-level fn"):
        run_distributed(1, lambda: 0)
