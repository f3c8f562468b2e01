"""The compute bound of `benchmarks/adaptive_vs_static.py --bound`: how fast could any plan, of
ParaDySe or anyone, train the mix on this machine?

Every micro-batch runs as one optimizer step of one process (rank 0, one thread, the plain
decoder of `benchmarks.peer_models`: one `scaled_dot_product_attention` call per run of
equal-length sequences, no recompute, no memory limit, no communication) while the other ranks
wait; the median of `repeats` steps, interleaved with nothing. That work spread perfectly over
the cores the ranks can use, min(usable CPUs, ranks here x their threads), with nothing added,
is the bound:

    bound seconds of a batch = one process's seconds / cores

A parallel plan does at least one process's arithmetic plus its collectives, copies and
gathers on those cores, so no plan's time is below the bound (up to the noise between passes,
and the few percent a smaller working set may gain in cache). `bound/best-static` is then the
most any plan could gain over the best static strategy on this mix: where it is under a target,
no planner reaches the target here.
"""

from __future__ import annotations

import statistics

import torch

from benchmarks.adaptive_report import short_name
from benchmarks.peer_models import SinglePeer, paradyse_weights, timed_step
from cost_models.stability import usable_cpus


def bound_cores(ranks_here: int) -> int:
    """The cores the ranks can keep busy: their threads, at most the usable CPUs."""
    return max(1, min(usable_cpus(), ranks_here * max(torch.get_num_threads(), 1)))


def measure_single(config, mesh, batches, repeats: int) -> list[float]:
    """Per micro-batch, the median of `repeats` one-process optimizer steps (rank 0, one
    thread; the other ranks wait; collective), after one untimed step on the first batch."""
    steps = repeats * len(batches) + 1
    peer = SinglePeer(config.model, paradyse_weights(config.model, config.train.seed),
                      config.optim, steps, None, rank=mesh.rank)  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timed_step(peer, batches[0], mesh)
        return [statistics.median(timed_step(peer, b, mesh)[0] for _ in range(repeats))
                for b in batches]  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def bound_report(single: list[float], cores: int, results, tokens: list[int],
                 lengths: list[int], summary: dict) -> list[str]:  # fmt: skip
    """Per sequence length (its batches: K sequences of L tokens, KxL), one process's time, the
    bound, the best static's and exact's; then `bound/best-static` and `exact/bound` over the
    batches each ran."""
    best = next(r for r in results if r.method == summary["best_static"])
    exact = next((r for r in results if r.method == "exact"), None)
    name = short_name(best.method)
    width = max(9, len(name))
    lines = ["", f"bound: one process's step (one thread, no communication) / {cores} cores, "
             "ms per length (sums over its batches)",
             f"{'batch':>6} {'batches':>7} {'one proc':>9} {'bound':>7} "
             f"{name:>{width}} {'exact':>7} {'static/bound':>12}"]  # fmt: skip
    for n in sorted(set(lengths)):
        at = [i for i, m in enumerate(lengths) if m == n]
        one = sum(single[i] for i in at)
        static = _total(best.seconds, at)
        done = _total(exact.seconds, at) if exact else None
        label = f"{tokens[at[0]] // n}x{n}"
        lines.append(
            f"{label:>6} {len(at):>7} {one * 1e3:>9.0f} {one / cores * 1e3:>7.0f} "
            f"{_ms(static):>{width}} {_ms(done):>7} {_ratio(static, one / cores):>12}"
        )

    def rate_of(seconds: list[float | None]) -> tuple[float, float]:
        """(the method's tokens/s, the bound's) over the batches the method ran."""
        ran = [i for i, s in enumerate(seconds) if s is not None]
        if not ran:
            return float("nan"), float("nan")
        size = sum(tokens[i] for i in ran)
        return size / sum(seconds[i] for i in ran), size / (sum(single[i] for i in ran) / cores)

    static_rate, bound_rate = rate_of(best.seconds)
    text = f"bound/best-static = {bound_rate / static_rate:.2f}x"
    if exact is not None:
        exact_rate, exact_bound = rate_of(exact.seconds)
        text += f"  exact/bound = {exact_rate / exact_bound:.2f}"
    lines.append(f"{text}  (bound {bound_rate:.0f} tokens/s; no plan on {cores} cores passes it)")
    return lines


def _total(seconds: list[float | None], at: list[int]) -> float | None:
    values = [seconds[i] for i in at]
    return None if None in values else sum(values)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}"


def _ratio(a: float | None, b: float) -> str:
    return "-" if a is None else f"{a / b:.2f}"
