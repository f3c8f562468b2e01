"""The strategy benchmark runs, and its byte column is what the formulas say."""

from __future__ import annotations

from benchmarks.strategies import format_table, headline, measure
from cost_models.counts import comm_bytes

from .harness import run_distributed
from .layer_cases import SHAPE, mesh_for


def benchmark_case() -> list:
    mesh = mesh_for()
    names = ["tp_sp", "ulysses", "ring", "metp"]
    rows = measure(mesh, SHAPE, names, [16, 64], repeats=1)
    for row in rows:
        forward, backward, _, _ = comm_bytes(SHAPE, row.strategy, row.tokens, mesh.sp)
        expected = sum(forward.values()) + sum(backward.values())
        assert row.bytes_sent == expected, (row, expected)
        assert row.seconds > 0 and row.peak_bytes > 0
    return rows


def test_strategy_benchmark_smoke() -> None:
    rows = run_distributed(2, benchmark_case)[0]
    assert {(r.strategy, r.tokens) for r in rows} == {
        (n, t) for n in ["tp_sp", "ulysses", "ring", "metp"] for t in (16, 64)
    }
    table = format_table(rows)
    assert len(table.splitlines()) == 1 + len(rows)
    assert headline(rows).startswith("fastest by token count | 16: ")


TINY = ["model.hidden=64", "model.heads=4", "model.kv_heads=2", "model.head_dim=16",
        "model.ffn_hidden=128", "model.layers=2"]  # fmt: skip


def step_profile_case() -> list[dict]:
    from benchmarks.step_profile import parse_args, run

    argv = ["--tokens", "16", "--options", "tp_sp,g1:local", "--warmup", "1", "--steps", "1"]
    for item in TINY:
        argv += ["--set", item]
    return run(parse_args(argv), mesh_for())[1]


def test_step_profile_counts_every_collective() -> None:
    """Two ranks, two layers: the rows add up to the profiled step, and the calls are the
    strategies' (tp_sp per layer: 2 gathers and 2 reduce-scatters forward, 4 and 2 backward;
    g1:local: one gather of each layer half's weights forward, one reduce-scatter backward),
    plus the embedding's and the head's gathers (the head keeps its gathered weight for the
    backward) and their gradients' reduce-scatters, the step's one all-reduce over sp, its
    barrier and its one metrics gather."""
    records = run_distributed(2, step_profile_case)[0]
    calls = {r["option"]: r["calls"] for r in records}
    for record in records:
        assert (
            abs(sum(record["rows"].values()) - record["profiled_ms"])
            < 1e-6 * record["profiled_ms"] + 1e-9
        )
        assert record["step_ms"] > 0
    assert calls["tp_sp"] == {"all_gather": 2 * 6 + 3, "reduce_scatter": 2 * 4 + 2,
                              "all_reduce": 1, "barrier": 1}  # fmt: skip
    assert calls["g1:local"] == {"all_gather": 2 * 2 + 3, "reduce_scatter": 2 * 2 + 2,
                                 "all_reduce": 1, "barrier": 1}  # fmt: skip
