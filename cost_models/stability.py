"""How far a profile's coefficients can be trusted (pure Python; the measuring that uses it is in
`cost_models.timing`, `cost_models.profile` and `cost_models.profile_check`).

- **Spread.** A coefficient is measured in rounds until its spread, the relative interquartile
  range of the rounds' values (IQR / median), is under a target, or a cap of rounds is reached
  (`settle`). The value is the median of the rounds. A profile records each coefficient's spread
  and names those above the target (`unsettled`).
- **Conditions.** What the machine was doing while a profile was measured: load averages before
  and after, the cores other processes used meanwhile (Linux `/proc/stat`), threads, CPU count,
  host, time (`conditions_now`, `conditions_record`). `busy_reasons` says why a profile was
  measured on a busy machine.
- **The start-up check's verdict.** `drifted` compares a few coefficients re-measured at start-up
  with a cached profile's predictions; `drift_warning` is its one line.
"""

from __future__ import annotations

import math
import os
import socket
import statistics
import time
from collections.abc import Callable, Iterable, Sequence

from .profile_data import SPREAD_TARGET, LinkFit, ProfileError

__all__ = [
    "SPREAD_TARGET", "CHECK_THRESHOLD", "spread", "abs_spread", "settle", "link_from",
    "unsettled", "ranks_here", "usable_cpus", "conditions_now", "conditions_record",
    "load_allowance", "busy_reasons",
    "profile_warnings", "drifted", "drift_warning",
]  # fmt: skip

CHECK_THRESHOLD = 1.5
"""The start-up check warns where measured / profiled is beyond this factor either way."""
LOAD_SLACK = 0.5
"""Outside load (load average, cores used by other processes) tolerated above the cores the
ranks leave free."""


# ------------------------------------------------------------------ spread and stopping
def spread(values: Sequence[float]) -> float:
    """Relative interquartile range, (q3 - q1) / median (inclusive quartiles; with three values
    half their range); 0 for fewer than two values, 99 (9,900%) for a median of 0 with any
    range (a finite number, so the profile stays plain JSON)."""
    if len(values) < 2:
        return 0.0
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    if q3 == q1:
        return 0.0
    return min((q3 - q1) / abs(q2), 99.0) if q2 else 99.0


def abs_spread(values: Sequence[float]) -> float:
    """The interquartile range itself: the spread of a fraction (the overlap), where a median
    near 0 would make a relative spread meaningless."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


def settle(
    round_fn: Callable[[], dict[str, float]],
    *,
    target: float = SPREAD_TARGET,
    min_rounds: int = 3,
    max_rounds: int = 9,
    spread_of: Callable[[Sequence[float]], float] = spread,
) -> dict[str, list[float]]:
    """Each quantity's values over rounds of `round_fn` (a dict of quantities per round), run
    until every quantity's spread is at most `target` after at least `min_rounds`, or until
    `max_rounds`. Deterministic in the values: ranks that see the same values (times reduced to
    the slowest rank's) stop after the same round, so collectives inside `round_fn` stay
    matched."""
    history: dict[str, list[float]] = {}
    for done in range(1, max(max_rounds, 1) + 1):
        for name, value in round_fn().items():
            history.setdefault(name, []).append(float(value))
        if done >= min_rounds and all(spread_of(v) <= target for v in history.values()):
            break
    return history


def link_from(alpha: float, samples: Iterable[tuple[float, float]]) -> LinkFit:
    """time = alpha + bytes / beta with alpha measured directly (small messages): beta is the
    median of bytes / (time - alpha) over the sizes whose transfer took at least a quarter of
    their time (a trimmed fit: a size dominated by its latency says nothing about the link).
    Where none did, the largest message's bytes / time: never a link faster than measured."""
    samples = [(b, t) for b, t in samples if t > 0 and b > 0]
    if not samples:
        raise ProfileError("a link fit needs at least one positive time")
    alpha = max(alpha, 0.0)
    rates = [b / (t - alpha) for b, t in samples if t - alpha >= 0.25 * t]
    if rates:
        return LinkFit(alpha=alpha, beta=statistics.median(rates))
    largest, largest_t = max(samples)
    return LinkFit(alpha=alpha, beta=largest / largest_t)


def unsettled(spreads: dict[str, float], target: float = SPREAD_TARGET) -> list[str]:
    """The coefficients whose spread is above the target, worst first."""
    return sorted((n for n, s in spreads.items() if s > target), key=lambda n: -spreads[n])


# ------------------------------------------------------------------ conditions
def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _busy_cpu_seconds() -> float | None:
    """Seconds every core of the machine spent busy since boot (Linux `/proc/stat`; steal time
    counts: another guest had the core), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / tick


def ranks_here(default: int) -> int:
    """The ranks on this host: torchrun's LOCAL_WORLD_SIZE, else `default` (every rank here)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "") or default)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def conditions_now() -> dict:
    """A snapshot to take before a measurement: wall time, load average, busy CPU seconds."""
    return {"time": time.time(), "load": _load(), "busy_cpu_s": _busy_cpu_seconds()}


def conditions_record(before: dict, after: dict, *, own_cpu_s: float | None, ranks: int,
                      ranks_here: int, threads: int, torch_version: str) -> dict:  # fmt: skip
    """What a profile records of the conditions it was measured under. `own_cpu_s`: CPU
    seconds this host's ranks used between the snapshots, so that `other_cpu` is the average
    number of cores other processes kept busy meanwhile (None where it cannot be told)."""
    wall = max(after["time"] - before["time"], 1e-9)
    other = None
    if None not in (before["busy_cpu_s"], after["busy_cpu_s"], own_cpu_s):
        other = round(max(after["busy_cpu_s"] - before["busy_cpu_s"] - own_cpu_s, 0.0) / wall, 2)
    return {
        "hostname": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(before["time"])),
        "seconds": round(wall, 1),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "ranks": ranks,
        "ranks_here": ranks_here,
        "torch_threads": threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch_version,
        "load_before": before["load"],
        "load_after": after["load"],
        "other_cpu": other,
    }


def load_allowance(cpus: int, ranks_here: int) -> float:
    """Outside load a measurement tolerates: the cores its ranks leave free, plus LOAD_SLACK."""
    return max(cpus - ranks_here, 0) + LOAD_SLACK


def busy_reasons(conditions: dict, spreads: dict[str, float] | None = None,
                 target: float = SPREAD_TARGET) -> list[str]:  # fmt: skip
    """Why the machine counts as busy for these conditions (empty: quiet): the 1-minute load
    average before the run, or the cores other processes used during it, above the cores the
    ranks leave free (+ LOAD_SLACK); or a median spread over the coefficients above the target."""
    cpus = conditions.get("cpus_usable") or conditions.get("cpu_count") or 1
    allowance = load_allowance(cpus, conditions.get("ranks_here") or 1)
    reasons = []
    load = conditions.get("load_before")
    if load and load[0] > allowance:
        reasons.append(f"load average {load[0]:.2f} before the run")
    other = conditions.get("other_cpu")
    if other is not None and other > allowance:
        reasons.append(f"other processes kept {other:.2f} cores busy during it")
    if spreads:
        middle = statistics.median(spreads.values())
        if middle > target:
            reasons.append(f"median spread {middle:.0%} over the coefficients")
    return reasons


def profile_warnings(profile, where: str = "the profile") -> list[str]:
    """One line per problem of a freshly measured profile: a busy machine, and the coefficients
    it could not pin down. Empty for a profile without recorded conditions (an older one)."""
    lines = []
    conditions, spreads = profile.conditions, profile.spread
    reasons = busy_reasons(conditions, spreads, profile.spread_target) if conditions else []
    if reasons:
        cpus = conditions.get("cpus_usable") or conditions.get("cpu_count")
        lines.append(
            f"warning: the machine was busy while measuring {where} ({'; '.join(reasons)}; "
            f"{cpus} cores, {conditions.get('ranks_here')} ranks here): its coefficients may "
            "not hold; measure again on a quiet machine"
        )
    loose = unsettled(spreads, profile.spread_target)
    if loose:
        named = ", ".join(f"{n} {spreads[n]:.0%}" for n in loose)
        lines.append(
            f"warning: {where}: {len(loose)} of {len(spreads)} coefficients not pinned down "
            f"(spread above {profile.spread_target:.0%}): {named}"
        )
    return lines


# ------------------------------------------------------------------ the start-up check
def drifted(ratios: dict[str, float], threshold: float = CHECK_THRESHOLD) -> dict[str, float]:
    """The ratios (measured / profiled) beyond `threshold` either way, largest drift first."""
    far = {n: r for n, r in ratios.items() if not (1 / threshold <= r <= threshold)}
    return dict(sorted(far.items(), key=lambda kv: -abs(math.log(kv[1]))))


def drift_warning(far: dict[str, float], *, path: str, threshold: float, remeasure: str,
                  load: list[float] | None = None, cpus: int | None = None) -> str:  # fmt: skip
    """The one line of a failed start-up check: the coefficients, their ratios, the load now
    and how to measure the profile again."""
    named = ", ".join(f"{n} {r:.2f}x" for n, r in far.items())
    now = f"; load average now {load[0]:.2f} on {cpus} cores" if load else ""
    return (
        f"warning: the cost-model profile {path} no longer predicts this machine (measured / "
        f"profiled: {named}; threshold {threshold:g}x{now}); re-measure it: {remeasure}"
    )
