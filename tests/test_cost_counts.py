"""`cost_models.counts` against measurements: FLOPs counted by torch's FlopCounterMode on the
reference layer and on an independent row-by-row causal attention, the per-rank split of every
strategy's FLOPs, and the bytes and calls `parallel_lib` counts on the real switchable layer."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cost_models.counts import (
    RECOMPUTE_MODES,
    attention_flops,
    comm_bytes,
    layer_counts,
    layer_flops,
    pad_length,
)
from paradyse import ReferenceDecoderLayer, SwitchableDecoderLayer, init_full_weights
from parallel_lib import LayerShape, count_bytes, get_strategy

from .harness import run_distributed
from .layer_cases import SHAPE, mesh_for, problem, rel_error, supported, uneven_lengths

SHAPES = [
    LayerShape(64, 4, 2, 16, 176),
    LayerShape(96, 6, 3, 16, 256),
    LayerShape(128, 8, 8, 16, 344),
]
LENGTHS = [[5], [1, 17, 64], [100, 3, 40]]


# ---------------------------------------------------------------- FLOPs on one process
@pytest.mark.parametrize("lens", LENGTHS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"H{s.hidden}h{s.heads}kv{s.kv_heads}")
def test_layer_flops_match_flop_counter(shape: LayerShape, lens: list[int]) -> None:
    """The reference computes dense masked L x L scores, so causal=False is its count."""
    full = init_full_weights(shape, torch.Generator().manual_seed(random.randrange(2**31)))
    layer = ReferenceDecoderLayer(shape, full)
    xs = [torch.randn(n, shape.hidden, requires_grad=True) for n in lens]
    with FlopCounterMode(display=False) as fwd:
        ys = layer(xs)
    loss = sum((y * torch.randn_like(y)).sum() for y in ys)
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    forward, backward = layer_flops(shape, lens, causal=False)
    assert rel_error(fwd.get_total_flops(), sum(forward.values())) < 0.01
    assert rel_error(bwd.get_total_flops(), sum(backward.values())) < 0.01


def causal_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(L, h, d) each: query i attends to keys 0..i only, one query row at a time."""
    out = []
    for i in range(q.shape[0]):
        qi = q[i].unsqueeze(1)  # (h, 1, d)
        ki, vi = k[: i + 1].transpose(0, 1), v[: i + 1].transpose(0, 1)  # (h, i+1, d)
        p = torch.bmm(qi, ki.transpose(1, 2)).div(math.sqrt(q.shape[-1])).softmax(-1)
        out.append(torch.bmm(p, vi).squeeze(1))
    return torch.stack(out)


@pytest.mark.parametrize(
    ("lens", "heads", "head_dim"), [([1], 2, 8), ([7, 30], 4, 16), ([64], 3, 32)]
)
def test_causal_attention_flops_are_exact(lens: list[int], heads: int, head_dim: int) -> None:
    with FlopCounterMode(display=False) as counter:
        for n in lens:
            causal_rows(*(torch.randn(n, heads, head_dim) for _ in range(3)))
    want = attention_flops(lens, heads, head_dim, causal=True)
    assert rel_error(counter.get_total_flops(), want) < 0.01


PER_RANK = [(s, P) for s in ("tp_sp", "ulysses", "ring", "usp", "metp") for P in (2, 4)]


@pytest.mark.parametrize(("strategy", "P"), [c for c in PER_RANK if c != ("usp", 2)])
def test_per_rank_flops_split_the_layer(strategy: str, P: int) -> None:
    shapes = [s for s in [*SHAPES, SHAPE] if get_strategy(strategy).supports(s, P)[0]]
    assert shapes, "no test shape fits"
    for shape in shapes:
        for lens in [*LENGTHS, [random.randint(1, 200) for _ in range(4)]]:
            what = f"{strategy} P={P} {shape} {lens}"
            counts = {
                rc: layer_counts(shape, strategy, lens, P, recompute=rc) for rc in RECOMPUTE_MODES
            }
            fwd = counts["none"].flops_forward
            padded = [pad_length(n, P) for n in lens]
            whole = sum(layer_flops(shape, padded, causal=True)[0].values())
            assert rel_error(sum(fwd.values()) * P, whole) < 1e-9, what
            extra = {
                "none": {},
                "selective": {op: fwd[op] for op in ("gate_up", "down")},
                "full": fwd,
            }
            for rc, c in counts.items():
                assert c.flops_forward == fwd, f"{what} {rc}"
                want = {op: 2 * f + extra[rc].get(op, 0.0) for op, f in fwd.items()}
                assert c.flops_backward.keys() == want.keys(), f"{what} {rc}"
                for op, f in want.items():
                    assert rel_error(c.flops_backward[op], f) < 1e-12, f"{what} {rc} {op}"


# ---------------------------------------------------------------- bytes and calls, multi-process
def comm_case(name: str) -> list[tuple]:
    """Per recompute mode and dtype: (what, counted, formula) for bytes and calls."""
    mesh = mesh_for()
    P, rows = mesh.sp, []
    for dtype in (torch.float32, torch.bfloat16):
        for rc in RECOMPUTE_MODES:
            batch, x, dy = problem(mesh, uneven_lengths(P), dtype)
            layer = SwitchableDecoderLayer(SHAPE, mesh.sp_group, dtype=dtype)
            with count_bytes(mesh.sp_group) as fwd:
                y = layer(x, batch, name, rc)
            with count_bytes(mesh.sp_group) as bwd:
                y.backward(dy)
            bf, bb, mf, mb = comm_bytes(SHAPE, name, batch.total_tokens, P, dtype, rc)
            what = f"{name} P={P} {dtype} recompute={rc}"
            rows.append((f"{what} forward bytes", fwd.snapshot(), bf))
            rows.append((f"{what} backward bytes", bwd.snapshot(), bb))
            calls = [{k: v for k, v in c.calls.items() if v} for c in (fwd, bwd)]
            rows.append((f"{what} forward calls", calls[0], mf))
            rows.append((f"{what} backward calls", calls[1], mb))
    return rows


COMM_CASES = [(P, n) for P in (1, 2, 4) for n in supported(P)]


@pytest.mark.parametrize(("P", "name"), COMM_CASES, ids=[f"P{P}-{n}" for P, n in COMM_CASES])
def test_comm_bytes_and_calls_match_counter(P: int, name: str) -> None:
    """Exact bytes and calls of every collective kind, p2p (ring exchange steps) included."""
    for rank, rows in enumerate(run_distributed(P, comm_case, name)):
        for what, counted, formula in rows:
            assert counted == formula, f"rank {rank} {what}: counted {counted} != {formula}"


# ---------------------------------------------------------------- configurations
def test_factorisation_matches_the_strategy_library() -> None:
    from cost_models.counts import factorisation

    for P in range(4, 17):
        usp = get_strategy("usp")
        shape = LayerShape(16 * P, 2 * P, P, 8, 4 * P)
        if not usp.supports(shape, P)[0]:
            with pytest.raises(ValueError):
                factorisation("usp", P)
            continue
        assert factorisation("usp", P) == (usp.inner_degree(P), P // usp.inner_degree(P)), P


@pytest.mark.parametrize(
    ("shape", "strategy", "P", "words"),
    [
        (LayerShape(96, 6, 3, 16, 256), "tp_sp", 4, ["heads", "6", "P=4"]),
        (LayerShape(96, 6, 3, 16, 256), "ring", 2, ["kv_heads", "3", "P=2"]),
        (SHAPE, "usp", 2, ["usp", "P=2"]),
        (SHAPE, "local", 2, ["local", "P=2"]),
        (SHAPE, "ring", 0, ["positive"]),
        (SHAPE, "sideways", 2, ["unknown strategy", "sideways"]),
    ],
)
def test_counts_refuse_what_the_library_refuses(shape, strategy, P, words) -> None:
    for count in (layer_counts, layer_memory_of):
        with pytest.raises(ValueError) as err:
            count(shape, strategy, [64, 40], P)
        message = str(err.value)
        assert "\n" not in message and all(w in message for w in words), message
    assert not get_strategy(strategy).supports(shape, P)[0] if strategy != "sideways" else True


def layer_memory_of(shape, strategy, lens, P):
    from cost_models.memory import layer_memory

    return layer_memory(shape, strategy, lens, P)
