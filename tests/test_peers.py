"""benchmarks/peers.py runs end to end on 2 ranks (--quick): every peer's first-step loss matches
ParaDySe's, the tables and the last line have their format, and a per-rank token limit makes
the peers that cannot hold a sequence unfit."""

from __future__ import annotations

import re

import numpy as np

from benchmarks.peer_models import pack
from benchmarks.peers import main, window_batches
from paradyse import ModelConfig

from .harness import run_distributed
from .layer_cases import mesh_for

HEADLINE = re.compile(r"^paradyse/best-peer = \d+\.\d\dx  short = \d+\.\d\dx  long = \d+\.\d\dx$")
METHODS = ["single", "fsdp2", "dtensor_tp", "paradyse"]
PASSES = ["default", "short", "long", "per-length"]


def peers_case(argv: list[str]) -> dict:
    lines: list[str] = []
    summary = main(argv, mesh=mesh_for(2), log=lines.append)
    summary["printed"] = lines
    return summary


def test_peers_quick() -> None:
    results = run_distributed(2, peers_case, ["--quick"], timeout=120)
    summary, lines = results[0], results[0]["printed"]
    assert results[1]["printed"] == []  # only rank 0 prints
    assert list(summary["passes"]) == PASSES
    for name, result in summary["passes"].items():
        assert result["methods"] == METHODS
        losses = result["first_loss"]
        assert set(losses) == set(METHODS), name
        for method in METHODS:
            assert abs(losses[method] - losses["paradyse"]) <= 1e-4, (name, method, losses)
            assert result["unfit"][method] == 0 and result["tokens_per_s"][method] > 0
        assert len(result["plans"]) == len(result["lengths"])
    table = [line.split() for line in lines]
    for mix in PASSES[:3]:
        rows = [row for row in table if len(row) > 1 and row[0] == mix and row[1] in METHODS]
        assert [row[1] for row in rows] == METHODS, mix
    by_length = [i for i, line in enumerate(lines) if line.startswith("tokens/s by length")]
    assert lines[by_length[0] + 1].split() == ["method", "32", "128"]
    assert summary["loss_ok"] and lines[-3].startswith("loss check") and lines[-3].endswith(": ok")
    assert HEADLINE.match(lines[-1]), lines[-1]


def test_a_rank_token_limit_makes_peers_unfit() -> None:
    """100 tokens per rank: the long mix (256-512 tokens) fits no peer (dtensor_tp holds half of
    a sequence, still over 100), so its ratio is inf; ParaDySe cuts micro-batches and fits."""
    argv = ["--quick", "--rank-tokens", "100", "--lengths", ""]
    summary = run_distributed(2, peers_case, argv, timeout=120)[0]
    long = summary["passes"]["long"]
    assert all(long["unfit"][m] == 1 for m in METHODS[:3]) and long["unfit"]["paradyse"] == 0
    assert summary["passes"]["short"]["unfit"] == dict.fromkeys(METHODS, 0)
    assert summary["printed"][-1].endswith("  long = infx")


def test_pack_groups_equal_lengths_and_pads() -> None:
    config = ModelConfig(hidden=32, heads=2, kv_heads=1, head_dim=16, ffn_hidden=64, layers=1)
    seqs = [np.arange(5), np.arange(3), np.arange(5), np.arange(2)]
    packed = pack(seqs, config, multiple=4)
    assert packed.runs == ((0, 1, 2), (2, 1, 3), (5, 2, 5), (15, 1, 1))  # padded by 1 to 16
    assert packed.tokens.shape == (1, 16) and int((packed.labels >= 0).sum()) == 11
    assert packed.cos.shape == (16, 16) and float(packed.cos[5, 0]) == 1.0  # position 0


def test_window_batches_are_fixed_by_the_seed() -> None:
    batches = window_batches(32, 256, steps=2, budget=1000, seed=3)
    again = window_batches(32, 256, steps=2, budget=1000, seed=3)
    assert [[s.tolist() for s in b] for b in batches] == [[s.tolist() for s in b] for b in again]
    for batch in batches:
        assert sum(map(len, batch)) <= 1000 and all(32 <= len(s) <= 256 for s in batch)
