"""Every strategy against the single-process reference: outputs, input and weight gradients, at
P = 1, 2, 4, on packed causal sequences of uneven lengths with GQA; recompute modes; byte counts."""

from __future__ import annotations

import pytest
import torch

from cost_models.counts import comm_bytes
from parallel_lib import RECOMPUTE_MODES, STRATEGY_NAMES, count_bytes, get_strategy

from .harness import run_distributed
from .layer_cases import SHAPE, Case, assert_close, mesh_for, uneven_lengths

SUPPORTED = [
    (P, name)
    for P in (1, 2, 4)
    for name in STRATEGY_NAMES
    if get_strategy(name).supports(SHAPE, P)[0]
]
DTYPES = {"float32": (torch.float32, 1e-5), "bfloat16": (torch.bfloat16, 3e-2)}
"""dtype -> tolerance relative to the largest reference entry. bfloat16 keeps 8 significant bits
(eps 7.8e-3); a layer rounds each of its matmul inputs and outputs, so a few eps is expected."""


def _run(case, mesh, strategies, recompute, dtype):
    batch = case.batch(mesh)
    layers = case.layers(mesh, dtype)
    x = case.local(batch, case.xs).to(dtype).requires_grad_()
    dy = case.local(batch, case.dys).to(dtype)
    with count_bytes(mesh.sp_group) as fwd:
        h = x
        for layer, strategy in zip(layers, strategies, strict=True):
            h = layer(h, batch, strategy, recompute)
    with count_bytes(mesh.sp_group) as bwd:
        h.backward(dy)
    for layer in layers:
        layer.reduce_replicated_grads()
    return batch, x, h, layers, (fwd.snapshot(), bwd.snapshot())


def _check_against_reference(case, batch, x, y, layers, ref, rel, what):
    out, dx, grads = ref
    real = batch.real_mask()
    assert_close(y[real], case.local(batch, out)[real], rel, f"{what} output")
    assert_close(x.grad[real], case.local(batch, dx)[real], rel, f"{what} input grad")
    assert torch.count_nonzero(x.grad[~real]) == 0, f"{what}: padding received gradient"
    mesh = mesh_for()
    for i, (layer, g) in enumerate(zip(layers, grads, strict=True)):
        expected = case.expected_shards(g, mesh.sp, mesh.sp_rank)
        for name, got in layer.shard_tensors(grads=True).items():
            assert_close(got, expected[name], rel, f"{what} layer {i} grad {name}")


def strategy_case(name: str, dtype_name: str) -> None:
    dtype, rel = DTYPES[dtype_name]
    mesh = mesh_for()
    case = Case(uneven_lengths(mesh.sp), seed=mesh.sp)
    ref = case.reference()
    baseline = None
    for recompute in RECOMPUTE_MODES:
        batch, x, y, layers, (fwd, bwd) = _run(case, mesh, [name], recompute, dtype)
        what = f"{name} P={mesh.sp} {dtype_name} recompute={recompute}"
        _check_against_reference(case, batch, x, y, layers, ref, rel, what)
        want_fwd, want_bwd, _, _ = comm_bytes(
            SHAPE, name, batch.total_tokens, mesh.sp, dtype, recompute
        )
        assert fwd == want_fwd, f"{what}: forward bytes {fwd} != formula {want_fwd}"
        assert bwd == want_bwd, f"{what}: backward bytes {bwd} != formula {want_bwd}"
        grads = [x.grad, *layers[0].shard_tensors(grads=True).values()]
        if baseline is None:
            baseline = grads
        else:  # recomputation replays the same arithmetic: identical, not merely close
            for got, want in zip(grads, baseline, strict=True):
                assert torch.equal(got, want), f"{what}: gradients differ from recompute=none"


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize(("P", "name"), SUPPORTED, ids=[f"P{P}-{n}" for P, n in SUPPORTED])
def test_strategy_matches_reference(P: int, name: str, dtype_name: str) -> None:
    run_distributed(P, strategy_case, name, dtype_name)


def stack_case() -> None:
    """One layer per supported strategy, run in two different orders: both equal the reference
    and no parameter's storage changes (switching strategies moves no data)."""
    mesh = mesh_for()
    names = [n for n in STRATEGY_NAMES if get_strategy(n).supports(SHAPE, mesh.sp)[0]]
    assert len(names) >= 4
    case = Case(uneven_lengths(mesh.sp), seed=10 + mesh.sp, layers=len(names))
    ref = case.reference()
    batch = case.batch(mesh)
    layers = case.layers(mesh, torch.float32)
    storage = {
        (i, n): p.data_ptr() for i, layer in enumerate(layers) for n, p in layer.named_parameters()
    }
    for order in (names, names[1:] + names[:1], names[::-1]):
        for layer in layers:
            layer.zero_grad(set_to_none=True)
        x = case.local(batch, case.xs).float().requires_grad_()
        h = x
        for layer, strategy in zip(layers, order, strict=True):
            h = layer(h, batch, strategy)
        h.backward(case.local(batch, case.dys).float())
        for layer in layers:
            layer.reduce_replicated_grads()
        _check_against_reference(case, batch, x, h, layers, ref, 1e-5, f"stack {order}")
        now = {
            (i, n): p.data_ptr()
            for i, layer in enumerate(layers)
            for n, p in layer.named_parameters()
        }
        assert now == storage, "a parameter moved while switching strategies"


@pytest.mark.parametrize("P", [1, 2, 4])
def test_stack_of_different_strategies(P: int) -> None:
    run_distributed(P, stack_case)


def frozen_case() -> None:
    """Frozen weights (only the input gradient is wanted; bytes sent equal the frozen formulas)
    and an input without gradient (only the weight gradients are wanted), for every strategy the
    group supports."""
    mesh = mesh_for()
    case = Case(uneven_lengths(mesh.sp), seed=20 + mesh.sp)
    out, dx, grads = case.reference()
    batch = case.batch(mesh)
    real = batch.real_mask()
    for name in [n for n in STRATEGY_NAMES if get_strategy(n).supports(SHAPE, mesh.sp)[0]]:
        for recompute in RECOMPUTE_MODES:
            what = f"{name} P={mesh.sp} recompute={recompute}"
            frozen = case.layers(mesh, torch.float32)[0].requires_grad_(False)
            x = case.local(batch, case.xs).float().requires_grad_()
            with count_bytes(mesh.sp_group) as fwd:
                y = frozen(x, batch, name, recompute)
            with count_bytes(mesh.sp_group) as bwd:
                y.backward(case.local(batch, case.dys).float())
            want_fwd, want_bwd, _, _ = comm_bytes(
                SHAPE, name, batch.total_tokens, mesh.sp, "float32", recompute, trainable=False
            )
            assert fwd.snapshot() == want_fwd, f"{what} frozen: forward {fwd.snapshot()}"
            assert bwd.snapshot() == want_bwd, f"{what} frozen: backward {bwd.snapshot()}"
            assert_close(y[real], case.local(batch, out)[real], 1e-5, f"{what} frozen output")
            assert_close(x.grad[real], case.local(batch, dx)[real], 1e-5, f"{what} frozen dx")
            layer = case.layers(mesh, torch.float32)[0]
            x = case.local(batch, case.xs).float()
            layer(x, batch, name, recompute).backward(case.local(batch, case.dys).float())
            layer.reduce_replicated_grads()
            expected = case.expected_shards(grads[0], mesh.sp, mesh.sp_rank)
            for key, got in layer.shard_tensors(grads=True).items():
                assert_close(got, expected[key], 1e-5, f"{what} no-grad input, grad {key}")


@pytest.mark.parametrize("P", [1, 2, 4])
def test_frozen_weights_and_inputs_without_grad(P: int) -> None:
    run_distributed(P, frozen_case)
