"""Sub-groups of the switchable group (`parallel_lib.group_size`): a micro-batch run as P/g
groups of g ranks, each on its own sequences, equals the single-process reference (outputs,
input and weight gradients), for every strategy and recompute mode at every g; no stored
parameter moves; the sequences are dealt by predicted cost."""

from __future__ import annotations

import pytest
import torch

from cost_models.counts import comm_bytes
from cost_models.group_size import assign_sequences, gather_traffic
from paradyse import PackedBatch
from parallel_lib import RECOMPUTE_MODES, STRATEGY_NAMES, count_bytes, get_strategy, split_group

from .harness import run_distributed
from .layer_cases import SHAPE, Case, assert_close, mesh_for, uneven_lengths


def test_assignment_balances_by_cost() -> None:
    assert assign_sequences([5.0, 1.0, 4.0, 2.0, 3.0], 2) == [[0, 1, 3], [2, 4]]
    assert assign_sequences([1.0] * 4, 4) == [[0], [1], [2], [3]]
    assert assign_sequences([0.0, 0.0, 9.0], 3) == [[2], [0], [1]]  # every sub-group gets one
    groups = assign_sequences([float(n) for n in range(1, 30)], 4)
    loads = [sum(i + 1 for i in g) for g in groups]
    assert max(loads) - min(loads) <= 29 and sorted(i for g in groups for i in g) == list(range(29))
    with pytest.raises(ValueError, match="at least one group"):
        assign_sequences([1.0], 0)


def test_split_names_a_divisor() -> None:
    from parallel_lib import CommGroup

    with pytest.raises(ValueError, match="does not divide sp=1"):
        split_group(CommGroup.single(), 2)


def _sub_case(case: Case, mesh, g: int):
    """This rank's sub-group batch and its sequences' indices."""
    split = split_group(mesh.sp_group, g)
    mine = assign_sequences([float(n) for n in case.lens], split.groups)[split.index]
    tokens = [case.tokens[i] for i in mine]
    batch = PackedBatch.pack(tokens, g, split.position, split=split)
    return batch, mine


def group_case() -> None:
    mesh = mesh_for()
    P = mesh.sp
    case = Case(uneven_lengths(P) + [3, 2 * P + 1, 9], seed=30 + P, layers=1)
    out, dx, grads = case.reference()
    shared = case.layers(mesh, torch.float32)[0]  # one layer through every group size in turn
    stored = {n: p.data_ptr() for n, p in shared.named_parameters()}
    for g in [d for d in range(1, P + 1) if P % d == 0] * 2:
        batch = _sub_case(case, mesh, g)[0] if g < P else case.batch(mesh)
        x = torch.randn(batch.local_tokens, SHAPE.hidden, requires_grad=True)
        shared.set_option("local" if g == 1 else "tp_sp", "full", group_size=g)
        shared(x, batch).sum().backward()
        now = {n: p.data_ptr() for n, p in shared.named_parameters()}
        assert now == stored, f"g={g}: a parameter moved switching group sizes"
    for g in [d for d in range(1, P) if P % d == 0]:
        batch, mine = _sub_case(case, mesh, g)
        real = batch.real_mask()

        def pick(tensors, mine=mine):
            return [tensors[i] for i in mine]

        names = [n for n in STRATEGY_NAMES if get_strategy(n).supports(SHAPE, g)[0]]
        for name in names:
            for recompute in RECOMPUTE_MODES:
                what = f"P={P} g={g} {name}+{recompute}"
                layer = case.layers(mesh, torch.float32)[0]
                stored = {n: p.data_ptr() for n, p in layer.named_parameters()}
                layer.set_option(name, recompute, group_size=g)
                x = case.local(batch, pick(case.xs)).float().requires_grad_()
                with count_bytes(mesh.sp_group) as fwd:
                    y = layer(x, batch)
                with count_bytes(mesh.sp_group) as bwd:
                    y.backward(case.local(batch, pick(case.dys)).float())
                # bytes sent = the strategy's at P = g on the sub-group + the weight gathers
                own = comm_bytes(SHAPE, name, batch.total_tokens, g, "float32", recompute)
                gathers = gather_traffic(SHAPE, P, g, "float32", recompute)
                for got, mine, extra in ((fwd, own[0], gathers[0]), (bwd, own[1], gathers[1])):
                    want = dict(mine)
                    for kind, (nbytes, _) in extra.items():
                        want[kind] = want.get(kind, 0) + nbytes
                    assert got.snapshot() == {k: v for k, v in want.items() if v}, what
                layer.reduce_replicated_grads()
                assert_close(y[real], case.local(batch, pick(out))[real], 1e-5, f"{what} out")
                assert_close(x.grad[real], case.local(batch, pick(dx))[real], 1e-5, f"{what} dx")
                expected = case.expected_shards(grads[0], P, mesh.sp_rank)
                for key, got in layer.shard_tensors(grads=True).items():
                    assert_close(got, expected[key], 1e-5, f"{what} grad {key}")
                now = {n: p.data_ptr() for n, p in layer.named_parameters()}
                assert now == stored, f"{what}: a parameter moved"


def test_sub_groups_match_reference() -> None:
    """P = 4: sub-groups of 1 (local) and of 2 (every strategy that runs on two ranks)."""
    run_distributed(4, group_case)
