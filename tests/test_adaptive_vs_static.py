"""benchmarks/adaptive_vs_static.py runs end to end on 2 ranks with a small model."""

from __future__ import annotations

import re

import pytest

from benchmarks.adaptive_mix import micro_batch_lengths
from benchmarks.adaptive_vs_static import main

from .harness import run_distributed
from .layer_cases import mesh_for

SMALL = [
    "--set", "model.layers=2", "--set", "model.hidden=64", "--set", "model.heads=4",
    "--set", "model.kv_heads=2", "--set", "model.head_dim=16", "--set", "model.ffn_hidden=128",
    "--profile", "none", "--batches", "3", "--min-tokens", "16", "--max-tokens", "256",
]  # fmt: skip
HEADLINE = re.compile(
    r"^adaptive/best-static = \d+\.\d\dx  adaptive/oracle = \d+\.\d\dx  unfit\(best-static\) = \d+$"
)


def benchmark_case(extra: list[str]) -> dict:
    lines: list[str] = []
    summary = main(SMALL + extra, mesh=mesh_for(2), log=lines.append)
    summary["printed"] = lines
    return summary


def test_lengths_are_deterministic_and_span_the_range() -> None:
    lengths = micro_batch_lengths(8, 64, 8192, seed=3)
    assert lengths == micro_batch_lengths(8, 64, 8192, seed=3)
    assert min(lengths) == 64 and max(lengths) == 8192
    assert lengths.count(64) == 12 and lengths.count(8192) == 1  # ceil(sqrt(8192 / n)) copies


def test_adaptive_vs_static_smoke() -> None:
    results = run_distributed(
        2, benchmark_case, ["--memory-budget", "1GiB", "--repeats", "2"], timeout=120
    )
    summary = results[0]
    assert results[1]["printed"] == []  # only rank 0 prints
    methods = summary["methods"]
    assert methods[:2] == ["exact", "paradyse"]
    statics = {"static:tp_sp", "static:ulysses", "static:ring", "static:metp"}  # no usp at sp=2
    assert statics <= set(methods)
    table = summary["printed"]
    for method in methods + ["oracle"]:
        assert any(line.split()[0] == method for line in table if line.strip()), method
    n = len(summary["lengths"])
    for method in methods:
        seconds = summary["seconds"][method]
        ran = [s for s in seconds if s is not None]
        assert len(seconds) == n and len(ran) + summary["unfit"][method] == n
        assert all(s > 0 for s in ran)
    assert summary["unfit"]["exact"] == 0
    assert summary["best_static"] in statics
    assert HEADLINE.match(table[-1]), table[-1]
    assert table[1:] == summary["lines"]  # after the set-up line


def test_predict_counts_unfit_batches() -> None:
    """A budget the longest batch cannot fit: every method skips it, and says so."""
    summary = run_distributed(
        2, benchmark_case, ["--predict", "--memory-budget", "1.5MiB"], timeout=60
    )[0]
    assert HEADLINE.match(summary["printed"][-1])
    n = len(summary["lengths"])
    for method in summary["methods"]:
        seconds = summary["seconds"][method]
        assert summary["unfit"][method] == sum(s is None for s in seconds) and len(seconds) == n
    assert summary["unfit"]["exact"] == 1  # the 256-token batch (the cost model fits 164)


def test_ceiling_is_the_fastest_option_and_bounds_every_static() -> None:
    """The ceiling pass measures every strategy x recompute mode per distinct length; its
    `fastest` row is their minimum, so its ratio to the best static is at least 1."""
    summary = run_distributed(
        2, benchmark_case, ["--memory-budget", "1GiB", "--repeats", "1", "--ceiling"], timeout=180
    )[0]
    lines = summary["printed"]
    start = lines.index("ceiling: every uniform option, ms per step (median), no memory limit")
    header = lines[start + 1].split()
    assert header[0] == "option" and [int(n) for n in header[1:]] == sorted(set(summary["lengths"]))
    rows = {}
    for line in lines[start + 2 :]:
        if line.startswith("ceiling/best-static"):
            break
        name, *cells = line.split()
        rows[name] = [None if c == "-" else int(c) for c in cells]
    statics = [m.removeprefix("static:") for m in summary["methods"] if m.startswith("static:")]
    assert set(rows) == {f"{s}+{m}" for s in statics for m in ("none", "selective", "full")} | {
        "fastest"
    }
    fastest = rows.pop("fastest")
    columns = zip(*rows.values(), strict=True)
    assert fastest == [min(t for t in column if t is not None) for column in columns]
    ratio = re.match(r"^ceiling/best-static = (\d+\.\d\d)x  \((\w+), unfit 0; ", lines[-4])
    assert ratio and float(ratio.group(1)) >= 1.0 and ratio.group(2) in statics, lines[-4]
    assert HEADLINE.match(lines[-1])


def test_ceiling_leaves_out_what_the_budget_cannot_fit() -> None:
    """At 1.5 MiB nothing fits the 256-token batch. The ratio, recomputed here from the pass's
    times: the exact planner's batches each on the fastest option, over the best static's
    batches each on the option it ran (its uniform plan)."""
    summary = run_distributed(
        2, benchmark_case, ["--memory-budget", "1.5MiB", "--repeats", "1", "--ceiling"],
        timeout=180,
    )[0]  # fmt: skip
    lengths, best = summary["lengths"], summary["best_static"]
    assert summary["unfit"]["exact"] == 1 and summary["unfit"][best] >= 1
    table = summary["ceiling"]
    column = {n: i for i, n in enumerate(table["lengths"])}
    fastest = {
        n: min(t[column[n]] for t in table["seconds"].values() if t[column[n]] is not None)
        for n in column
    }
    fit = [n for n, s in zip(lengths, summary["seconds"]["exact"], strict=True) if s is not None]
    size = dict(zip(lengths, [n * k for n, k in zip(lengths, summary["counts"], strict=True)],
                    strict=True))  # fmt: skip
    bound = sum(size[n] for n in fit) / sum(fastest[n] for n in fit)
    ran = [(n, plan.split(" x")[0]) for n, plan in zip(lengths, summary["plans"][best],
                                                       strict=True) if plan != "-"]  # fmt: skip
    ran = [(n, label if "+" in label else f"{label}+none") for n, label in ran]
    static = sum(size[n] for n, _ in ran) / sum(table["seconds"][o][column[n]] for n, o in ran)
    printed = re.match(r"^ceiling/best-static = (\d+\.\d\d)x ", summary["printed"][-4])
    assert printed and float(printed.group(1)) == pytest.approx(bound / static, abs=0.0051)
    same_batches = summary["unfit"][best] == summary["unfit"]["exact"]
    assert bound / static >= 1.0 - 1e-12 or not same_batches  # fastest <= any option


@pytest.mark.parametrize("measured", ["--ceiling", "--bound"])
def test_measured_passes_and_predict_do_not_combine(measured: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(SMALL + [measured, "--predict"], mesh=mesh_for(1), log=lambda line: None)
    assert exit_info.value.code == 2


def test_bound_is_one_process_over_the_cores() -> None:
    """The bound pass times every batch on one process; its printed ratios are the tokens over
    those seconds / cores, against the best static's and exact's own measured seconds."""
    summary = run_distributed(
        2, benchmark_case, ["--memory-budget", "1GiB", "--repeats", "1", "--bound"], timeout=180
    )[0]
    single, cores = summary["bound"]["single_seconds"], summary["bound"]["cores"]
    assert len(single) == len(summary["lengths"]) and all(s > 0 for s in single)
    assert 1 <= cores <= 2  # 2 ranks of one thread each
    tokens = [k * n for k, n in zip(summary["counts"], summary["lengths"], strict=True)]
    bound_rate = sum(tokens) / (sum(single) / cores)  # every method ran every batch at 1 GiB
    static_rate = sum(tokens) / sum(summary["seconds"][summary["best_static"]])
    exact_rate = sum(tokens) / sum(summary["seconds"]["exact"])
    printed = next(line for line in summary["printed"] if line.startswith("bound/best-static"))
    ratios = re.match(r"^bound/best-static = (\d+\.\d\d)x  exact/bound = (\d+\.\d\d)  ", printed)
    assert ratios, printed
    assert float(ratios.group(1)) == pytest.approx(bound_rate / static_rate, abs=0.0051)
    assert float(ratios.group(2)) == pytest.approx(exact_rate / bound_rate, abs=0.0051)
    table = summary["printed"]
    start = next(i for i, line in enumerate(table) if line.startswith("bound: one process"))
    rows = [line.split() for line in table[start + 2 : start + 2 + len(set(summary["lengths"]))]]
    lengths = [int(r[0].split("x")[1]) for r in rows]
    assert lengths == sorted(set(summary["lengths"]))
    for row, length in zip(rows, lengths, strict=True):
        at = [i for i, n in enumerate(summary["lengths"]) if n == length]
        assert row[0] == f"{summary['counts'][at[0]]}x{length}"
        assert int(row[1]) == len(at)
        assert float(row[2]) == pytest.approx(sum(single[i] for i in at) * 1e3, abs=0.51)
        assert float(row[3]) == pytest.approx(sum(single[i] for i in at) / cores * 1e3, abs=0.51)
        static = sum(summary["seconds"][summary["best_static"]][i] for i in at)
        assert float(row[4]) == pytest.approx(static * 1e3, abs=0.51)
    assert HEADLINE.match(table[-1]), table[-1]
