"""Validate the cost model on this machine: real layer steps against predictions.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 -m cost_models.validate \\
        [--profile profile.json] [--tokens 256,1024,4096,8192] [--strategies all] \\
        [--recompute none,selective,full] [--sequences 2]

For every strategy the group supports x recompute mode x token count: one decoder layer's
forward + backward on a packed micro-batch (`--sequences` sequences of uneven lengths), time
measured as the slowest rank's median and peak memory (weights, gradients, the input, its
gradient, activations, temporaries; torch's MemTracker on CPU, cuda.max_memory_allocated on
CUDA), beside the model's prediction. Without
`--profile` the machine is profiled first (as `python -m cost_models.profile` does). The last
line is exactly:
    time error: median X% worst Y% | memory error: median Z% worst W%
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._tools.mem_tracker import MemTracker

from .counts import RECOMPUTE_MODES, STRATEGIES, dtype_name
from .hardware import detect
from .model import CostModel
from .profile import (
    add_shape_arguments,
    fail,
    int_list,
    measure_profile,
    shape_from,
    step_times,
    threads_from_env,
)
from .profile_data import Profile

__all__ = ["Cell", "validate", "batch_lengths", "main"]

MiB = 1 << 20


@dataclass
class Cell:
    strategy: str
    recompute: str
    tokens: int
    measured_s: float
    predicted_s: float
    measured_bytes: int
    predicted_bytes: int

    @property
    def time_error(self) -> float:
        return abs(self.predicted_s - self.measured_s) / self.measured_s

    @property
    def memory_error(self) -> float:
        return abs(self.predicted_bytes - self.measured_bytes) / self.measured_bytes


def batch_lengths(tokens: int, sequences: int) -> list[int]:
    """Uneven lengths summing to `tokens`: sequence i gets a share proportional to i + 1."""
    weights = list(range(1, sequences + 1))
    lens = [max(1, tokens * w // sum(weights)) for w in weights]
    lens[-1] += tokens - sum(lens)
    return lens


def measured_peak(layer, x, dy, batch, strategy, recompute, device) -> int:
    """Peak bytes over one step, with the gradients already allocated (steady state), counting
    the parameters, their gradients, x and dy: torch.cuda.max_memory_allocated on CUDA,
    MemTracker's peak elsewhere (DESIGN 6)."""
    layer(x, batch, strategy, recompute).backward(dy)
    gc.collect()
    if device.type == "cuda":
        held = sum(t.numel() * t.element_size() for t in (*layer.parameters(), x, dy))
        held += sum(p.grad.numel() * p.grad.element_size() for p in layer.parameters())
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        layer(x, batch, strategy, recompute).backward(dy)
        return torch.cuda.max_memory_allocated(device) - before + held
    tracker = MemTracker()
    tracker.track_external(layer, x, dy)
    with tracker:
        layer(x, batch, strategy, recompute).backward(dy)
    return tracker.get_tracker_snapshot("peak")[device]["Total"]


def predicted_peak(cost, layer, x) -> int:
    """Parameters, their gradients, the input and its gradient, plus the layer's worst moment."""
    params = sum(p.numel() * p.element_size() for p in layer.parameters())
    io = 2 * x.numel() * x.element_size()
    return 2 * params + io + max(cost.forward_peak_bytes, cost.backward_peak_bytes)


def validate(mesh, shape, model: CostModel, strategies, recomputes, token_counts, sequences,
             dtype=torch.float32, repeats: int = 3) -> list[Cell]:  # fmt: skip
    """Measure and predict every cell (collective: every rank calls it)."""
    from paradyse import PackedBatch, SwitchableDecoderLayer

    P = mesh.sp
    layer = SwitchableDecoderLayer(shape, mesh.sp_group, dtype=dtype, device=mesh.device)
    g = torch.Generator().manual_seed(0)
    cells = []
    for tokens in token_counts:
        lens = batch_lengths(tokens, sequences)
        batch = PackedBatch.pack([[1] * n for n in lens], P, mesh.sp_rank, device=mesh.device)
        x = torch.randn(batch.local_tokens, shape.hidden, generator=g, dtype=dtype)
        x = x.to(mesh.device).requires_grad_()
        dy = torch.randn(batch.local_tokens, shape.hidden, generator=g, dtype=dtype)
        dy = dy.to(mesh.device)
        for name in strategies:
            for recompute in recomputes:
                fwd, bwd = step_times(layer, x, dy, batch, name, recompute, repeats)
                peak = measured_peak(layer, x, dy, batch, name, recompute, mesh.device)
                cost = model.layer_cost(shape, name, recompute, lens, P, dtype=dtype_name(dtype))
                cells.append(Cell(name, recompute, tokens, fwd + bwd, cost.time_s, peak,
                                  predicted_peak(cost, layer, x)))  # fmt: skip
    return cells


def format_table(cells: list[Cell]) -> str:
    lines = [
        f"{'strategy':<8} {'recompute':<9} {'tokens':>6} {'ms meas':>8} {'ms pred':>8} "
        f"{'err':>6} {'MiB meas':>9} {'MiB pred':>9} {'err':>6}"
    ]
    for c in cells:
        lines.append(
            f"{c.strategy:<8} {c.recompute:<9} {c.tokens:>6} {c.measured_s * 1e3:>8.1f} "
            f"{c.predicted_s * 1e3:>8.1f} {100 * c.time_error:>5.1f}% "
            f"{c.measured_bytes / MiB:>9.2f} {c.predicted_bytes / MiB:>9.2f} "
            f"{100 * c.memory_error:>5.1f}%"
        )
    return "\n".join(lines)


def summary(cells: list[Cell]) -> str:
    t = [c.time_error for c in cells]
    m = [c.memory_error for c in cells]
    return (
        f"time error: median {100 * statistics.median(t):.1f}% worst {100 * max(t):.1f}% | "
        f"memory error: median {100 * statistics.median(m):.1f}% worst {100 * max(m):.1f}%"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m cost_models.validate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--profile", help="a profile from python -m cost_models.profile")
    p.add_argument("--tokens", default="256,1024,4096,8192", help="comma-separated token counts")
    p.add_argument("--strategies", default="all", help="comma-separated names, or all")
    p.add_argument(
        "--recompute", default=",".join(RECOMPUTE_MODES), help="comma-separated recompute modes"
    )
    p.add_argument("--sequences", type=int, default=2, help="sequences per micro-batch")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per cell (median)")
    add_shape_arguments(p)
    args = p.parse_args(argv)
    import paradyse
    from parallel_lib import get_strategy

    try:
        shape = shape_from(args)
        tokens = int_list("--tokens", args.tokens)
        if min(tokens) < args.sequences:
            raise ValueError(
                f"--tokens {min(tokens)} cannot hold --sequences {args.sequences} sequences"
            )
        names = list(STRATEGIES) if args.strategies == "all" else args.strategies.split(",")
        recomputes = args.recompute.split(",")
        for value, known, what in ((names, STRATEGIES, "strategy"),
                                   (recomputes, RECOMPUTE_MODES, "recompute mode")):  # fmt: skip
            bad = [v for v in value if v not in known]
            if bad:
                raise ValueError(f"unknown {what} {bad}; choose from {', '.join(known)}")
        if min(tokens) < 1 or args.sequences < 1 or args.repeats < 1:
            raise ValueError("--tokens, --sequences and --repeats must be positive")
        profile = Profile.load(args.profile) if args.profile else None
        torch.set_num_threads(threads_from_env())
        mesh = paradyse.init_mesh()
        if profile is not None:
            profile.check_matches(dtype=args.dtype, sp=mesh.sp)
    except ValueError as e:  # ProfileError included
        fail(p.prog, str(e))
    names = [n for n in names if get_strategy(n).supports(shape, mesh.sp)[0]]
    if not names:
        fail(p.prog, f"no strategy supports this shape on sp={mesh.sp}")
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    if profile is None:
        if mesh.rank == 0:
            print("no --profile given: profiling this machine first")
        profile = measure_profile(mesh, shape, dtype)
    model = CostModel(detect(), profile)
    cells = validate(mesh, shape, model, names, recomputes, tokens, args.sequences, dtype,
                     args.repeats)  # fmt: skip
    if mesh.rank == 0:
        print(
            f"P={mesh.sp} {profile.machine.get('device')} {args.dtype}, one layer "
            f"H={shape.hidden} heads={shape.heads}/{shape.kv_heads} F={shape.ffn_hidden}, "
            f"{args.sequences} sequences per batch, {time.perf_counter() - start:.0f} s"
        )
        print(format_table(cells))
        print(summary(cells))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
