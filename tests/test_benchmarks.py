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
