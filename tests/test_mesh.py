"""`paradyse.init_mesh`: world = dp x sp, sp groups of consecutive ranks, dp groups strided, and
every inner x outer factorisation of the sp group, each checked by communicating inside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import paradyse
from parallel_lib import CommGroup

from .harness import REPO_ROOT, run_distributed
from .layer_cases import mesh_for


def members_by_all_gather(group: CommGroup) -> list[int]:
    """Global ranks of the processes that actually answer inside the group, in group order."""
    me = dist.get_rank()
    assert group.ranks[group.rank] == me, (group.ranks, group.rank, me)
    if group.size == 1:
        assert group.pg is None
        return [me]
    assert dist.get_process_group_ranks(group.pg) == list(group.ranks)
    out = [torch.zeros(1, dtype=torch.int64) for _ in range(group.size)]
    dist.all_gather(out, torch.tensor([me]), group=group.pg)
    return [int(t) for t in out]


def describe_mesh(sp: int | None) -> dict:
    mesh = mesh_for(sp)
    r = dist.get_rank()
    sp_group, dp_group = mesh.sp_group, mesh.dp_group
    info = {
        "fields": (mesh.world, mesh.dp, mesh.sp, mesh.rank, mesh.local_rank, mesh.backend),
        "device": str(mesh.device),
        "sp_rank": mesh.sp_rank,
        "dp_rank": mesh.dp_rank,
        "sp": members_by_all_gather(sp_group),
        "dp": members_by_all_gather(dp_group),
        "factors": {},
    }
    # every factorisation: 1 x P and P x 1 intrinsically, the others created at init
    assert sorted(sp_group.factors) == [u for u in range(2, mesh.sp) if mesh.sp % u == 0]
    for u in [u for u in range(1, mesh.sp + 1) if mesh.sp % u == 0]:
        inner, outer = sp_group.factor(u)
        assert (inner.size, outer.size) == (u, mesh.sp // u)
        assert inner.monitor is sp_group.monitor and outer.monitor is sp_group.monitor
        info["factors"][u] = (members_by_all_gather(inner), members_by_all_gather(outer))
    bad = next((u for u in range(2, mesh.sp + 2) if mesh.sp % u), None)
    try:
        sp_group.factor(bad)
    except ValueError as e:
        assert "available inner degrees" in str(e), str(e)
    else:
        raise AssertionError(f"factor({bad}) of a group of {mesh.sp} did not raise")
    info["rank"] = r
    return info


def check_world4(sp: int | None) -> list[dict]:
    results = run_distributed(4, describe_mesh, sp)
    P = sp or 4
    dp = 4 // P
    for r, info in enumerate(results):
        assert info["fields"] == (4, dp, P, r, r, "gloo")
        assert info["device"] == "cpu"
        first = r // P * P  # sp groups: P consecutive ranks
        assert info["sp"] == list(range(first, first + P))
        assert info["sp_rank"] == r - first
        assert info["dp"] == list(range(r % P, 4, P))  # dp groups: equal sp rank, stride P
        assert info["dp_rank"] == r // P
        for u, (inner, outer) in info["factors"].items():
            o = (r - first) // u  # inner group o holds sp members o*u .. o*u+u-1
            assert inner == [first + o * u + j for j in range(u)], (r, u)
            assert outer == list(range(first + (r - first) % u, first + P, u)), (r, u)
    return results


def test_world4_sp4() -> None:
    results = check_world4(None)
    # spelled out for P = 4: inner x outer = 2 x 2
    assert [info["factors"][2] for info in results] == [
        ([0, 1], [0, 2]),
        ([0, 1], [1, 3]),
        ([2, 3], [0, 2]),
        ([2, 3], [1, 3]),
    ]
    assert [info["factors"][1] for info in results] == [([r], [0, 1, 2, 3]) for r in range(4)]
    assert [info["factors"][4] for info in results] == [([0, 1, 2, 3], [r]) for r in range(4)]


def test_world4_sp2_dp2() -> None:
    results = check_world4(2)
    assert [info["sp"] for info in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [info["dp"] for info in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert sorted(results[0]["factors"]) == [1, 2]


def test_world4_sp1_dp4() -> None:
    results = check_world4(1)
    assert all(info["sp"] == [r] and info["dp"] == [0, 1, 2, 3] for r, info in enumerate(results))


def bad_sp_case(sp: int) -> str:
    try:
        paradyse.init_mesh(sp)
    except ValueError as e:
        return str(e)
    raise AssertionError(f"init_mesh(sp={sp}) at world {dist.get_world_size()} did not raise")


@pytest.mark.parametrize("sp", [3, 8, 0])
def test_sp_not_dividing_world_raises(sp: int) -> None:
    for message in run_distributed(4, bad_sp_case, sp):
        assert f"sp={sp}" in message and "world size 4" in message, message
        assert "choose sp among [1, 2, 4]" in message, message


def test_world1_in_an_initialised_process_group() -> None:
    (info,) = run_distributed(1, describe_mesh, None)
    assert info["fields"] == (1, 1, 1, 0, 0, "gloo")
    assert info["sp"] == [0] and info["dp"] == [0]
    assert info["factors"] == {1: ([0], [0])}


WORLD1_SCRIPT = """
import json
import torch.distributed as dist
import paradyse

mesh = paradyse.init_mesh()
out = {
    "initialized": dist.is_initialized(),
    "fields": [mesh.world, mesh.dp, mesh.sp, mesh.rank, mesh.local_rank, mesh.backend],
    "device": str(mesh.device),
    "sp": list(mesh.sp_group.ranks),
    "dp": list(mesh.dp_group.ranks),
    "ranks": [mesh.sp_rank, mesh.dp_rank],
    "pgs": [mesh.sp_group.pg is None, mesh.dp_group.pg is None],
    "factors": sorted(mesh.sp_group.factors),
    "explicit_sp1": paradyse.init_mesh(sp=1).sp,
}
try:
    paradyse.init_mesh(sp=2)
except ValueError as e:
    out["sp2_error"] = str(e)
print(json.dumps(out))
"""


def test_world1_plain_process_without_torchrun_env() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", WORLD1_SCRIPT],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["initialized"] is False, "a plain process must not start a process group"
    assert out["fields"] == [1, 1, 1, 0, 0, "none"]
    assert out["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert out["sp"] == [0] and out["dp"] == [0] and out["ranks"] == [0, 0]
    assert out["pgs"] == [True, True]
    assert out["factors"] == []  # 1 x 1 needs no stored factorisation
    assert out["explicit_sp1"] == 1
    assert "sp=2" in out["sp2_error"] and "choose sp among [1]" in out["sp2_error"]
