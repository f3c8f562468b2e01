"""The paper's evaluation in simulation: every static strategy, the paradyse heuristic and the
exact planner on the cost model with datasheet rates, no GPU needed.

    python benchmarks/simulate_paradyse.py [--mode project|paper] [--sequences 2000] [--seed 0]

`--mode paper` runs the paper's own definitions (`benchmarks/simulate_paper.py`): its strategy
set and baselines, sorted data, a longest-length table with memory breakdowns, Table-5 savings.
`--mode project` (the default) is this project's what-if, below.

Setting (as the paper): one node of 8 x A100-80GB NVLink, bf16, a batch of one sequence per
step, the paper's 512 MB safety margin (as 512 MiB); BERT-large-, LLaMA-70B- (8 of 80 layers) and
GPT-3-175B-shaped (8 of 96 layers) models in our layer; length distributions shaped like
GitHubCode and GRCh38 (`paradyse.lengths`). Per method: the longest trainable sequence, the
predicted time over the data set and the sequences that do not fit; then the same on 64 GPUs
(8 nodes, dp x sp, the inter-node link for groups that span nodes). Static strategies pick
their fastest uniform recompute mode per sequence (a generous baseline). Lengths are rounded up
to 32 steps per octave (<= 3.1%) so that the cost tables are shared; every method sees the same.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

if not __package__:  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import simulate_paper  # noqa: E402
from benchmarks.simulate_paper import SAFETY_MARGIN, bucket  # noqa: E402
from cost_models import get_preset  # noqa: E402
from paradyse.lengths import LENGTH_DISTRIBUTIONS, sample_lengths  # noqa: E402
from planners import InfeasibleError, PlanningSetup, format_bytes  # noqa: E402
from planners.explain import baseline_methods  # noqa: E402
from planners.models import MODEL_PRESETS  # noqa: E402

MODELS = ("bert-large", "llama-70b", "gpt3-175b")
DATASETS = ("githubcode", "grch38")
PAPER = {
    ("gpt3-175b", "grch38"): "paper: longest 329,728 tokens (112,128 without METP), +181.22%",
    ("gpt3-175b", "githubcode"): "paper: +144.16% longer trainable sequences than static",
    ("bert-large", "githubcode"): "paper: up to 89.29% less training time than static",
}


@dataclass
class Outcome:
    method: str
    longest: int
    seconds: float
    """Predicted time of the sequences that fit."""
    unfit: int
    times: list[float | None]
    """Per sequence (None: does not fit)."""


def simulate(whatif: PlanningSetup, method, lengths: list[int]) -> Outcome:
    planner = whatif.planner(method, hysteresis=0.0)  # each plan on its own merits
    times: list[float | None] = []
    for n in lengths:
        try:
            times.append(planner.plan([bucket(n, 2 * whatif.sp)]).predicted_s)
        except InfeasibleError:
            times.append(None)
    fitted = [t for t in times if t is not None]
    return Outcome(
        str(method), planner.longest_fitting(), sum(fitted), len(times) - len(fitted), times
    )


def common_time(outcome: Outcome, common: list[int]) -> float:
    return sum(outcome.times[i] for i in common)


def table(
    outcomes: list[Outcome], steps: list[list[int]] | None, extra_s: float = 0.0
) -> tuple[str, dict[str, float]]:
    """Rows per method; time over the sequences every method fits, as a ratio to exact. Also
    returns those times by method."""
    n = len(outcomes[0].times)
    common = [i for i in range(n) if all(o.times[i] is not None for o in outcomes)]

    def total(o: Outcome) -> float:
        if steps is None:
            return common_time(o, common)
        keep = set(common)  # data-parallel steps: the slowest replica, plus the dp reduction
        return sum(
            max((o.times[i] for i in step if i in keep), default=0.0) + extra_s for step in steps
        )

    totals = {o.method: total(o) for o in outcomes}
    lines = [
        f"  {'method':<16} {'longest':>9} {'unfit':>6} {'h (own fit)':>12} "
        f"{'h (common)':>11} {'x exact':>8} {'exact saves':>11}"
    ]
    for o in outcomes:
        t, te = totals[o.method], totals["exact"]
        ratio, saves = (f"{t / te:>8.2f}", f"{1 - te / t:>10.1%}") if te > 0 else ("n/a",) * 2
        lines.append(
            f"  {o.method:<16} {o.longest:>9,} {o.unfit:>6} {o.seconds / 3600:>12.2f} "
            f"{t / 3600:>11.2f} {ratio:>8} {saves:>11}"
        )
    lines.append(f"  ({len(common)} of {n} sequences fit every method: the 'common' column)")
    return "\n".join(lines), totals


def run_setting(hardware, model, dataset, lengths, sp, dp, label) -> tuple[str, dict, list]:
    spec = MODEL_PRESETS[model]
    budget = hardware.memory_bytes - SAFETY_MARGIN
    whatif = PlanningSetup(spec, hardware, sp, dp, "bfloat16", budget, shard_optimizer=dp > 1)
    methods = baseline_methods(whatif.costs.options)
    outcomes = [simulate(whatif, m, lengths) for m in methods]
    no_metp = [s for s in dict.fromkeys(o.strategy for o in whatif.costs.options) if s != "metp"]
    lean = PlanningSetup(spec, hardware, sp, dp, "bfloat16", budget, strategies=no_metp,
                         shard_optimizer=dp > 1)  # fmt: skip
    without = lean.planner("exact").longest_fitting()
    steps, extra = None, 0.0
    if dp > 1:
        steps = [list(range(i, min(i + dp, len(lengths)))) for i in range(0, len(lengths), dp)]
        gradient = whatif.static.gradients  # this rank's gradient shard, reduced over dp
        link = hardware.link(dp * sp, nodes_spanned=max(whatif.nodes_spanned, 2))
        extra = 2 * (dp - 1) / dp * gradient / link.bandwidth + 2 * (dp - 1) * link.latency
        extra += hardware.collective_latency  # one all-reduce call
    static = whatif.static.total
    head = (
        f"{label}: {spec.name} on {dataset}, sp={sp} x dp={dp} ({whatif.nodes_spanned} node(s) "
        f"per group), static {format_bytes(static)} of {format_bytes(budget)} per rank; "
        f"longest without METP (exact): {without:,}"
    )
    text, totals = table(outcomes, steps, extra)
    return head + "\n" + text, totals, outcomes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/simulate_paradyse.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--mode", choices=("project", "paper"), default="project",
                   help="project: this project's what-if (default); paper: the paper's own "
                        "definitions (its models; --models and --no-cluster are "
                        "project mode's)")  # fmt: skip
    p.add_argument("--sequences", type=int, default=2000, help="sequences per data set")
    p.add_argument("--seed", type=int, default=0, help="seed of the length samples")
    p.add_argument("--hardware", default="a100-80g-nvlink", help="hardware preset")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated model presets")
    p.add_argument("--no-cluster", action="store_true", help="skip the 64-GPU part")
    args = p.parse_args(argv)
    try:
        hardware = get_preset(args.hardware)
        models = args.models.split(",")
        for m in models:
            if m not in MODEL_PRESETS:
                raise ValueError(f"unknown model {m!r}; presets: {', '.join(MODEL_PRESETS)}")
        if args.sequences < 1:
            raise ValueError(f"--sequences must be positive, got {args.sequences}")
    except ValueError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    if args.mode == "paper":
        lines = simulate_paper.run(args.hardware, args.sequences, args.seed)
        print("\n".join(lines[:-1]))
        print(f"{time.perf_counter() - start:.0f} s")
        print(lines[-1])
        return 0
    headline = []
    for dataset in DATASETS:
        lengths = sample_lengths(dataset, args.sequences, args.seed)
        print(f"\n== {dataset}: {LENGTH_DISTRIBUTIONS[dataset].source}; {len(lengths)} sequences")
        for model in models:
            text, totals, outcomes = run_setting(hardware, model, dataset, lengths, 8, 1, "8 GPUs")
            print(text)
            if (model, dataset) in PAPER:
                print(f"  {PAPER[(model, dataset)]}")
            statics = [t for m, t in totals.items() if m.startswith("static:")]
            longest = {o.method: o.longest for o in outcomes}
            if min(statics) <= 0 or longest["static:tp_sp"] <= 0:
                headline.append(f"{model}/{dataset}: no sequence fits every method")
                continue
            headline.append(
                f"{model}/{dataset}: exact saves {1 - totals['exact'] / min(statics):.1%} vs the "
                f"best static, {1 - totals['exact'] / max(statics):.1%} vs the worst, "
                f"{1 - totals['exact'] / totals['paradyse']:.2%} vs paradyse; longest "
                f"{longest['exact'] / longest['static:tp_sp']:.2f}x Megatron tp_sp's"
            )
            if args.no_cluster:
                continue
            spec = MODEL_PRESETS[model]
            sizes = [s for s in (8, 16, 32, 64) if not (spec.heads % s or spec.kv_heads % s
                                                       or spec.ffn_hidden % s)]  # fmt: skip
            for sp in sizes[-1:] if sizes[-1] != 8 else []:
                text = run_setting(hardware, model, dataset, lengths, sp, 64 // sp, "64 GPUs")[0]
                print(text)
            text = run_setting(hardware, model, dataset, lengths, 8, 8, "64 GPUs")[0]
            print(text)
    print(f"\n{time.perf_counter() - start:.0f} s; on 8 GPUs:")
    print("\n".join(headline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
