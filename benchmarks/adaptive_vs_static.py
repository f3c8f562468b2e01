"""Adaptive planning against every static strategy, on the same micro-batches and one budget.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 benchmarks/adaptive_vs_static.py \\
        [--memory-budget 128MiB] [--batches 8] [--min-tokens 64] [--max-tokens 8192] [--seed 0] \\
        [--repeats 3] [--sequences N] [--ceiling] [--bound] [--predict]

The model is launch/configs/cpu_tiny.toml's (override with --config / --set), trained by the real
`paradyse.Engine` on one switchable group of every rank (sp = world size). The micro-batches are
windows of the default corpus (the standard library's sources, byte tokens): `--batches` lengths
spaced geometrically from --min-tokens to --max-tokens (two decades by default), each cut from a
document of at least that length, shuffled; all fixed by --seed, so every method sees the same
batches in the same order. Short lengths repeat (ceil(sqrt(8192 / n)) copies) so that they weigh
in the total time as they do in training; `--no-repeat` uses each length once. A micro-batch
holds `--sequences` windows of its length from different documents (default: as many as fit in
--max-tokens tokens, at most sp: one per rank for the short lengths, one in all for the longest):
a fixed-group strategy spreads every one over all sp ranks, while sub-groups (the group size per
micro-batch) may give each rank or pair of ranks its own. `--sequences 1` is the
single-sequence mix of earlier rounds.

Methods: `exact` and `paradyse` (adaptive: a plan per micro-batch, per layer, and a group size
per micro-batch), `static:NAME` for every strategy the model supports at this sp (one strategy
on every layer of the whole group, with the fastest recompute mode that fits, uniform over the
layers), and `static:gN:NAME` for every strategy on sub-groups of N ranks (g1:local is FSDP's
way: every rank its own sequences, whole weights gathered; with fewer sequences than
sub-groups the last ones idle on one token). Each method gets a fresh model (same seed),
its own planner at the same per-rank budget, and an Engine; every micro-batch is an optimizer
step (forward + backward + optimizer), timed by the engine on the slowest rank. The methods are
interleaved: each micro-batch runs `--repeats` times on every method, the methods taking turns in
an order that rotates, and a method's time for the batch is the median of its repeats, so a slow
spell of the shared machine neither lands on one method nor survives the median. The two
shortest micro-batches run once first, untimed (warm-up). A micro-batch the method's planner
cannot fit (InfeasibleError) is counted as unfit and skipped.

Definitions (the table and the last line):
- tokens/s of a method: the tokens of the micro-batches it ran / the sum of their step times;
  "predicted x" is the same ratio to the best static from the cost model's times of the plans.
- unfit: micro-batches it could not fit in the budget.
- best static: the static strategy on the whole group (a fixed group; static:gN rows are shown,
  not chosen) with the highest tokens/s over the micro-batches it can run, whatever its unfit
  count (so a static that skips the long batches is judged on the rest; its unfit count is
  printed beside it).
- oracle: per micro-batch, the fastest measured static strategy among those that fit it, in
  hindsight; oracle tokens/s = all tokens / the sum of those per-batch best times (a batch no
  static fits takes the exact planner's time, one nothing fits is left out; with the default
  budget every static fits every batch).
- the last line: `adaptive/best-static = X.XXx  adaptive/oracle = Y.YYx  unfit(best-static) = N`,
  adaptive = the exact planner. The ratios compare tokens/s; the line before it gives the cost
  model's prediction of adaptive/best-static.

`--ceiling` adds a pass that measures every uniform option (each strategy, split and recompute
mode on every layer) on one micro-batch of every distinct length, with no memory limit, and
prints `ceiling/best-static`: tokens/s if every batch the exact planner fits ran its fastest
option, over the best static's with each batch it ran on the option it ran there, both timed in
that pass. Layer-wise plans cost a mix of these options' per-layer times, so this bounds what
any planner can gain on this machine, model and mix (up to the noise between the two passes).

`--bound` adds a pass that times every micro-batch as one process's step (rank 0, one thread,
no communication; the other ranks wait) and prints `bound/best-static`: that work spread
perfectly over the cores the ranks can use, against the best static. No plan of any framework
passes it on this machine (benchmarks/adaptive_bound.py).

`--predict` prints the same table from the cost model alone in about a second (use it to
explore budgets). The default budget, 128 MiB per rank, is where the cost model predicts the
largest gain on the default model; docs/benchmarks.md has the measured tables and why.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import paradyse
from cost_models import Hardware, Profile, detect
from cost_models.stability import ranks_here
from paradyse import DecoderModel, Engine
from paradyse.planning import resolve_profile, run_setup
from parallel_lib import STRATEGY_NAMES, get_strategy, rank0_value
from planners import InfeasibleError, Planner, PlanningSetup, format_bytes

if not __package__:  # run as a script (torchrun benchmarks/...): the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.adaptive_bound import bound_cores, bound_report, measure_single  # noqa: E402
from benchmarks.adaptive_mix import (  # noqa: E402
    micro_batch_lengths,
    micro_batches_of,
    sequences_per_batch,
)
from benchmarks.adaptive_report import (  # noqa: E402
    Ceiling,
    MethodResult,
    ceiling_report,
    format_report,
    headline,
    summarise,
)

CONFIG = "launch/configs/cpu_tiny.toml"
PROFILE = ".cache/profile-{device}-sp{sp}-{dtype}.json"
ADAPTIVE_METHODS = ("exact", "paradyse")


# ------------------------------------------------------------------------------ set-up
@dataclass(frozen=True)
class Bench:
    """What every method of the run shares: the model config, the mesh, and the planning setup
    (this machine's hardware and profile, the budget, every option)."""

    config: paradyse.Config
    mesh: paradyse.Mesh
    setup: PlanningSetup

    @classmethod
    def build(cls, config, mesh, profile: Profile | None) -> Bench:
        hardware = Hardware.from_dict(rank0_value(detect().to_dict(), mesh.device))
        setup = run_setup(config, sp=mesh.sp, dp=mesh.dp, hardware=hardware, profile=profile,
                          every_option=True)  # fmt: skip
        return cls(config, mesh, setup)

    def unlimited(self) -> Bench:
        """The same with no memory limit (the ceiling pass)."""
        return dataclasses.replace(self, setup=dataclasses.replace(self.setup, budget_bytes=2**50))

    def planner(self, method: str) -> Planner:
        """exact / paradyse, or static:LABEL (tp_sp, ring+full, usp2x2+none: a split and a
        recompute mode, when given, are fixed), over the shared cost tables."""
        return self.setup.planner(method)


def load_profile(path: str | None, config, mesh, dtype: torch.dtype, log) -> Profile | None:
    """The trainer's rule (`paradyse.planning.resolve_profile`): the profile at `path`, measured
    on this machine and saved there first if missing; None for `none`."""
    if not path or path == "none":
        return None
    try:
        return resolve_profile(path, mesh, config.model.shape, dtype, log=log, warn=log)
    except ValueError as error:
        raise SystemExit(f"benchmarks/adaptive_vs_static.py: {error}") from None


def methods_for(config, sp: int, wanted: str) -> list[str]:
    """exact, paradyse and static:NAME for every strategy that supports the model at sp."""
    names = list(ADAPTIVE_METHODS) + [
        f"static:{s}" for s in STRATEGY_NAMES
        if s != "local" and get_strategy(s).supports(config.model.shape, sp)[0]
    ]  # fmt: skip
    if sp == 1:
        names += ["static:local"]
    for g in [d for d in range(sp - 1, 0, -1) if sp % d == 0]:  # sub-groups of g ranks
        names += [
            f"static:g{g}:{s}" for s in STRATEGY_NAMES
            if s != "usp" and (s == "local") == (g == 1)
            and get_strategy(s).supports(config.model.shape, g)[0]
        ]  # fmt: skip
    if wanted != "all":
        chosen = wanted.split(",")
        unknown = [m for m in chosen if m not in names]
        if unknown:
            raise ValueError(f"unknown or unsupported methods {unknown}; choose from {names}")
        names = chosen
    return names


# ------------------------------------------------------------------------------ running
class MethodRun:
    """One method's planner, fresh model (same seed for every method) and Engine."""

    def __init__(self, method: str, bench: Bench, steps: int) -> None:
        config, mesh = bench.config, bench.mesh
        self.method = method
        self.planner = bench.planner(method)
        dtype = getattr(torch, config.train.dtype)
        model = DecoderModel(config.model, mesh.sp_group, seed=config.train.seed, dtype=dtype,
                             device=mesh.device,
                             logits_chunk=config.train.logits_chunk)  # fmt: skip
        self.engine = Engine(model, mesh, self.planner, config.optim, total_steps=steps,
                             measure_memory=False)  # fmt: skip

    def step(self, batch: list[list[int]]):
        """One optimizer step on the micro-batch (its sequences; collective); None when it
        does not fit."""
        if not self.planner.fits([len(s) for s in batch]):
            return None
        return self.engine.step([batch], sum(len(s) - 1 for s in batch))


def run_methods(methods, bench: Bench, batches, warmup, repeats: int) -> list[MethodResult]:
    """Every micro-batch as `repeats` optimizer steps of every method, interleaved: for each
    batch the methods take turns (in an order that rotates from batch to batch), so a slow
    spell of the machine hits them alike; a method's time for the batch is the median of its
    repeats (collective)."""
    steps = repeats * len(batches) + len(warmup)
    runs = [MethodRun(m, bench, steps) for m in methods]
    results = [MethodResult(m) for m in methods]
    for i in warmup:
        for run in runs:
            run.step(batches[i])
    for b, batch in enumerate(batches):
        times: list[list[float]] = [[] for _ in runs]
        for r in range(repeats):
            shift = (b * repeats + r) % len(runs)
            for k in list(range(shift, len(runs))) + list(range(shift)):
                step = runs[k].step(batch)
                if step is None:
                    continue
                times[k].append(step.step_s)
                if r == 0:
                    results[k].plans.append(str(step.micro_batches[0].plan))
                    results[k].predicted.append(step.predicted_s)
                    results[k].peak_bytes = max(results[k].peak_bytes, step.predicted_peak_bytes)
        for result, measured in zip(results, times, strict=True):
            result.seconds.append(float(np.median(measured)) if measured else None)
            if not measured:
                result.plans.append("-")
                result.predicted.append(None)
    return results


def predict_method(method: str, bench: Bench, batches) -> MethodResult:
    """The same, from the cost model: the plan's predicted seconds (layers only), no steps."""
    planner = bench.planner(method)
    result = MethodResult(method)
    for batch in batches:
        try:
            plan = planner.plan([len(s) for s in batch])
        except InfeasibleError:
            result.seconds.append(None)
            result.predicted.append(None)
            result.plans.append("-")
            continue
        result.seconds.append(plan.predicted_s)
        result.predicted.append(plan.predicted_s)
        result.plans.append(str(plan))
        result.peak_bytes = max(result.peak_bytes, plan.predicted_peak_bytes)
    return result


def measure_ceiling(bench: Bench, lengths, batches, statics, repeats: int) -> Ceiling:
    """Run every uniform option of the static strategies on one micro-batch of each distinct
    length (the shortest first as a warm-up, then interleaved, the median of `repeats`
    steps; collective)."""
    distinct = sorted(set(lengths))
    first = [batches[lengths.index(n)] for n in distinct]
    names = {m.removeprefix("static:") for m in statics}
    unlimited = bench.unlimited()
    every = unlimited.setup.costs.options
    labels = {o: o.strategy if o.group is None else f"g{o.group}:{o.strategy}" for o in every}
    options = [o.fixed_label for o in every if labels[o] in names]
    results = run_methods([f"static:{o}" for o in options], unlimited, first, [0], repeats)
    return Ceiling(distinct, options, {o: r.seconds for o, r in zip(options, results,
                                                                   strict=True)})  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--memory-budget", default="128MiB", help="per-rank budget (default 128MiB)")
    p.add_argument("--batches", type=int, default=8, help="distinct lengths (default 8)")
    p.add_argument("--min-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-repeat", action="store_true", help="each length once (long ones dominate)")
    p.add_argument("--sequences", type=int, default=0,
                   help="sequences per micro-batch, each its length (default 0: as many as\n"
                        "fit in --max-tokens, at most sp)")  # fmt: skip
    p.add_argument("--methods", default="all", help="comma-separated (exact,static:tp_sp,...)")
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--profile", default=PROFILE, help="cost-model profile; 'none': datasheet")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="steps per micro-batch and method; the median is its time (default 3)",
    )
    p.add_argument("--predict", action="store_true", help="cost model only, no training steps")
    p.add_argument("--ceiling", action="store_true",
                   help="also measure every uniform option per distinct length (slow): the\n"
                        "most any per-batch choice could gain over the best static")  # fmt: skip
    p.add_argument("--bound", action="store_true",
                   help="also time every batch as one process's step: the most any plan could\n"
                        "gain over the best static on these cores")  # fmt: skip
    return p.parse_args(argv)


def bench_mesh(mesh, log):
    """A benchmark's start (collective): one torch thread, the given mesh or a new one (and
    whether it is the benchmark's own, to destroy at the end), and `say`, `log` (default:
    print) on rank 0 and silent elsewhere."""
    torch.set_num_threads(1)
    own_mesh = mesh is None
    mesh = mesh or paradyse.init_mesh()
    log = log or (lambda line: print(line, flush=True))
    return own_mesh, mesh, (log if mesh.rank == 0 else (lambda line: None))


def main(argv: list[str] | None = None, *, mesh=None, log=None) -> dict:
    """Run the benchmark (collective); rank 0 prints. Returns the summary with the report lines
    (`lines`, the headline last) on every rank."""
    args = parse_args(argv)
    own_mesh, mesh, say = bench_mesh(mesh, log)
    rank0 = mesh.rank == 0
    try:  # the budget is the run's parallel.memory_budget, parsed by the config
        config = paradyse.load_config(
            args.config, [*args.set, f"parallel.memory_budget={args.memory_budget}"]
        )
        methods = methods_for(config, mesh.sp, args.methods)
        if args.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
        if (args.ceiling or args.bound) and args.predict:
            raise ValueError("--ceiling and --bound measure steps; not with --predict")
        if args.ceiling and ("exact" not in methods or methods == ["exact"]):
            raise ValueError("--ceiling needs exact and at least one static:NAME in --methods")
        if args.bound and not any(MethodResult(m).static for m in methods):
            raise ValueError("--bound needs a static:NAME on the whole group in --methods")
        lengths = micro_batch_lengths(args.batches, args.min_tokens, args.max_tokens, args.seed,
                                      not args.no_repeat)  # fmt: skip
        if args.sequences < 0:
            raise ValueError(f"--sequences must be at least 0, got {args.sequences}")
        counts = sequences_per_batch(lengths, args.sequences, mesh.sp, args.max_tokens)
        batches = micro_batches_of(lengths, counts, args.seed)
    except ValueError as error:
        if rank0:
            print(f"benchmarks/adaptive_vs_static.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    dtype = getattr(torch, config.train.dtype)
    bench = Bench.build(config, mesh, load_profile(args.profile, config, mesh, dtype, say))
    shape = config.model.shape
    say(
        f"sp={mesh.sp} {mesh.device.type} {config.train.dtype}, {config.model.layers} layers "
        f"H={shape.hidden} heads={shape.heads}/{shape.kv_heads} F={shape.ffn_hidden}, budget "
        f"{format_bytes(bench.setup.budget)}/rank, {len(lengths)} micro-batches of "
        f"{min(counts)}-{max(counts)} sequences of {min(lengths)}-{max(lengths)} tokens "
        f"(seed {args.seed}), "
        + ("cost-model prediction" if args.predict else "measured step time, slowest rank")
    )
    warmup = sorted(range(len(lengths)), key=lambda i: lengths[i])[:2]
    start = time.perf_counter()
    if args.predict:
        results = [predict_method(m, bench, batches) for m in methods]
    else:
        results = run_methods(methods, bench, batches, warmup, args.repeats)
    tokens = [k * n for k, n in zip(counts, lengths, strict=True)]
    summary = summarise(results, tokens)
    lines = format_report(results, tokens, summary)
    if args.ceiling:
        statics = [m for m in methods if m.startswith("static:")]
        ceiling = measure_ceiling(bench, lengths, batches, statics, args.repeats)
        per_length = {n: k * n for n, k in zip(lengths, counts, strict=True)}
        lines += ceiling_report(ceiling, results, lengths, summary, per_length)
        summary["ceiling"] = {"lengths": ceiling.lengths, "seconds": ceiling.seconds}
    if args.bound:
        single = measure_single(config, mesh, batches, args.repeats)
        cores = bound_cores(ranks_here(mesh.world))
        lines += bound_report(single, cores, results, tokens, lengths, summary)
        summary["bound"] = {"single_seconds": single, "cores": cores}
    lines.append(f"{time.perf_counter() - start:.0f} s")
    lines.append(f"predicted adaptive/best-static = {summary['predicted_adaptive_over_best']:.2f}x")
    lines.append(headline(summary))
    for line in lines:
        say(line)
    summary.update(lines=lines, lengths=lengths, counts=counts, methods=methods,
                   seconds={r.method: r.seconds for r in results},
                   plans={r.method: r.plans for r in results})  # fmt: skip
    if own_mesh and dist.is_initialized():
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
