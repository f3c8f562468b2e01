"""Timing on the target machine, for the profiler (`cost_models.profile`) and the start-up check
(`cost_models.profile_check`): one of the measuring modules of `cost_models` that import torch
and `parallel_lib`.

Every rank times at once and a time is the slowest rank's (`timed`), so every rank sees the same
numbers and makes the same decisions (how many repeats, when a coefficient has settled): the
collectives inside the timed calls stay matched. A coefficient is measured in rounds until its
spread is under the target (`cost_models.stability.settle`); its value is the median.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from statistics import median

import torch
import torch.distributed as dist

from parallel_lib import (
    RingExchange,
    all_gather_dim0,
    all_reduce_,
    all_to_all,
    count_bytes,
    reduce_scatter_dim0,
)

from .profile_data import SPREAD_TARGET, LinkFit
from .stability import abs_spread, link_from, settle, spread

__all__ = [
    "SAMPLE_SECONDS", "synchronize", "timed", "Sampler", "settled_time", "collective_ops",
    "tiny_rows", "measure_link", "measure_elementwise", "measure_overlap",
]  # fmt: skip

SAMPLE_SECONDS = 0.01
"""Each sample repeats its call until it has run about this long."""
POINT_BUDGET_S = 1.0
"""A point stops adding samples (past the minimum) once its samples took this long."""


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so a clock read times work, not launches."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def slowest(seconds: float, device: torch.device) -> float:
    """The largest of every rank's `seconds` (every rank gets it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def timed(fn: Callable[[], object], device: torch.device, repeats: int | None = None,
          min_seconds: float = 0.02, warmup: bool = True) -> float:  # fmt: skip
    """Mean seconds per call of fn on the slowest rank over back-to-back calls (a count every
    rank agrees on, so collectives inside fn stay matched), after a warm-up. The mean, not a
    best case: a training step sees the average contention of ranks sharing a machine."""
    if warmup:
        fn()
    if repeats is None:
        repeats = Sampler(fn, device, min_seconds, warmup=False).repeats
    if dist.is_initialized():
        dist.barrier()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return slowest((time.perf_counter() - start) / repeats, device)


class Sampler:
    """One operation warmed up, with its repeats per sample fixed (from one timed call, the
    slowest rank's, so all ranks agree); calling it gives one sample, seconds per call."""

    def __init__(self, fn: Callable[[], object], device: torch.device,
                 sample_seconds: float = SAMPLE_SECONDS, warmup: bool = True) -> None:  # fmt: skip
        self.fn, self.device = fn, device
        if warmup:
            fn()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        self.once = slowest(time.perf_counter() - start, device)
        self.repeats = max(1, min(100, int(sample_seconds / max(self.once, 1e-6)) + 1))

    def __call__(self) -> float:
        return timed(self.fn, self.device, self.repeats, warmup=False)

    @property
    def cost(self) -> float:
        """About how long one sample takes."""
        return self.once * self.repeats


def max_rounds(samplers: list[Sampler], cap: int, budget_s: float = POINT_BUDGET_S) -> int:
    """Rounds of one sample of each of `samplers`: at most `cap`, fewer where a round takes
    long (past the third, about `budget_s` in all)."""
    return max(3, min(cap, int(budget_s / max(sum(s.cost for s in samplers), 1e-9))))


def settled_time(fn: Callable[[], object], device: torch.device, *, cap: int = 9,
                 target: float = SPREAD_TARGET) -> tuple[float, float]:  # fmt: skip
    """(median seconds per call, spread) of `fn` sampled until its spread is under `target` or
    `cap` samples (fewer for long calls: about POINT_BUDGET_S of samples past the third)."""
    sample = Sampler(fn, device)
    rounds = max_rounds([sample], cap)
    values = settle(lambda: {"t": sample()}, target=target, max_rounds=rounds)["t"]
    return median(values), spread(values)


def _exchange(group, x):
    ring = RingExchange(group)
    ring.start(x)
    return ring.wait()


def collective_ops() -> dict[str, Callable]:
    """kind -> op(group, x) for every collective the strategies use."""
    return {
        "all_gather": lambda g, x: all_gather_dim0(x, g),
        "reduce_scatter": lambda g, x: reduce_scatter_dim0(x, g),
        "all_to_all": lambda g, x: all_to_all(x, g, scatter_dim=0, gather_dim=1),
        "all_reduce": lambda g, x: all_reduce_(x, g),
        "p2p": _exchange,
    }


def tiny_rows(P: int, elements: int, columns: int = 256) -> int:
    """Rows of a (rows, columns) message of about `elements` that every kind can split over P."""
    return max(P, elements // columns // P * P)


def measure_link(op: Callable, group, sizes: list[int], dtype, device, *, cap: int = 9,
                 target: float = SPREAD_TARGET) -> tuple[LinkFit, dict[str, float]]:  # fmt: skip
    """alpha and beta of one collective on `group`: alpha measured directly, the median time of
    a tiny message (one element per rank), beta from the messages of `sizes` elements
    (`link_from`), in rounds of every size until both settle. Returns the fit and the spreads
    of its alpha and beta over the rounds."""
    P = group.size
    tiny = Sampler(partial(op, group, torch.randn(P, 1, dtype=dtype, device=device)), device)
    points = []
    for elements in sizes:
        x = torch.randn(tiny_rows(P, elements), 256, dtype=dtype, device=device)
        with count_bytes(group) as sent:
            op(group, x)
        points.append((float(sent.total), Sampler(partial(op, group, x), device)))
    return _settled_link(tiny, points, cap, target)


def _settled_link(tiny: Sampler, points: list[tuple[float, Sampler]], cap: int,
                  target: float) -> tuple[LinkFit, dict[str, float]]:  # fmt: skip
    times: list[list[float]] = [[] for _ in points]

    def one_round() -> dict[str, float]:
        alpha = tiny()
        for i, (_, sample) in enumerate(points):
            times[i].append(sample())
        return {
            "alpha": alpha,
            "beta": link_from(
                alpha, [(b, t[-1]) for (b, _), t in zip(points, times, strict=True)]
            ).beta,
        }

    samplers = [tiny, *(s for _, s in points)]
    rounds = max_rounds(samplers, cap, budget_s=POINT_BUDGET_S * len(samplers))
    history = settle(one_round, target=target, max_rounds=rounds)
    medians = [(b, median(t)) for (b, _), t in zip(points, times, strict=True)]
    fit = link_from(median(history["alpha"]), medians)
    return fit, {"alpha": spread(history["alpha"]), "beta": spread(history["beta"])}


def measure_elementwise(dtype, device, *, cap: int = 9, target: float = SPREAD_TARGET):
    """Memory-bound ops (a + b): alpha from a tiny add, beta from adds of 64K to 4M elements,
    as `measure_link`. Returns the fit and the spreads of alpha and beta."""

    def add(n: int) -> Callable[[], object]:
        a, b = (
            torch.randn(n, dtype=dtype, device=device),
            torch.randn(n, dtype=dtype, device=device),
        )
        return lambda: a + b

    itemsize = torch.empty(0, dtype=dtype).element_size()
    tiny = Sampler(add(16), device)
    points = [(3.0 * n * itemsize, Sampler(add(n), device)) for n in (1 << 16, 1 << 19, 1 << 22)]
    return _settled_link(tiny, points, cap, target)


def measure_overlap(group, dtype, device, *, cap: int = 7,
                    target: float = SPREAD_TARGET) -> tuple[float, float]:  # fmt: skip
    """Fraction of the shorter of a matmul and a ring exchange hidden when both run at once,
    in rounds (each times the three alone and together) until its absolute spread is under
    `target`; (median, spread)."""
    a = torch.randn(512, 512, dtype=dtype, device=device)
    payload = torch.randn(1 << 20, dtype=dtype, device=device)

    def both():
        ring = RingExchange(group)
        ring.start(payload)
        for _ in range(4):
            a @ a
        return ring.wait()

    # long samples: the fraction is a small difference of large times
    compute, comm, together = (
        Sampler(fn, device, sample_seconds=0.08)
        for fn in (lambda: [a @ a for _ in range(4)], partial(_exchange, group, payload), both)
    )

    def one_round() -> dict[str, float]:
        c, m, t = compute(), comm(), together()
        return {"overlap": min(max((c + m - t) / min(c, m), 0.0), 1.0)}

    values = settle(one_round, target=target, max_rounds=cap, spread_of=abs_spread)["overlap"]
    return median(values), abs_spread(values)
