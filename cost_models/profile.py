"""Measure the cost model's coefficients on this machine and write a versioned JSON profile.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 -m cost_models.profile \\
        --out profile.json [--hidden 256 --heads 8 --kv-heads 4 --ffn 704] [--dtype float32]

Every rank runs every measurement at once (the rates include the contention of the real job);
a time is the slowest rank's. Measured: matmul and attention-kernel time per call over sizes
taken from the model shape; memory-bound bandwidth; alpha (a tiny message's time) + bytes/beta
of every collective kind on every group size the strategies use (the group and its inner x outer
factors); the overlap of compute and p2p; and, per option (a strategy on the whole group or on
sub-groups), a calibration scale and overhead from real layer steps at three sizes, timed in
interleaved rounds (`cost_models.profile_calibration`). Each coefficient is measured in rounds
until its spread (IQR / median) is under 10% or a cap of rounds is reached
(`cost_models.stability`); the profile records every spread and the conditions it ran under,
and the output names the coefficients it could not pin down and warns when the machine was
busy. Run it under torchrun on the machine you will train on, with the model's shape. A
measuring module of `cost_models` (it imports torch and `parallel_lib`); layer steps run
through `parallel_lib.decoder_layer_step`, the function training runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from statistics import median

import torch
import torch.distributed as dist

from parallel_lib import (
    attention_backward,
    attention_forward,
    init_mesh,
)
from parallel_lib.cli import add_shape_arguments, fail, shape_from, threads_from_env

from .counts import dtype_name
from .hardware import detect
from .model import CostModel
from .profile_calibration import calibrate, calibration_cases, step_once
from .profile_data import (
    SPREAD_TARGET,
    Curve,
    Profile,
    ProfileError,
)
from .stability import conditions_now, conditions_record, profile_warnings, ranks_here
from .timing import (
    collective_ops,
    measure_elementwise,
    measure_link,
    measure_overlap,
    settled_time,
)

__all__ = ["measure_profile", "main", "step_times"]


def _sizes(first: int, last: int, step: int = 4) -> list[int]:
    """first, first*step, ... up to the first size >= last."""
    sizes = [first]
    while sizes[-1] < last:
        sizes.append(sizes[-1] * step)
    return sizes


def _matmuls(shape, P: int, dtype, device, max_tokens: int) -> tuple[list, list[float]]:
    """Points (FLOPs, seconds) of the layer's matmul shapes over token counts, and each point's
    spread."""
    H, d = shape.hidden, shape.head_dim
    q, kv, F = shape.heads * d, shape.kv_heads * d, shape.ffn_hidden
    pairs = sorted({(H, q + 2 * kv), (q, H), (H, 2 * F), (F, H), (H, 2 * F // P), (F // P, H)})
    points, spreads = [], []
    for m in _sizes(16, max_tokens // 2):
        for k, n in pairs:
            a = torch.randn(m, k, dtype=dtype, device=device)
            b = torch.randn(k, n, dtype=dtype, device=device)
            seconds, reached = settled_time(lambda a=a, b=b: a @ b, device)
            points.append([2.0 * m * k * n, seconds])
            spreads.append(reached)
    return points, spreads


def _attention(shape, P: int, dtype, device, causal: bool, max_tokens: int):
    """(forward, backward) points of one kernel call, causal L x L blocks or unmasked L x L/2
    blocks (a ring step off the diagonal), and the (forward, backward) points' spreads."""
    d, forward, backward, spreads = shape.head_dim, [], [], ([], [])
    for heads, kv in {(shape.heads, shape.kv_heads), (shape.heads // P, shape.kv_heads // P)}:
        for L in _sizes(32, max_tokens) if causal else _sizes(64, max(max_tokens // 2, 512), 8):
            Lk = L if causal else L // 2
            q = torch.randn(L, heads, d, dtype=dtype, device=device)
            k = torch.randn(Lk, kv, d, dtype=dtype, device=device)
            v = torch.randn(Lk, kv, d, dtype=dtype, device=device)
            (f, sf), (b, sb) = _attention_times(q, k, v, causal)
            flops = 4.0 * heads * d * (L * (L + 1) // 2 if causal else L * Lk)
            forward.append([flops, f])
            backward.append([2 * flops, b])
            spreads[0].append(sf)
            spreads[1].append(sb)
    return forward, backward, spreads


def _attention_times(q, k, v, causal: bool):
    """(seconds, spread) of one attention kernel call over one sequence, forward and backward."""
    cu_q, cu_k = [0, q.shape[0]], [0, k.shape[0]]
    out, lse = attention_forward(q, k, v, cu_q, cu_k, causal=causal)
    dout = torch.randn_like(out)
    forward = settled_time(lambda: attention_forward(q, k, v, cu_q, cu_k, causal=causal), q.device)
    backward = settled_time(
        lambda: attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal=causal), q.device
    )
    return forward, backward


def _collectives(groups, dtype, device, spreads: dict[str, float]) -> dict:
    """kind -> group size -> LinkFit for every collective on every group; each alpha's and
    beta's spread goes into `spreads` as 'kind/size.alpha' and 'kind/size.beta'."""
    ops = collective_ops()
    fits: dict = {kind: {} for kind in ops}
    sizes = [1 << 12, 1 << 16, 1 << 19, 1 << 21]  # elements: 16 KiB to 8 MiB in float32
    if device.type != "cpu":  # up to the size of real weight gathers on GPUs
        sizes += [1 << 24, 1 << 26]
    for group in groups:
        for kind, op in ops.items():
            fit, reached = measure_link(op, group, sizes, dtype, device)
            fits[kind][group.size] = fit
            for term, value in reached.items():
                spreads[f"{kind}/{group.size}.{term}"] = value
    return fits


def calibration_lengths(max_tokens: int) -> list[list[int]]:
    """The calibration batches: a few tokens in two sequences, then n and 2n tokens in three
    sequences of unequal lengths, n = min(1536, max(256, max_tokens / 4))."""
    n = min(1536, max(256, max_tokens // 4))
    return [[24, 40]] + [[k // 2, k // 3, k - k // 2 - k // 3] for k in (n, 2 * n)]


def _calibration(mesh, shape, dtype, profile: Profile, max_tokens: int) -> None:
    """Per option (a strategy on the whole group or on sub-groups) and direction, time =
    scale x the analytic time + overhead, fitted on real layer steps timed in interleaved
    rounds (`cost_models.profile_calibration`). Fills `profile.calibration`, its overhead,
    `calibration_points` and the scales' spreads."""
    raw = CostModel(detect(), profile)  # no calibration yet: the analytic times
    calibrate(calibration_cases(mesh, shape, dtype, calibration_lengths(max_tokens), raw), profile)


def step_times(step: Callable[[], torch.Tensor], dy, repeats: int = 3) -> tuple[float, float]:
    """Median forward and backward seconds (slowest rank) of `step()` (a layer's forward, the
    output of which is backpropagated with `dy`)."""
    step().backward(dy)  # warm-up
    forward, backward = zip(*(step_once(step, dy) for _ in range(repeats)), strict=True)
    return median(forward), median(backward)


def _groups(mesh) -> list:
    """The sp group and one group of every other size usp factors it into."""
    groups = [mesh.sp_group] if mesh.sp > 1 else []
    for u in range(2, mesh.sp // 2 + 1):
        if mesh.sp % u == 0 and mesh.sp // u >= 2:
            for g in mesh.sp_group.factor(u):  # one group per size: fits are keyed by size
                if g.size not in {h.size for h in groups}:
                    groups.append(g)
    return groups


def _own_cpu_seconds(seconds: float, mesh) -> float:
    """CPU seconds of this host's ranks: every rank's summed, times the share of ranks here."""
    if not dist.is_initialized() or mesh.world == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=mesh.device)
    dist.all_reduce(t)
    return float(t) * ranks_here(mesh.world) / mesh.world


def measure_profile(mesh, shape, dtype=torch.float32, max_tokens: int = 8192) -> Profile:
    """Run every measurement (collective: every rank calls it) and return the profile, with
    each coefficient's spread and the conditions it was measured under. Kernel sizes go up to
    sequences of `max_tokens`; beyond, the rates are extrapolated as constant."""
    device, P = mesh.device, mesh.sp
    before, cpu_start = conditions_now(), time.process_time()
    spreads: dict[str, float] = {}
    forward, backward, (sf, sb) = _attention(shape, P, dtype, device, True, max_tokens)
    forward_full, backward_full, (sff, sbf) = _attention(shape, P, dtype, device, False,
                                                         max_tokens)  # fmt: skip
    matmul, sm = _matmuls(shape, P, dtype, device, max_tokens)
    curves = {"matmul": sm, "attention_forward": sf, "attention_backward": sb,
              "attention_forward_full": sff, "attention_backward_full": sbf}  # fmt: skip
    for name, values in curves.items():
        spreads[name] = median(values)  # a curve's spread: the median of its points'
    elementwise, reached = measure_elementwise(dtype, device)
    spreads.update({f"elementwise.{term}": value for term, value in reached.items()})
    groups = _groups(mesh)
    collectives = _collectives(groups, dtype, device, spreads) if groups else {}
    overlap = 1.0
    if P > 1:
        overlap, spreads["overlap"] = measure_overlap(mesh.sp_group, dtype, device)
    profile = Profile(
        machine={
            "device": str(device.type),
            "backend": mesh.backend,
            "world_size": mesh.world,
            "sp": P,
            "dtype": dtype_name(dtype),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "shape": [shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.ffn_hidden],
            "max_tokens": max_tokens,
        },
        matmul=Curve(matmul),
        attention_forward=Curve(forward),
        attention_backward=Curve(backward),
        elementwise=elementwise,
        collectives=collectives,
        reduce_scatter_copy="gloo" in mesh.backend,
        attention_forward_full=Curve(forward_full),
        attention_backward_full=Curve(backward_full),
        overlap=overlap,
        spread=spreads,
        spread_target=SPREAD_TARGET,
    )
    _calibration(mesh, shape, dtype, profile, max_tokens)
    own = _own_cpu_seconds(time.process_time() - cpu_start, mesh)
    profile.conditions = conditions_record(
        before, conditions_now(), own_cpu_s=own, ranks=mesh.world,
        ranks_here=ranks_here(mesh.world), threads=torch.get_num_threads(),
        torch_version=torch.__version__,
    )  # fmt: skip
    return profile


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m cost_models.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="where to write the JSON profile")
    p.add_argument(
        "--max-tokens", type=int, default=8192, help="longest sequence to measure kernels at"
    )
    add_shape_arguments(p)
    args = p.parse_args(argv)
    try:
        shape = shape_from(args)
        torch.set_num_threads(threads_from_env())
        mesh = init_mesh()
        problem = shape.layout_problem(mesh.sp)
        if problem:
            raise ValueError(problem)
        if args.max_tokens < 64:
            raise ValueError(f"--max-tokens must be at least 64, got {args.max_tokens}")
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            raise ValueError(f"--out {args.out}: folder {folder} does not exist")
        if os.path.isdir(args.out):
            raise ValueError(f"--out {args.out} is a folder; give a file name")
    except ValueError as e:
        fail(p.prog, str(e))
    start = time.perf_counter()
    profile = measure_profile(mesh, shape, getattr(torch, args.dtype), args.max_tokens)
    if mesh.rank == 0:
        try:
            profile.save(args.out)
        except (OSError, ProfileError) as e:
            fail(p.prog, f"cannot write {args.out}: {e}")
        print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s, {mesh.world} ranks)")
        print(_spread_line(profile))
        for line in profile_warnings(profile, args.out):
            print(line, file=sys.stderr)
    if dist.is_initialized():
        dist.destroy_process_group()


def _spread_line(profile: Profile) -> str:
    """How well the coefficients were pinned down, in one line."""
    spreads = profile.spread
    worst = max(spreads, key=spreads.get)
    return (
        f"spread: median {median(spreads.values()):.1%}, worst {worst} {spreads[worst]:.1%}; "
        f"{sum(v <= profile.spread_target for v in spreads.values())} of {len(spreads)} "
        f"coefficients within the {profile.spread_target:.0%} target"
    )


if __name__ == "__main__":
    main()
