"""Measure the cost model's coefficients on this machine and write a versioned JSON profile.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 -m cost_models.profile \\
        --out profile.json [--hidden 256 --heads 8 --kv-heads 4 --ffn 704] [--dtype float32]

Every rank runs every measurement at once (the rates include the contention of the real job);
a time is the slowest rank's. Measured: matmul and attention-kernel time per call over sizes
taken from the model shape; memory-bound bandwidth; alpha + bytes/beta of every collective kind
on every group size the strategies use (the group and its inner x outer factors); the overlap of
compute and p2p; and, per strategy, a calibration scale from real layer steps at three sizes.
Run it under torchrun on the machine you will train on, with the model's shape. It is one of the
two modules of `cost_models` that import torch and `parallel_lib` (with `cost_models.validate`);
layer steps run through `parallel_lib.decoder_layer_step`, the function training runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist

from parallel_lib import (
    LayerWeights,
    RingExchange,
    ZigzagLayout,
    all_gather_dim0,
    all_reduce_,
    all_to_all,
    attention_backward,
    attention_forward,
    count_bytes,
    decoder_layer_step,
    get_strategy,
    init_mesh,
    pad_length,
    reduce_scatter_dim0,
)
from parallel_lib.cli import add_shape_arguments, fail, shape_from, threads_from_env

from .counts import RECOMPUTE_MODES, STRATEGIES, dtype_name
from .hardware import detect
from .model import CostModel
from .profile_data import Curve, LinkFit, Profile, ProfileError
from .profile_groups import calibrate_sub_groups

__all__ = ["measure_profile", "main"]

MIN_SECONDS = 0.02  # each measurement repeats the call until it has run this long


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so a clock read times work, not launches."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _slowest(seconds: float, device: torch.device) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def timed(
    fn: Callable[[], object],
    device: torch.device,
    repeats: int | None = None,
    min_seconds: float = MIN_SECONDS,
) -> float:
    """Mean seconds per call of fn on the slowest rank over back-to-back calls (a count every
    rank agrees on, so collectives inside fn stay matched), after a warm-up. The mean, not a
    best case: a training step sees the average contention of ranks sharing a machine."""
    fn()
    if repeats is None:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        once = _slowest(time.perf_counter() - start, device)
        repeats = max(2, min(100, int(min_seconds / max(once, 1e-6)) + 1))
    if dist.is_initialized():
        dist.barrier()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return _slowest((time.perf_counter() - start) / repeats, device)


def _sizes(first: int, last: int, step: int = 4) -> list[int]:
    """first, first*step, ... up to the first size >= last."""
    sizes = [first]
    while sizes[-1] < last:
        sizes.append(sizes[-1] * step)
    return sizes


def _matmuls(shape, P: int, dtype, device, max_tokens: int) -> list[list[float]]:
    H, d = shape.hidden, shape.head_dim
    q, kv, F = shape.heads * d, shape.kv_heads * d, shape.ffn_hidden
    pairs = sorted({(H, q + 2 * kv), (q, H), (H, 2 * F), (F, H), (H, 2 * F // P), (F // P, H)})
    points = []
    for m in _sizes(16, max_tokens // 2):
        for k, n in pairs:
            a = torch.randn(m, k, dtype=dtype, device=device)
            b = torch.randn(k, n, dtype=dtype, device=device)
            points.append([2.0 * m * k * n, timed(lambda a=a, b=b: a @ b, device)])
    return points


def _attention(shape, P: int, dtype, device, causal: bool, max_tokens: int) -> tuple[list, list]:
    """(forward, backward) points of one kernel call: causal L x L blocks, or unmasked L x L/2
    blocks (a ring step off the diagonal)."""
    d, forward, backward = shape.head_dim, [], []
    for heads, kv in {(shape.heads, shape.kv_heads), (shape.heads // P, shape.kv_heads // P)}:
        for L in _sizes(32, max_tokens) if causal else _sizes(64, max(max_tokens // 2, 512), 8):
            Lk = L if causal else L // 2
            q = torch.randn(L, heads, d, dtype=dtype, device=device)
            k = torch.randn(Lk, kv, d, dtype=dtype, device=device)
            v = torch.randn(Lk, kv, d, dtype=dtype, device=device)
            f, b = _attention_times(q, k, v, causal)
            flops = 4.0 * heads * d * (L * (L + 1) // 2 if causal else L * Lk)
            forward.append([flops, f])
            backward.append([2 * flops, b])
    return forward, backward


def _attention_times(q, k, v, causal: bool) -> tuple[float, float]:
    """Forward and backward seconds of one attention kernel call over one sequence."""
    cu_q, cu_k = [0, q.shape[0]], [0, k.shape[0]]
    out, lse = attention_forward(q, k, v, cu_q, cu_k, causal=causal)
    dout = torch.randn_like(out)
    forward = timed(lambda: attention_forward(q, k, v, cu_q, cu_k, causal=causal), q.device)
    backward = timed(
        lambda: attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal=causal), q.device
    )
    return forward, backward


def _overlap(group, dtype, device) -> float:
    """Fraction of the shorter of a matmul and a ring exchange hidden when both run at once."""
    a = torch.randn(512, 512, dtype=dtype, device=device)
    payload = torch.randn(1 << 20, dtype=dtype, device=device)

    def exchange():
        ring = RingExchange(group)
        ring.start(payload)
        return ring.wait()

    def both():
        ring = RingExchange(group)
        ring.start(payload)
        for _ in range(4):
            a @ a
        return ring.wait()

    # long measurements: the fraction is a small difference of large times
    compute = timed(lambda: [a @ a for _ in range(4)], device, min_seconds=0.25)
    comm = timed(exchange, device, min_seconds=0.25)
    together = timed(both, device, min_seconds=0.25)
    return min(max((compute + comm - together) / min(compute, comm), 0.0), 1.0)


def _elementwise(dtype, device) -> LinkFit:
    samples = []
    for n in (1 << 16, 1 << 19, 1 << 22):
        a, b = (
            torch.randn(n, dtype=dtype, device=device),
            torch.randn(n, dtype=dtype, device=device),
        )
        samples.append((3.0 * n * a.element_size(), timed(lambda a=a, b=b: a + b, device)))
    return LinkFit.fit(samples)


def _collectives(groups, dtype, device) -> dict[str, dict[int, LinkFit]]:
    def exchange(group, x):
        ring = RingExchange(group)
        ring.start(x)
        return ring.wait()

    ops = {
        "all_gather": lambda g, x: all_gather_dim0(x, g),
        "reduce_scatter": lambda g, x: reduce_scatter_dim0(x, g),
        "all_to_all": lambda g, x: all_to_all(x, g, scatter_dim=0, gather_dim=1),
        "all_reduce": lambda g, x: all_reduce_(x, g),
        "p2p": exchange,
    }
    fits: dict[str, dict[int, LinkFit]] = {kind: {} for kind in ops}
    sizes = [1 << 12, 1 << 16, 1 << 19, 1 << 21]  # elements: 16 KiB to 8 MiB in float32
    if device.type != "cpu":  # up to the size of real weight gathers on GPUs
        sizes += [1 << 24, 1 << 26]
    for group in groups:
        P = group.size
        for kind, op in ops.items():
            samples = []
            for elements in sizes:
                rows = max(P, elements // 256 // P * P)
                x = torch.randn(rows, 256, dtype=dtype, device=device)
                with count_bytes(group) as sent:
                    op(group, x)
                samples.append((float(sent.total), timed(partial(op, group, x), device)))
            fits[kind][P] = LinkFit.fit(samples)
    return fits


def calibration_lengths(max_tokens: int) -> list[list[int]]:
    """The calibration batches: a few tokens in two sequences, then n and 2n tokens in three
    sequences of unequal lengths, n = min(1536, max(256, max_tokens / 4))."""
    n = min(1536, max(256, max_tokens // 4))
    return [[24, 40]] + [[k // 2, k // 3, k - k // 2 - k // 3] for k in (n, 2 * n)]


def _calibration(mesh, shape, dtype, profile: Profile, max_tokens: int) -> None:
    """Per strategy and direction, time = scale x the analytic time, fitted on real layer steps
    of the strategy in every recompute mode at three sizes (least squares on relative errors).
    The scale is what the kernel and link measurements miss inside a real step: per-op
    dispatch, contention between ranks sharing cores, merges and copies that are not plain
    bandwidth, imperfect overlap. Fills `profile.calibration` and `calibration_points`."""
    P = mesh.sp
    raw = CostModel(detect(), profile)  # no calibration yet: the analytic times
    weights = LayerWeights.random(shape, P, dtype=dtype, device=mesh.device)
    points = []
    for lens in calibration_lengths(max_tokens):
        layout = ZigzagLayout([pad_length(n, P) for n in lens], P, mesh.sp_rank, mesh.device)
        x = torch.randn(layout.local_tokens, shape.hidden, dtype=dtype, device=mesh.device)
        points.append((lens, layout, x.requires_grad_(), torch.randn_like(x)))
    measured = {}
    for name in STRATEGIES:
        strategy = get_strategy(name)
        if not strategy.supports(shape, P)[0]:
            continue
        rows = []
        for recompute in RECOMPUTE_MODES:
            for lens, layout, x, dy in points:
                step = partial(decoder_layer_step, x, weights, layout, mesh.sp_group, strategy,
                               recompute)  # fmt: skip
                fwd, bwd = step_times(step, dy, repeats=5)
                cost = raw.layer_cost(shape, name, recompute, lens, P, dtype=dtype_name(dtype))
                rows.append([sum(lens), fwd, bwd, cost.forward_s, cost.backward_s])
            profile.calibration_points[f"{name}/{recompute}"] = rows[-len(points) :]
        measured[name] = rows
    for name, rows in measured.items():
        profile.calibration[name] = tuple(
            _scale([(row[1 + phase], row[3 + phase]) for row in rows]) for phase in (0, 1)
        )
    calibrate_sub_groups(mesh, shape, dtype, profile, calibration_lengths(max_tokens), raw,
                         partial(step_times, repeats=3), _scale)  # fmt: skip


def _scale(pairs: list[tuple[float, float]]) -> float:
    """k minimising sum((k x analytic - measured) / measured)^2, clamped to [0.25, 4]."""
    ratios = [a / m for m, a in pairs if m > 0]
    k = sum(ratios) / max(sum(r * r for r in ratios), 1e-18)
    return min(max(k, 0.25), 4.0)


def step_times(step: Callable[[], torch.Tensor], dy, repeats: int = 3) -> tuple[float, float]:
    """Median forward and backward seconds (slowest rank) of `step()` (a layer's forward, the
    output of which is backpropagated with `dy`)."""
    forward, backward = [], []
    step().backward(dy)  # warm-up
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()
        synchronize(dy.device)
        start = time.perf_counter()
        y = step()
        synchronize(dy.device)
        middle = time.perf_counter()
        y.backward(dy)
        synchronize(dy.device)
        end = time.perf_counter()
        forward.append(_slowest(middle - start, dy.device))
        backward.append(_slowest(end - middle, dy.device))
    return statistics.median(forward), statistics.median(backward)


def measure_profile(mesh, shape, dtype=torch.float32, max_tokens: int = 8192) -> Profile:
    """Run every measurement (collective: every rank calls it) and return the profile. Kernel
    sizes go up to sequences of `max_tokens`; beyond, the rates are extrapolated as constant."""
    device, P = mesh.device, mesh.sp
    groups = [mesh.sp_group] if P > 1 else []
    for u in range(2, P // 2 + 1):
        if P % u == 0 and P // u >= 2:
            inner, outer = mesh.sp_group.factor(u)
            for g in (inner, outer):  # one group per size: fits are keyed by size
                if g.size not in {h.size for h in groups}:
                    groups.append(g)
    forward, backward = _attention(shape, P, dtype, device, True, max_tokens)
    forward_full, backward_full = _attention(shape, P, dtype, device, False, max_tokens)
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
        },
        matmul=Curve(_matmuls(shape, P, dtype, device, max_tokens)),
        attention_forward=Curve(forward),
        attention_backward=Curve(backward),
        elementwise=_elementwise(dtype, device),
        collectives=_collectives(groups, dtype, device) if groups else {},
        reduce_scatter_copy="gloo" in mesh.backend,
        attention_forward_full=Curve(forward_full),
        attention_backward_full=Curve(backward_full),
        overlap=_overlap(mesh.sp_group, dtype, device) if P > 1 else 1.0,
    )
    _calibration(mesh, shape, dtype, profile, max_tokens)
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
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
