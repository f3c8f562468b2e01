"""How fast `planners.choose()` is, and how much the exact optimum gains over the paradyse
heuristic, on realistic instances: 80 layers x 18 options.

    python benchmarks/planner_speed.py [--batches 300] [--seed 0] [--hardware a100-80g-nvlink]

Instances: a LLaMA-70B-shaped model with all 80 layers on sp=8 (6 strategies, usp in both 2x4
and 4x2, x 3 recompute modes = 18 options), dp=8 with AdamW state sharded over dp, bf16, the
preset's memory less 512 MiB; micro-batches packed up to 32K tokens from GitHubCode-shaped
lengths (longer sequences alone) and single GRCh38-shaped sequences. Then the same model with
every other layer's MLP half as wide (two groups of layers). Times are of one call per instance
(after a warm-up, garbage collector off as in timeit); nothing is asserted.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import numpy as np

from cost_models import get_preset, static_memory
from paradyse.lengths import sample_lengths
from planners import InfeasibleError, PlanningSetup, choose, plan_time
from planners.models import get_model
from planners.problem import as_problem

TOKENS_PER_BATCH = 32768


def micro_batches(count: int, seed: int) -> list[list[int]]:
    """Half packed GitHubCode-shaped batches, half single GRCh38-shaped sequences."""
    batches, current = [], []
    for n in sample_lengths("githubcode", 8 * count, seed):
        if current and sum(current) + n > TOKENS_PER_BATCH:
            batches.append(current)
            current = []
        current.append(n)
        if len(batches) == count // 2:
            break
    singles = sample_lengths("grch38", count - len(batches), seed)
    return batches + [[n] for n in singles]


def instances(hardware, batches, heterogeneous: bool):
    """(time, mem, transient, budget) per batch, for the 80-layer model."""
    full = get_model("llama-70b", layers=80)
    groups = [PlanningSetup(full, hardware, 8, 8, "bfloat16", shard_optimizer=True)]
    static = groups[0].static.total
    if heterogeneous:
        half = get_model("llama-70b", layers=40, ffn_hidden=full.ffn_hidden // 2)
        groups = [PlanningSetup(get_model("llama-70b", layers=40), hardware, 8, 8, "bfloat16",
                                shard_optimizer=True),
                  PlanningSetup(half, hardware, 8, 8, "bfloat16",
                                shard_optimizer=True)]  # fmt: skip
        # the embedding and LM head once: the second group's layers without a vocabulary
        layers_only = static_memory(half, 40, 0, sp=8, dp=8, dtype="bfloat16",
                                    shard_optimizer=True)  # fmt: skip
        static = groups[0].static.total + layers_only.total
    budget = hardware.memory_bytes - 2**29 - static
    out = []
    for lens in batches:
        tables = [g.costs.tables(lens) for g in groups]
        stack = [np.empty((80, tables[0].time.shape[1])) for _ in range(3)]
        for g, t in enumerate(tables):  # alternate the groups' layers
            rows = slice(g, 80, len(tables))
            stack[0][rows], stack[1][rows], stack[2][rows] = t.time, t.saved, t.transient
        out.append((*stack, budget))
    return out


def timed_choose(instance, method: str):
    """(seconds, plan or None) of one call, with the garbage collector off as timeit has it (a
    full collection, about 0.1 s here, otherwise lands in whichever call it interrupts)."""
    gc.disable()
    try:
        start = time.perf_counter()
        try:
            plan = choose(*instance, method=method)
        except InfeasibleError:
            plan = None
        return time.perf_counter() - start, plan
    finally:
        gc.enable()


def summary(name: str, instances_) -> list[float]:
    timed_choose(instances_[0], "exact")  # warm-up
    exact_s, heuristic_s, ratios, rescued, infeasible, missed = [], [], [], 0, 0, 0
    for inst in instances_:
        te, pe = timed_choose(inst, "exact")
        th, ph = timed_choose(inst, "paradyse")
        exact_s.append(te)
        heuristic_s.append(th)
        if pe is None:
            infeasible += 1
            missed += ph is not None  # would contradict optimality
            continue
        if ph is None:
            rescued += 1
            continue
        problem = as_problem(*inst)
        ratios.append(plan_time(problem, pe) / plan_time(problem, ph))

    def ms(values, q):
        return np.percentile(values, q) * 1e3

    print(f"\n{name}: {len(instances_)} instances of 80 layers x {inst[0].shape[1]} options")
    print(f"  {'method':<9} {'median ms':>10} {'p90 ms':>8} {'max ms':>8}")
    for label, values in (("exact", exact_s), ("paradyse", heuristic_s)):
        print(
            f"  {label:<9} {ms(values, 50):>10.3f} {ms(values, 90):>8.3f} {ms(values, 100):>8.3f}"
        )
    r = np.array(ratios)
    print(
        f"  exact / paradyse predicted time over {r.size} instances both solve: min {r.min():.4f}"
        f", p10 {np.percentile(r, 10):.4f}, median {np.median(r):.4f}, max {r.max():.4f}; "
        f"better on {int((r < 1 - 1e-12).sum())}, worse on {int((r > 1 + 1e-12).sum())}"
    )
    print(
        f"  paradyse found no plan where exact did: {rescued}; neither: {infeasible - missed}; "
        f"exact none where paradyse did: {missed}"
    )
    return exact_s


def cached_plan_us(hardware, batch) -> float:
    whatif = PlanningSetup(
        get_model("llama-70b", layers=80), hardware, 8, 8, "bfloat16", shard_optimizer=True
    )
    planner = whatif.planner(hysteresis=0.0)
    planner.plan(batch)
    planner.plan(batch)
    samples = []
    for _ in range(2000):
        start = time.perf_counter()
        planner.plan(batch)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/planner_speed.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--batches", type=int, default=300, help="micro-batches per instance set")
    p.add_argument("--seed", type=int, default=0, help="seed of the length samples")
    p.add_argument("--hardware", default="a100-80g-nvlink", help="hardware preset")
    args = p.parse_args(argv)
    try:
        hardware = get_preset(args.hardware)
        if args.batches < 2:
            raise ValueError(f"--batches must be at least 2, got {args.batches}")
    except ValueError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    batches = micro_batches(args.batches, args.seed)
    uniform = summary("identical layers", instances(hardware, batches, False))
    mixed = summary("two kinds of layers, alternating", instances(hardware, batches, True))
    cached = cached_plan_us(hardware, batches[0])
    print(f"\ncached plan (Planner.plan on a batch seen before): median {cached:.1f} us")
    print(
        f"choose(exact) median {statistics.median(uniform) * 1e3:.2f} ms (identical layers), "
        f"{statistics.median(mixed) * 1e3:.2f} ms (two kinds); cached plan {cached:.1f} us"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
