"""The flat-buffer optimizer against torch's AdamW on the summed gradient: plain, ZeRO-1 (with a
slice that holds only padding), bf16 with float32 masters (and weights loaded after the engine
was built), weight decay by parameter shape, and the schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from paradyse.model import mark_sharded
from paradyse.optim import (
    FlatUnit,
    OptimConfig,
    UnitOptimizer,
    learning_rate,
    reduce_replicated,
    reduce_replicated_with_norms,
)
from parallel_lib import CommGroup

from .harness import run_distributed
from .layer_cases import mesh_for

CONFIG = OptimConfig(lr=0.05, weight_decay=0.3, betas=(0.8, 0.9))
SHAPES = [(3, 5), (7,), (1,)]
"""A matrix (decayed), a vector and a one-element vector (not decayed): 23 elements, odd, so a
ZeRO-1 unit is padded."""


def _start(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).float() for s in SHAPES]


def _grads(step: int, rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _reference(steps: int, dp: int, sharded_first: bool) -> list[torch.Tensor]:
    """torch AdamW (one param group per decay class) on the dp-summed gradients."""
    params = [nn.Parameter(t.clone()) for t in _start()]
    decayed = [p for p in params if p.dim() >= 2]
    plain = [p for p in params if p.dim() < 2]
    optim = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": CONFIG.weight_decay},
         {"params": plain, "weight_decay": 0.0}],
        lr=CONFIG.lr, betas=CONFIG.betas, eps=CONFIG.eps,
    )  # fmt: skip
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = sum(_grads(step, r)[i] for r in range(dp))
        optim.step()
    return [p.detach() for p in params]


def _flat_run(steps: int, shard: bool, dtype=torch.float32, dp_group=None) -> list[torch.Tensor]:
    mesh = mesh_for(1) if dp_group is None else None
    dp = dp_group or mesh.dp_group
    params = [nn.Parameter(t.clone().to(dtype)) for t in _start()]
    mark_sharded(params[0])
    unit = FlatUnit("unit", params, dp.size)
    config = OptimConfig(**{**CONFIG.__dict__, "shard_optimizer": shard})
    opt = UnitOptimizer(unit, config, sp_group=CommGroup.single(), dp_group=dp)
    for step in range(steps):
        for p, g in zip(params, _grads(step, dp.rank), strict=True):
            p.grad.copy_(g.to(dtype))
        opt.reduce()
        opt.step(CONFIG.lr, 1.0)
        unit.zero_grad()
    return [p.detach().float().clone() for p in params], opt.optimizer is None


def _dp_run(shard: bool):
    mesh = mesh_for(1)  # sp = 1: dp = the world
    return _flat_run(3, shard, dp_group=mesh.dp_group)


def test_flat_adamw_matches_torch_adamw_over_dp() -> None:
    want = _reference(3, 2, True)
    for shard in (False, True):
        results = run_distributed(2, _dp_run, shard)
        for got, _ in results:
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
        if shard:  # 23 elements padded to 24: rank 1's slice ends in padding, not empty
            assert [empty for _, empty in results] == [False, False]


def _padding_only():
    """A one-element unit at dp = 2: rank 1's ZeRO-1 slice is padding only."""
    mesh = mesh_for(1)
    p = nn.Parameter(torch.tensor([2.0]))
    unit = FlatUnit("tiny", [p], mesh.dp_group.size)
    opt = UnitOptimizer(unit, OptimConfig(lr=0.1, shard_optimizer=True),
                        sp_group=CommGroup.single(), dp_group=mesh.dp_group)  # fmt: skip
    p.grad.fill_(1.0 + mesh.rank)
    opt.reduce()
    opt.step(0.1, 1.0)
    return float(p.detach()), opt.optimizer is None


def test_zero1_slice_of_padding_only() -> None:
    results = run_distributed(2, _padding_only)
    assert [empty for _, empty in results] == [False, True]
    assert results[0][0] == results[1][0]
    assert math.isclose(results[0][0], 2.0 - 0.1, rel_tol=1e-6)  # Adam's first step: lr


def test_bf16_masters_follow_weights_loaded_after_the_engine() -> None:
    params = [nn.Parameter(t.clone().bfloat16()) for t in _start()]
    unit = FlatUnit("unit", params, 1)
    opt = UnitOptimizer(unit, OptimConfig(lr=1e-6), sp_group=CommGroup.single(),
                        dp_group=CommGroup.single())  # fmt: skip
    assert opt.separate_master and opt.master.dtype == torch.float32
    with torch.no_grad():
        params[1].fill_(0.5)  # what load_state_dict does
    for p in params:
        p.grad.normal_()
    opt.step(1e-6, 1.0)
    assert torch.allclose(params[1].float(), torch.full((7,), 0.5), atol=1e-2)


def test_bf16_steps_track_float32() -> None:
    got, _ = _flat_run(3, False, torch.bfloat16)
    want = _reference(3, 1, True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


def test_schedule_warms_up_then_reaches_the_floor() -> None:
    config = OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    lrs = [learning_rate(config, s, 10) for s in range(10)]
    assert lrs[:3] == [1 / 3, 2 / 3, 1.0]
    assert math.isclose(lrs[-1], 0.1)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))


def _replicated_sum():
    """Three units on an sp group of 2 (two float32 with replicated parts, one without) reduced
    by one all-reduce, against each unit's own all-reduce."""
    mesh = mesh_for(2)
    g = torch.Generator().manual_seed(7 + mesh.rank)
    units, optimizers = [], []
    for k, shapes in enumerate([[(4, 3), (5,)], [(2, 2), (3,), (1,)], [(6, 2)]]):
        params = [nn.Parameter(torch.zeros(s)) for s in shapes]
        mark_sharded(params[0])  # the matrix is a shard; vectors are replicated
        unit = FlatUnit(f"u{k}", params, 1)
        unit.grad.copy_(torch.randn(unit.grad.shape, generator=g))
        units.append(unit)
        optimizers.append(UnitOptimizer(unit, CONFIG, sp_group=mesh.sp_group,
                                        dp_group=mesh.dp_group))  # fmt: skip
    before = [u.grad.clone() for u in units]
    reduce_replicated(optimizers)
    fused = [u.grad.clone() for u in units]
    for unit, grad in zip(units, before, strict=True):
        unit.grad.copy_(grad)
    for opt in optimizers:
        opt.reduce()
    return before, fused, [u.grad.clone() for u in units], [u.replicated for u in units]


def test_one_all_reduce_sums_every_units_replicated_gradients() -> None:
    (b0, fused, alone, spans), (b1, _, _, _) = run_distributed(2, _replicated_sum)
    for k, (lo, hi) in enumerate(spans):
        want = b0[k].clone()
        want[lo:hi] = b0[k][lo:hi] + b1[k][lo:hi]  # sharded parts untouched, replicated summed
        torch.testing.assert_close(fused[k], want, rtol=0, atol=0)
        torch.testing.assert_close(alone[k], want, rtol=0, atol=0)
    assert spans[2][0] == spans[2][1]  # the third unit has nothing replicated


def _with_norms():
    """Four units on an sp group of 4 (dp = 1) summed and normed in one collective, against
    `reduce_replicated`, `square_norms` and an all-reduce of the sharded squares."""
    mesh = mesh_for(4)
    g = torch.Generator().manual_seed(11 + mesh.rank)
    grads, optimizers = [], []
    for k, shapes in enumerate([[(4, 3), (5,)], [(2, 2), (3,), (1,)], [(6, 2)], [(7,)]]):
        params = [nn.Parameter(torch.zeros(s)) for s in shapes]
        if len(shapes[0]) == 2:
            mark_sharded(params[0])  # the matrix is a shard; vectors are replicated
        unit = FlatUnit(f"u{k}", params, 1)
        unit.grad.copy_(torch.randn(unit.grad.shape, generator=g))
        grads.append(unit.grad.clone())
        optimizers.append(UnitOptimizer(unit, CONFIG, sp_group=mesh.sp_group,
                                        dp_group=mesh.dp_group))  # fmt: skip
    one = reduce_replicated_with_norms(optimizers, mesh.sp_group)
    fused = [opt.unit.grad.clone() for opt in optimizers]
    for opt, grad in zip(optimizers, grads, strict=True):
        opt.unit.grad.copy_(grad)
    reduce_replicated(optimizers)
    two = torch.tensor([opt.square_norms() for opt in optimizers], dtype=torch.float64)
    sharded = two[:, 0].contiguous()
    torch.distributed.all_reduce(sharded, group=mesh.sp_group.pg)
    two[:, 0] = sharded
    spans = [opt.unit.replicated for opt in optimizers]
    return one, two, fused, [opt.unit.grad.clone() for opt in optimizers], spans


def test_one_collective_sums_replicated_gradients_and_norms() -> None:
    """The same sums up to float32 rounding (the replicated gradients are summed in float64
    and rounded once), and every rank the same bits of them and of the norms."""
    results = run_distributed(4, _with_norms)
    for one, two, fused, separate, _ in results:
        torch.testing.assert_close(one, two, rtol=1e-6, atol=0)
        for a, b in zip(fused, separate, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    spans = results[0][4]
    assert spans[2][0] == spans[2][1] and spans[3] == (0, 7)  # nothing / everything replicated
    for one, _, fused, _, _ in results[1:]:
        assert torch.equal(one, results[0][0])
        for a, b, (lo, hi) in zip(fused, results[0][2], spans, strict=True):
            assert torch.equal(a[lo:hi], b[lo:hi])
