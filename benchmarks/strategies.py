"""Per-strategy cost of one decoder layer: forward+backward time, bytes sent, peak memory.

Run on 4 CPU ranks (what `make run` does until the trainer exists):

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 benchmarks/strategies.py

For each strategy the group supports and each token count, one packed micro-batch goes through a
layer forward and backward. Time is the median over repeats of the slowest rank; bytes are what
this rank sent (parallel_lib.count_bytes); peak memory is torch's MemTracker peak for the step
(parameters, gradients, activations, temporaries) on rank 0, in a separate untimed run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._tools.mem_tracker import MemTracker

import paradyse
from paradyse import PackedBatch, SwitchableDecoderLayer, init_full_weights
from parallel_lib import RECOMPUTE_MODES, STRATEGY_NAMES, LayerShape, count_bytes, get_strategy
from parallel_lib.cli import add_shape_arguments, int_list, shape_from

MiB = 1 << 20


@dataclass
class Row:
    strategy: str
    tokens: int
    seconds: float
    bytes_sent: int
    peak_bytes: int


def _slowest(seconds: float, mesh: paradyse.Mesh) -> float:
    if mesh.world == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _step(layer, x, dy, batch, strategy, recompute) -> None:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    layer(x, batch, strategy, recompute).backward(dy)


def measure(
    mesh: paradyse.Mesh,
    shape: LayerShape,
    strategies: list[str],
    token_counts: list[int],
    *,
    sequences: int = 1,
    repeats: int = 3,
    recompute: str = "none",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[Row]:
    """Measure every (strategy, token count); collective: every rank of the mesh calls it."""
    g = torch.Generator().manual_seed(seed)
    layer = SwitchableDecoderLayer(shape, mesh.sp_group, dtype=dtype, device=mesh.device)
    layer.load_full_weights(init_full_weights(shape, g, dtype))
    rows = []
    for tokens in token_counts:
        lens = [tokens // sequences] * sequences
        lens[-1] += tokens - sum(lens)
        batch = PackedBatch.pack([[1] * n for n in lens], mesh.sp, mesh.sp_rank, device=mesh.device)
        x = torch.randn(batch.local_tokens, shape.hidden, generator=g, dtype=dtype)
        x = x.to(mesh.device).requires_grad_()
        dy = torch.randn(batch.local_tokens, shape.hidden, generator=g, dtype=dtype).to(mesh.device)
        for name in strategies:
            strategy = get_strategy(name)
            _step(layer, x, dy, batch, strategy, recompute)  # warm-up
            times = []
            for _ in range(repeats):
                if mesh.world > 1:
                    dist.barrier()
                start = time.perf_counter()
                with count_bytes(mesh.sp_group) as sent:
                    _step(layer, x, dy, batch, strategy, recompute)
                times.append(_slowest(time.perf_counter() - start, mesh))
            tracker = MemTracker()
            tracker.track_external(layer)
            with tracker:
                _step(layer, x, dy, batch, strategy, recompute)
            peak = tracker.get_tracker_snapshot("peak")[mesh.device]["Total"]
            rows.append(Row(name, tokens, statistics.median(times), sent.total, peak))
    return rows


def format_table(rows: list[Row]) -> str:
    fastest = {}
    for r in rows:
        fastest[r.tokens] = min(fastest.get(r.tokens, float("inf")), r.seconds)
    lines = [
        f"{'strategy':<9} {'tokens':>7} {'fwd+bwd ms':>11} {'x fastest':>9} "
        f"{'MiB sent/rank':>13} {'peak MiB/rank':>13}"
    ]
    for r in sorted(rows, key=lambda r: (r.tokens, r.seconds)):
        lines.append(
            f"{r.strategy:<9} {r.tokens:>7} {r.seconds * 1e3:>11.1f} "
            f"{r.seconds / fastest[r.tokens]:>9.2f} {r.bytes_sent / MiB:>13.2f} "
            f"{r.peak_bytes / MiB:>13.2f}"
        )
    return "\n".join(lines)


def headline(rows: list[Row]) -> str:
    """Per token count: the fastest strategy and how much slower the slowest one is."""
    parts = []
    for tokens in sorted({r.tokens for r in rows}):
        here = sorted((r for r in rows if r.tokens == tokens), key=lambda r: r.seconds)
        parts.append(
            f"{tokens}: {here[0].strategy} fastest, {here[-1].strategy} "
            f"{here[-1].seconds / here[0].seconds:.2f}x slower"
        )
    return "fastest by token count | " + " | ".join(parts)


def _fail(message: str) -> None:
    """One line on stderr, from rank 0 only (not a traceback per rank), and exit 2."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"benchmarks/strategies.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _validated(args: argparse.Namespace) -> tuple[LayerShape, list[str], list[int]]:
    names = list(STRATEGY_NAMES) if args.strategies == "all" else args.strategies.split(",")
    unknown = [n for n in names if n not in STRATEGY_NAMES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGY_NAMES)}")
    token_counts = int_list("--tokens", args.tokens)
    for flag, value in (("--tokens", min(token_counts)), ("--repeats", args.repeats),
                        ("--sequences", args.sequences)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    return shape_from(args), names, token_counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", default="256,1024,4096", help="comma-separated token counts")
    p.add_argument("--sequences", type=int, default=1, help="equal sequences per micro-batch")
    p.add_argument("--strategies", default="all", help="comma-separated names, or all")
    p.add_argument("--recompute", default="none", choices=RECOMPUTE_MODES)
    p.add_argument("--repeats", type=int, default=3)
    add_shape_arguments(p)  # --hidden --heads --kv-heads --head-dim --ffn --dtype
    args = p.parse_args(argv)
    try:
        shape, names, token_counts = _validated(args)
    except ValueError as e:
        _fail(str(e))

    torch.set_num_threads(1)
    mesh = paradyse.init_mesh()
    chosen = []
    for name in names:
        ok, reason = get_strategy(name).supports(shape, mesh.sp)
        if ok:
            chosen.append(name)
        elif mesh.rank == 0:
            print(f"skipped {reason}")
    if not chosen:
        _fail(f"no strategy supports this shape on sp={mesh.sp}")
    rows = measure(
        mesh,
        shape,
        chosen,
        token_counts,
        sequences=args.sequences,
        repeats=args.repeats,
        recompute=args.recompute,
        dtype=getattr(torch, args.dtype),
    )
    if mesh.rank == 0:
        print(
            f"P={mesh.sp} {mesh.device.type} {args.dtype}, one layer H={shape.hidden} "
            f"heads={shape.heads}/{shape.kv_heads} F={shape.ffn_hidden}, "
            f"{args.sequences} sequence(s) per batch, recompute={args.recompute}"
        )
        print(format_table(rows))
        print(headline(rows))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
