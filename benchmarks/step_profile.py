"""Where one optimizer step's time goes: compute, each kind of collective, the optimizer, the rest.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 benchmarks/step_profile.py \\
        [--tokens 64,4096] [--sequences N] [--options tp_sp,g1:local] [--warmup 3] [--steps 5]

The model is launch/configs/cpu_tiny.toml's (override with --config / --set), float32, trained by
the real `paradyse.Engine` with a static planner (`static:OPTION` on every layer: tp_sp, ulysses,
ring, usp, metp on the whole group, g1:local or g2:tp_sp on sub-groups). Per (tokens, option):
a micro-batch of --sequences random sequences of that many tokens (default one per rank), run
--warmup optimizer steps, then --steps steps timed without the profiler (the `step` line: the
median of `Engine.step` wall time on the slowest rank, and the CPU time its process used, which
a busy machine inflates less than the wall time) and --steps steps under
`torch.profiler` (CPU activities), whose events are sorted into the rows below, each the median
over the profiled steps on the slowest rank (the rank with the largest median profiled step):

- matmul: mm/addmm/bmm/linear kernels; attention: the flash-attention kernels (forward and
  backward); elementwise: every other aten op outside a collective or the optimizer (norms,
  RoPE, SwiGLU, the loss, zeroing);
- copies: copy_, cat, stack, index_select, clone, contiguous and the like;
- all_gather, reduce_scatter, all_to_all, all_reduce, p2p, barrier, broadcast: the collectives,
  with their calls per step, by what they are whatever gloo algorithm runs them (the benchmark
  wraps parallel_lib's helpers and direct torch.distributed calls in `collective:KIND` ranges,
  waits included; p2p: a ring exchange, posted and waited for);
- optimizer: `Engine._update` apart from its collectives (gradient norms, clipping, AdamW);
- python and other: the rest of the step (Python, autograd bookkeeping, profiler gaps).

The profiler adds overhead to every op, so the profiled total exceeds the `step` line; the rows
are shares of the profiled step. The last line of each table says where most time goes.
`--json PATH` also writes the numbers. `--collectives REPEATS` instead times each collective over
the sp group on gloo's own algorithm and on the one-round all-to-all form `parallel_lib.comm`
picks by size (what its thresholds were set from).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, record_function

if not __package__:  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import paradyse  # noqa: E402
import parallel_lib.comm as comm  # noqa: E402
from cost_models import get_preset  # noqa: E402
from paradyse import DecoderModel, Engine  # noqa: E402
from paradyse.planning import run_setup  # noqa: E402
from parallel_lib.ring import RingExchange  # noqa: E402

CONFIG = "launch/configs/cpu_tiny.toml"
KINDS = ("all_gather", "reduce_scatter", "all_to_all", "all_reduce", "p2p", "barrier", "broadcast")
ROWS = ("matmul", "attention", "elementwise", "copies", *KINDS, "optimizer", "python and other")
MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_", "aten::linear"}
ATTENTION_PREFIX = "aten::_scaled_dot_product_flash_attention"
COPIES = {
    "aten::copy_", "aten::cat", "aten::stack", "aten::index_select", "aten::clone",
    "aten::contiguous", "aten::index", "aten::index_put_", "aten::_to_copy", "aten::to",
    "aten::repeat_interleave", "aten::gather", "aten::scatter", "aten::narrow_copy",
    "aten::index_add_", "aten::_unsafe_view", "aten::reshape",
}  # fmt: skip
# torch.distributed calls made outside parallel_lib's helpers (the engine's barrier, ...) -> row
WRAPPED = {
    "all_gather_into_tensor": "all_gather", "all_gather_single": "all_gather",
    "all_gather": "all_gather", "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_single": "reduce_scatter", "all_to_all_single": "all_to_all",
    "all_to_all": "all_to_all", "all_reduce": "all_reduce", "barrier": "barrier",
    "broadcast": "broadcast", "send": "p2p", "recv": "p2p",
}  # fmt: skip
# parallel_lib's helpers -> the collective they are, whatever gloo algorithm runs them
HELPERS = {
    "all_gather_dim0": "all_gather", "reduce_scatter_dim0": "reduce_scatter",
    "_all_to_all": "all_to_all", "_all_to_all_rows": "all_to_all",
    "exchange_counts": "all_to_all", "all_reduce_": "all_reduce",
}  # fmt: skip


# ------------------------------------------------------------------------------ instrumenting
def _ranged(label: str, fn):
    """fn inside a profiler range named `label`."""

    def call(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return call


def _rebind(original, wrapped) -> list:
    """Every module of the project that holds `original` under its name gets `wrapped`;
    returns the (module, name, original) to restore."""
    undo = []
    for module in list(sys.modules.values()):
        name = getattr(module, "__name__", "").split(".")[0]
        ours = name in ("parallel_lib", "paradyse", "integrations", "cost_models")
        if ours and getattr(module, original.__name__, None) is original:
            undo.append((module, original.__name__, original))
            setattr(module, original.__name__, wrapped)
    return undo


@contextmanager
def instrumented():
    """Inside: every collective is a `collective:KIND` range (parallel_lib's helpers in every
    module that imported them, the ring's p2p, direct torch.distributed calls) and
    `Engine._update` a `phase:optimizer` range. Restored on exit."""
    undo = []
    for name, kind in HELPERS.items():
        undo += _rebind(getattr(comm, name), _ranged(f"collective:{kind}", getattr(comm, name)))
    for name, kind in WRAPPED.items():
        if hasattr(dist, name):
            undo.append((dist, name, getattr(dist, name)))
            setattr(dist, name, _ranged(f"collective:{kind}", getattr(dist, name)))
    for owner, name, label in (
        (RingExchange, "start", "collective:p2p:post"),  # its time counts, its call does not
        (RingExchange, "wait", "collective:p2p"),
        (Engine, "_update", "phase:optimizer"),
    ):
        fn = owner.__dict__[name]
        undo.append((owner, name, fn))
        setattr(owner, name, _ranged(label, fn))
    try:
        yield
    finally:
        for owner, name, fn in reversed(undo):
            setattr(owner, name, fn)


# ------------------------------------------------------------------------------ classifying
def classify(events) -> tuple[Counter, Counter]:
    """Microseconds per row and calls per collective kind of one profiled step (the events
    inside its `phase:step` range; a collective range counts whole, the optimizer range apart
    from its collectives, an op's own time by its name)."""
    times, calls = Counter(), Counter()
    steps = [e for e in events if e.name == "phase:step"]

    def visit(e, phase: str | None) -> None:
        name = e.name
        if name.startswith("collective:"):
            kind, _, post = name.removeprefix("collective:").partition(":")
            times[kind] += e.cpu_time_total
            calls[kind] += not post  # a ring exchange is one call: its wait, not its posting
            return
        if name == "phase:optimizer":
            phase = "optimizer"
        if phase is not None:
            row = phase
        elif name in MATMUL:
            row = "matmul"
        elif name.startswith(ATTENTION_PREFIX):
            row = "attention"
        elif name in COPIES:
            row = "copies"
        elif name.startswith("aten::"):
            row = "elementwise"
        else:
            row = "python and other"  # autograd engine nodes, record_function ranges
        times[row] += e.self_cpu_time_total
        for child in e.cpu_children:
            visit(child, phase)

    for step in steps:
        times["python and other"] += step.self_cpu_time_total
        for e in step.cpu_children:
            visit(e, None)
    return times, calls


# ------------------------------------------------------------------------------ running
def make_engine(config, mesh, option: str, steps: int) -> Engine:
    setup = run_setup(config, sp=mesh.sp, dp=mesh.dp, hardware=get_preset("cpu"),
                      every_option=True)  # fmt: skip
    planner = setup.planner(f"static:{option}")
    model = DecoderModel(config.model, mesh.sp_group, seed=config.train.seed,
                         dtype=getattr(torch, config.train.dtype), device=mesh.device)  # fmt: skip
    return Engine(model, mesh, planner, config.optim, total_steps=steps, measure_memory=False)


@contextmanager
def _quiet_profiler():
    """Profiler start/stop messages some builds print on stderr, silenced."""
    fd, saved = sys.stderr.fileno(), os.dup(2)
    sys.stderr.flush()
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, fd)
        os.close(saved)


def measure(config, mesh, option: str, tokens: int, sequences: int, args) -> dict:
    """Run the steps of one (tokens, option); returns this rank's medians."""
    engine = make_engine(config, mesh, option, args.warmup + 2 * args.steps)
    g = torch.Generator().manual_seed(args.seed + tokens)
    batch = [torch.randint(0, config.model.vocab, (tokens,), generator=g).tolist()
             for _ in range(sequences)]  # fmt: skip
    loss_tokens = sequences * (tokens - 1)
    for _ in range(args.warmup):
        result = engine.step([batch], loss_tokens)
    plan = str(result.micro_batches[0].plan)
    walls, cpus = [], []
    for _ in range(args.steps):
        dist.barrier()  # every rank starts the step together: the step's own barrier is latency
        start, cpu = time.perf_counter(), time.process_time()
        engine.step([batch], loss_tokens)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    rows: dict[str, list[float]] = {r: [] for r in ROWS}
    calls: Counter = Counter()
    totals = []
    for _ in range(args.steps):
        with _quiet_profiler(), profile(activities=[ProfilerActivity.CPU]) as prof:
            dist.barrier()
            start = time.perf_counter()
            with record_function("phase:step"):
                engine.step([batch], loss_tokens)
            total = (time.perf_counter() - start) * 1e3
        times, calls = classify(prof.events())
        totals.append(total)
        for row in ROWS[:-1]:
            rows[row].append(times[row] / 1e3)
        rows["python and other"].append(total - sum(times[r] for r in ROWS[:-1]) / 1e3)
    engine.remove_hooks()
    return {
        "plan": plan,
        "step_ms": statistics.median(walls) * 1e3,
        "cpu_ms": statistics.median(cpus) * 1e3,
        "profiled_ms": statistics.median(totals),
        "rows": {r: statistics.median(v) for r, v in rows.items()},
        "calls": dict(calls),
    }


def table(tokens: int, sequences: int, option: str, found: dict, rank: int) -> list[str]:
    rows, total = found["rows"], sum(found["rows"].values())
    lines = [
        f"tokens={tokens} x {sequences} sequences, option {option} ({found['plan']}), rank {rank}: "
        f"step {found['step_ms']:.1f} ms (no profiler; CPU time {found['cpu_ms']:.1f} ms), "
        f"profiled {found['profiled_ms']:.1f} ms",
        "| row | ms | % | calls |",
        "|---|---:|---:|---:|",
    ]
    for row in ROWS:
        if row in KINDS and not found["calls"].get(row):
            continue
        calls = found["calls"].get(row, "")
        lines.append(f"| {row} | {rows[row]:.2f} | {100 * rows[row] / total:.0f} | {calls} |")
    compute = rows["matmul"] + rows["attention"] + rows["elementwise"]
    collectives = sum(rows[k] for k in KINDS)
    parts = {"compute": compute, "collectives": collectives, "optimizer": rows["optimizer"],
             "python and copies": rows["copies"] + rows["python and other"]}  # fmt: skip
    top = max(parts, key=parts.get)
    shares = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in parts.items())
    lines.append(f"most of the step is {top}: {shares}")
    return lines


def collective_table(mesh, repeats: int) -> list[str]:
    """gloo's own algorithm against the one-round all-to-all form (`parallel_lib.comm`) of each
    collective over the sp group, by size (the all-to-all form at every size, whatever the
    thresholds choose): medians of interleaved calls on the slowest rank."""
    group, direct = mesh.sp_group, comm._direct
    limits = comm.DIRECT_GATHER_BYTES, comm.DIRECT_REDUCE_BYTES
    comm.DIRECT_GATHER_BYTES = comm.DIRECT_REDUCE_BYTES = 1 << 40
    cases = [("all_gather", n) for n in (16, 64, 256, 1024, 4096, 16384)]
    cases += [("reduce_scatter", n) for n in (16, 256, 1024, 4096, 16384)]
    cases += [("all_reduce", n) for n in (1, 16, 64, 256, 1024)]
    run = {"all_gather": lambda x: comm.all_gather_dim0(x[: x.numel() // group.size], group),
           "reduce_scatter": lambda x: comm.reduce_scatter_dim0(x, group),
           "all_reduce": lambda x: comm.all_reduce_(x, group)}  # fmt: skip
    lines = ["| collective | KiB (output / input) | gloo ms | all-to-all ms | gloo / all-to-all |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for kind, kib in cases:
        x = torch.randn(kib * 256)
        times: dict[bool, list[float]] = {False: [], True: []}
        for i in range(repeats):
            for use in (i % 2 == 0, i % 2 == 1):
                comm._direct = direct if use else (lambda *a: False)
                dist.barrier()
                start = time.perf_counter()
                run[kind](x)
                times[use].append(time.perf_counter() - start)
        comm._direct = direct
        worst = torch.tensor([statistics.median(times[u]) * 1e3 for u in (False, True)])
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        native, one = worst.tolist()
        lines.append(f"| {kind} | {kib} | {native:.2f} | {one:.2f} | {native / one:.2f} |")
    comm.DIRECT_GATHER_BYTES, comm.DIRECT_REDUCE_BYTES = limits
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", default="64,4096", help="sequence lengths (default 64,4096)")
    p.add_argument("--sequences", type=int, default=0, help="per micro-batch (default: sp)")
    p.add_argument("--options", "--option", default="tp_sp,g1:local",
                   help="static options, comma-separated (default tp_sp,g1:local)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (default 3)")
    p.add_argument("--steps", type=int, default=5, help="timed and profiled steps (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write every table's numbers there")
    p.add_argument("--collectives", type=int, default=0, metavar="REPEATS",
                   help="instead: gloo's algorithms against all-to-all, by size")  # fmt: skip
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return p.parse_args(argv)


def run(args: argparse.Namespace, mesh) -> tuple[list[str], list[dict]]:
    """Profile every (tokens, option) (collective); rank 0 prints. Returns the table lines and
    the numbers of each table (the slowest rank's)."""
    config = paradyse.load_config(args.config, args.set)
    tokens = [int(t) for t in str(args.tokens).split(",")]
    options = args.options.split(",")
    sequences = args.sequences or mesh.sp
    say = print if mesh.rank == 0 else (lambda *a, **k: None)
    load = os.getloadavg()
    say(f"sp={mesh.sp} {mesh.device.type} {config.train.dtype}, {config.model.layers} layers "
        f"H={config.model.hidden}, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, "
        f"{args.steps} steps each (medians)", flush=True)  # fmt: skip
    lines, records = [], []
    with instrumented():
        for n in tokens:
            for option in options:
                found = measure(config, mesh, option, n, sequences, args)
                every = [None] * mesh.world
                dist.all_gather_object(every, found)
                slowest = max(range(mesh.world), key=lambda r: every[r]["profiled_ms"])
                block = table(n, sequences, option, every[slowest], slowest)
                for line in ["", *block]:
                    say(line, flush=True)
                lines += block
                records.append({"tokens": n, "sequences": sequences, "option": option,
                                "load": os.getloadavg()[0], **every[slowest]})  # fmt: skip
    return lines, records


def main(argv: list[str] | None = None) -> list[str]:
    """Run under torchrun (collective); rank 0 prints. Returns the lines."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    mesh = paradyse.init_mesh()
    if args.collectives:
        lines, records = collective_table(mesh, args.collectives), []
        for line in lines if mesh.rank == 0 else ():
            print(line, flush=True)
    else:
        lines, records = run(args, mesh)
    if args.json and mesh.rank == 0:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if dist.is_initialized():
        dist.destroy_process_group()
    return lines


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
