"""Does this machine hold its own speed? One fixed matmul, timed over minutes in one process.

    OMP_NUM_THREADS=1 python benchmarks/machine_drift.py [--minutes 3] [--every 2] [--size 1024]

It times a burst of nine (size x 256) @ (256 x 704) float32 matmuls (the MLP up-projection of
`cpu_tiny`) on one thread and keeps the burst's median, then sleeps `--every` seconds, and so on;
beside each burst the steal time of the interval as a share of the machine's cores (Linux
`/proc/stat`: time the hypervisor gave this machine's cores to another guest) and the load
average. Nothing else of ParaDySe runs.

The last lines compare two kinds of variation:
- within a burst: the median relative interquartile range of the nine samples (what a profile's
  spread sees);
- between bursts: the slowest burst over the fastest, and the burst medians' relative
  interquartile range (what two profiles minutes apart see).

Where the second is far above the first and above 10%, the machine's speed drifts between
minutes while each minute looks steady, and no profile measured on it repeats within 10%,
however long it measures: a cached profile has to be checked against the machine at start-up
(`cost_models.profile_check`), which is what ParaDySe does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

if not __package__:  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cost_models.stability import spread  # noqa: E402

BURST = 9


def steal_seconds() -> float | None:
    """Steal time of all cores since boot (Linux), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def burst(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Nine timed matmuls after one untimed."""
    torch.mm(a, b)
    times = []
    for _ in range(BURST):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--every", type=float, default=2.0, help="seconds between bursts")
    p.add_argument("--size", type=int, default=1024, help="rows of the matmul (tokens)")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.every <= 0 or args.size < 1:
        p.error("--minutes, --every and --size must be positive")
    torch.set_num_threads(1)
    a, b = torch.randn(args.size, 256), torch.randn(256, 704)
    end = time.time() + args.minutes * 60
    medians, spreads = [], []
    print(f"{'time':>8} {'median ms':>9} {'spread':>6} {'steal':>7} {'load':>5}", flush=True)
    steal, tick = steal_seconds(), time.time()
    while time.time() < end:
        times = burst(a, b)
        medians.append(statistics.median(times))
        spreads.append(spread(times))
        time.sleep(args.every)
        now_steal, now = steal_seconds(), time.time()
        cores = os.cpu_count() or 1
        stolen = "-" if steal is None else f"{(now_steal - steal) / (now - tick) / cores:.1%}"
        steal, tick = now_steal, now
        print(f"{time.strftime('%H:%M:%S'):>8} {medians[-1] * 1e3:>9.3f} {spreads[-1]:>6.1%} "
              f"{stolen:>7} {os.getloadavg()[0]:>5.2f}", flush=True)  # fmt: skip
    within, between = statistics.median(spreads), spread(medians)
    print(f"within a burst: median spread {within:.1%} over {len(spreads)} bursts")
    print(f"between bursts: spread {between:.1%}, slowest / fastest = "
          f"{max(medians) / min(medians):.2f}x")  # fmt: skip
    return {"medians": medians, "spreads": spreads, "within": within, "between": between}


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
