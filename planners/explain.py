"""Print the plan, predicted time and memory for a machine, a model, a group size, a budget and a
micro-batch: the question to ask before renting a cluster.

    python -m planners.explain --hardware a100-80g-nvlink --model llama-70b --sp 8 \\
        --seq-lens 131072,4096 [--memory-budget 80GB] [--dtype bfloat16] [--method exact]

Datasheet rates of the hardware preset unless --profile gives measured ones. Besides the chosen
plan it prints every method side by side (the exact optimum, the paradyse heuristic, every
static strategy) and the longest single sequence that fits, with the loss's logits in chunks of
--logits-chunk tokens (the trainer's `train.logits_chunk`) and with the whole logits at once.
Exit 2 for bad arguments, 3 when no plan fits.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from cost_models import LOGITS_CHUNK, Profile, ProfileError, detect, get_preset

from .build import PlanningSetup
from .method import Method
from .models import MODEL_PRESETS, get_model
from .planner import Plan
from .problem import InfeasibleError
from .units import format_bytes, parse_bytes

__all__ = ["main", "baseline_methods", "report", "longest_line"]


def baseline_methods(options) -> list[Method]:
    """exact, paradyse, then static:NAME for every strategy among the options, and
    static:gN:NAME for those that also run on sub-groups of N."""
    whole = list(dict.fromkeys(o.strategy for o in options if o.group is None))
    grouped = dict.fromkeys(f"g{o.group}:{o.strategy}" for o in options
                            if o.group is not None and o.strategy in whole)  # fmt: skip
    return [Method("exact"), Method("paradyse")] + [Method("static", s) for s in (*whole, *grouped)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m planners.explain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--hardware", default=None,
        help="hardware preset (a100-80g-nvlink, h100-sxm, h200, cpu); default: this machine",
    )  # fmt: skip
    p.add_argument("--profile", default=None, help="measured cost profile (cost_models.profile)")
    p.add_argument(
        "--model", default="llama-70b",
        help=f"model preset ({', '.join(MODEL_PRESETS)}); the shape flags override its fields",
    )  # fmt: skip
    for flag, what in (("--hidden", "model width H"), ("--heads", "query heads"),
                       ("--kv-heads", "key/value heads"), ("--head-dim", "width of one head"),
                       ("--ffn", "SwiGLU width F"), ("--layers", "decoder layers"),
                       ("--vocab", "vocabulary size")):  # fmt: skip
        p.add_argument(flag, type=int, default=None, help=what)
    p.add_argument("--sp", type=int, default=None, help="switchable group size (default: a node)")
    p.add_argument(
        "--devices-per-node", type=int, default=None,
        help="ranks per node (default: the hardware's); sp groups wider than a node use the "
             "inter-node link",
    )  # fmt: skip
    p.add_argument("--dp", type=int, default=1, help="data-parallel copies of the group")
    p.add_argument(
        "--shard-optimizer", action="store_true", help="shard AdamW state over dp (ZeRO-1)"
    )
    p.add_argument(
        "--memory-budget", default=None, help="per-rank budget, e.g. 80GB (default: device memory)"
    )
    p.add_argument(
        "--seq-lens", required=True, help="the micro-batch's sequence lengths, e.g. 131072,4096"
    )
    p.add_argument(
        "--dtype", default=None, choices=["bfloat16", "float32"],
        help="compute dtype (default: the profile's, else bfloat16)",
    )  # fmt: skip
    p.add_argument("--method", default="exact", help="exact, paradyse or static:STRATEGY[+MODE]")
    p.add_argument("--strategies", default=None, help="comma-separated strategies to consider")
    p.add_argument(
        "--recompute", default=None, choices=["none", "selective", "full"],
        help="force one recompute mode (default: the planner decides)",
    )  # fmt: skip
    p.add_argument(
        "--logits-chunk", type=int, default=LOGITS_CHUNK,
        help=f"tokens per chunk of the loss's logits, as train.logits_chunk (default "
             f"{LOGITS_CHUNK}; 0: the whole logits at once)",
    )  # fmt: skip
    p.add_argument("--options", action="store_true", help="also print every option's layer cost")
    return p


def _setup(args) -> tuple[PlanningSetup, list[int]]:
    hardware = get_preset(args.hardware) if args.hardware else detect()
    profile = Profile.load(args.profile) if args.profile else None
    model = get_model(
        args.model, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
        head_dim=args.head_dim, ffn_hidden=args.ffn, layers=args.layers, vocab=args.vocab,
    )  # fmt: skip
    try:
        lens = [int(t) for t in args.seq_lens.split(",")]
    except ValueError:
        raise ValueError(
            f"--seq-lens takes comma-separated integers, got {args.seq_lens!r}"
        ) from None
    if min(lens) < 1:
        raise ValueError(f"--seq-lens must be positive, got {args.seq_lens}")
    for flag, value in (("--sp", args.sp), ("--dp", args.dp),
                        ("--devices-per-node", args.devices_per_node)):  # fmt: skip
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    if args.logits_chunk < 0:
        raise ValueError(f"--logits-chunk must be >= 0 (0: whole logits), got {args.logits_chunk}")
    budget = parse_bytes(args.memory_budget, "--memory-budget") if args.memory_budget else None
    sp = hardware.devices_per_node if args.sp is None else args.sp
    dtype = args.dtype or (profile.machine.get("dtype") if profile else None) or "bfloat16"
    setup = PlanningSetup(
        model, hardware, sp=sp, dp=args.dp, dtype=dtype, budget_bytes=budget, profile=profile,
        shard_optimizer=args.shard_optimizer, devices_per_node=args.devices_per_node,
        strategies=args.strategies.split(",") if args.strategies else None,
        recomputes=[args.recompute] if args.recompute else None,
        logits_chunk=args.logits_chunk,
    )  # fmt: skip
    return setup, lens


def _row(method: str, plan: Plan | None, reference: Plan | None, error=None) -> str:
    if plan is None:
        longest = f"; longest fitting {error.longest_fitting:,} tokens" if error else ""
        return (
            f"{method:<18} {'-':>10} {'-':>7} {format_bytes(error.leanest_bytes):>11}  "
            f"does not fit{longest}"
        )
    ratio = plan.predicted_s / reference.predicted_s if reference is not None else float("nan")
    return (
        f"{method:<18} {plan.predicted_s:>10.4f} {ratio:>7.2f} "
        f"{format_bytes(plan.predicted_peak_bytes):>11}  {plan}"
    )


def report(
    setup: PlanningSetup, lens: list[int], method: Method, show_options: bool = False
) -> int:
    """Print the report; the exit status (0, or 3 when `method` finds no plan)."""
    hw, model, static = setup.hardware, setup.model, setup.static
    print(
        f"{hw.name}: {hw.memory_bytes / 1e9:.1f} GB per device; sp={setup.sp} over "
        f"{setup.nodes_spanned} node(s), dp={setup.dp}, {setup.dtype}, "
        f"{'profiled' if setup.profile else 'datasheet'} rates"
    )
    print(f"model {model.describe()}")
    tables = setup.costs.tables(lens)
    chunk = setup.logits_chunk
    logits = f"in chunks of {chunk:,} tokens" if chunk else "whole"
    print(
        f"micro-batch: {len(lens)} sequence(s), {sum(lens):,} tokens "
        f"({sum(tables.signature):,} padded), longest {max(lens):,}; LM-head logits "
        f"{format_bytes(tables.head_bytes)} ({logits})"
    )
    print(
        f"memory per rank: budget {format_bytes(setup.budget)}; static "
        f"{format_bytes(setup.static_bytes)} (weights {format_bytes(static.weights)}, gradients "
        f"{format_bytes(static.gradients)}, optimizer {format_bytes(static.optimizer)}, "
        f"gathered vocabulary {format_bytes(setup.static_bytes - static.total)})"
    )
    if show_options:
        print(f"\n{'option':<20} {'ms/layer':>10} {'saved':>11} {'transient':>11}")
        for j, option in enumerate(setup.costs.options):
            print(
                f"{option.name:<20} {tables.time[0, j] * 1e3:>10.2f} "
                f"{format_bytes(tables.saved[0, j]):>11} {format_bytes(tables.transient[0, j]):>11}"
            )
    methods = [method] + [m for m in baseline_methods(setup.costs.options) if m != method]
    plans: dict[Method, Plan | None] = {}
    errors: dict[Method, InfeasibleError] = {}
    for m in methods:
        try:
            plans[m] = setup.planner(m, hysteresis=0.0).plan(lens)
        except InfeasibleError as e:
            plans[m], errors[m] = None, e
    chosen = plans[method]
    print()
    if chosen is None:
        print(f"no plan ({method}): {errors[method]}")
    else:
        print(f"plan ({method}): {chosen}")
        print(
            f"predicted: {chosen.predicted_s:.4f} s forward+backward of the layers, peak "
            f"{format_bytes(chosen.predicted_peak_bytes)} ({chosen.predicted_peak_bytes:,} bytes)"
            f" of {format_bytes(setup.budget)}"
        )
    reference = plans.get(Method("exact"))
    print(f"\n{'method':<18} {'time s':>10} {'x exact':>7} {'peak':>11}  plan")
    for m in methods:
        print(_row(str(m), plans[m], reference, errors.get(m)))
    print()
    print(longest_line(setup, method))
    return 0 if chosen is not None else 3


def longest_line(setup: PlanningSetup, method: Method) -> str:
    """'longest single sequence that fits (METHOD): N tokens', and with chunked logits the
    longest with the whole logits beside it and the gain."""
    longest = setup.planner(method).longest_fitting()
    line = f"longest single sequence that fits ({method}): {longest:,} tokens"
    if not setup.logits_chunk or not setup.model.vocab:
        return line + " (whole logits)"
    whole = dataclasses.replace(setup, logits_chunk=0).planner(method).longest_fitting()
    gain = f"{longest / whole:.2f}x" if whole else "none fits with them"
    if whole and longest == whole:
        gain += ": the logits are not what limits it"
    return (
        f"{line} with the logits in chunks of {setup.logits_chunk:,} tokens; {whole:,} with "
        f"the whole logits ({gain})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        method = Method.parse(args.method)
        setup, lens = _setup(args)
        setup.planner(method)  # a static method names an option that exists
    except (ValueError, ProfileError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    return report(setup, lens, method, args.options)


if __name__ == "__main__":
    raise SystemExit(main())
