"""ParaDySe against what a PyTorch user would pick instead: one process, FSDP2, DTensor TP+SP.

    python benchmarks/peers.py [--ranks 4] [--steps 4] [--repeats 3] [--lengths 64,...,8192]
    # or, as the other benchmarks:
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 benchmarks/peers.py [...]

Run as a plain process, the script launches itself under torchrun with --ranks processes
(OMP_NUM_THREADS=1). Every method trains the same model (launch/configs/cpu_tiny.toml's by
default; --config / --set), float32, from the same initial weights (ParaDySe's, drawn from
train.seed), on the same global batches, with the same ranks:

- single: one process (rank 0) trains every sequence of the step; the other ranks wait.
- fsdp2: `fully_shard` on every decoder layer and the root; each rank its own sequences, the
  step's sequences dealt to the ranks balanced by tokens.
- dtensor_tp: DTensor tensor + sequence parallel, torchtitan's plan (`parallelize_module`);
  every rank on all the step's sequences.
- paradyse: ParaDySe adaptive, the run `paradyse-train` makes of the config (`Trainer`: its
  planner, budget and profile), fed the benchmark's batches.
The peers are in benchmarks/peer_models.py. Each step is one optimizer step (forward, backward,
clipping, AdamW); its time is the wall time of the slowest rank, from a barrier.

Mixes (global batches fixed by --seed, steps of at most --tokens-per-step tokens):
- default: the embedded default corpus as `make run` trains on (the config's [data]);
- short / long: windows of default-corpus documents, lengths log-uniform in --short / --long
  (`--mixes` picks some of the three).
Per mix, every method gets a fresh model; the first batch runs once untimed (warm-up; its loss,
from the same weights for every method, is the sanity column: each peer's must match
ParaDySe's within 1e-4), then every batch runs --repeats times per method, the methods taking
turns in an order that rotates, and a method's time for a batch is the median of its repeats.
tokens/s = the tokens of the batches it ran / the sum of their times. The per-length table does
the same with one batch per length of --lengths: one window of that length per rank.

--rank-tokens N: the most tokens one rank may hold (default: no limit, every method fits every
batch). The peers then cut micro-batches to N tokens per rank, and a batch with a sequence one
rank cannot hold (for dtensor_tp: 1/P of it) is unfit for them; ParaDySe's micro-batches get
data.tokens_per_rank = N and its planner --memory-budget (default: the device's memory).

The last line: `paradyse/best-peer = X.XXx  short = Y.YYx  long = Z.ZZx`, X for the default
mix, each ParaDySe's tokens/s over that of the fastest peer that fits every batch of the mix
(inf where no peer does, nan for a mix left out with --mixes). The run exits 1 when the loss
check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch.distributed as dist

if not __package__:  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import paradyse  # noqa: E402
from benchmarks.adaptive_mix import corpus_windows  # noqa: E402
from benchmarks.adaptive_vs_static import bench_mesh  # noqa: E402
from benchmarks.peer_models import (  # noqa: E402
    Fsdp2Peer,
    SinglePeer,
    TensorParallelPeer,
    check_plain,
    paradyse_weights,
    timed_step,
)
from benchmarks.peers_report import MIXES, PassResult, format_report, loss_within  # noqa: E402
from paradyse.data import Batch, micro_batches, run_stream  # noqa: E402
from parallel_lib import pad_length  # noqa: E402

CONFIG = "launch/configs/cpu_tiny.toml"
METHODS = ("single", "fsdp2", "dtensor_tp", "paradyse")
QUICK = ["model.layers=2", "model.hidden=64", "model.heads=4", "model.kv_heads=2",
         "model.head_dim=16", "model.ffn_hidden=128", "data.max_seq_len=256",
         "data.tokens_per_step=1024", "parallel.profile="]  # fmt: skip


# ------------------------------------------------------------------------------ data
def window_batches(lo: int, hi: int, steps: int, budget: int, seed: int) -> list[list]:
    """`steps` batches of default-corpus windows, lengths log-uniform in [lo, hi], each batch
    filled while its total stays within `budget` tokens (at least one window)."""
    rng = np.random.default_rng(seed)
    sizes: list[list[int]] = []
    for _ in range(steps):
        batch: list[int] = []
        while True:
            n = int(round(np.exp(rng.uniform(np.log(lo), np.log(hi)))))
            if batch and sum(batch) + n > budget:
                break
            batch.append(n)
        sizes.append(batch)
    windows = iter(corpus_windows([n for b in sizes for n in b], seed))
    return [[np.asarray(next(windows), dtype=np.int64) for _ in b] for b in sizes]


def mixes(config, args) -> dict[str, list[list]]:
    """Every mix's batches, the same on every rank."""
    seed, budget = config.train.seed, args.tokens_per_step or config.data.tokens_per_step
    data = dataclasses.replace(config.data, tokens_per_step=budget,
                               max_seq_len=min(budget, config.data.max_seq_len))  # fmt: skip
    stream = run_stream(data, config.model.vocab, seed)
    found = {"default": [list(stream.next_batch().sequences) for _ in range(args.steps)]}
    for k, name in enumerate(("short", "long")):
        lo, hi = getattr(args, name)
        found[name] = window_batches(lo, hi, args.steps, max(budget, hi), seed + 17 * (k + 1))
    return {name: found[name] for name in MIXES if name in args.mixes.split(",")}


def length_batches(lengths: list[int], world: int, seed: int) -> list[list]:
    """One batch per length: a default-corpus window of that length for every rank."""
    windows = iter(corpus_windows([n for n in lengths for _ in range(world)], seed + 101))
    return [[np.asarray(next(windows), dtype=np.int64) for _ in range(world)] for _ in lengths]


# ------------------------------------------------------------------------------ methods
class _Given:
    """The trainer's stream of global batches, replaced by the benchmark's."""

    batch: Batch | None = None

    def next_batch(self, max_len: int | None = None) -> Batch:
        return self.batch


class ParaDySeMethod:
    """ParaDySe adaptive as `paradyse-train` runs the config: a `Trainer`, one train_step per
    batch (micro-batching, planning, engine step)."""

    name = "paradyse"

    def __init__(self, config, mesh, log) -> None:
        self.trainer = paradyse.Trainer(config, mesh=mesh, log=log, warn=log)
        self.stream = self.trainer.batches = _Given()
        self.plans: list[str] = []

    def fits(self, lengths: list[int]) -> bool:
        trainer = self.trainer
        groups = micro_batches(lengths, range(len(lengths)), sp=trainer.mesh.sp,
                               tokens_per_rank=trainer.config.data.tokens_per_rank)  # fmt: skip
        return all(trainer.planner.fits([lengths[i] for i in g]) for g in groups)

    def step(self, sequences, targets: int) -> float:
        self.stream.batch = Batch(list(sequences))
        record = self.trainer.train_step()
        self.plans.append(record["plan"])
        return record["loss"]


def build_methods(names, config, args, mesh, device_mesh, batches, log) -> list:
    """Fresh models (the same initial weights) for every method, for `batches`."""
    steps = len(batches) * (args.repeats + 1)
    lengths = [len(s) for b in batches for s in b]
    weights = paradyse_weights(config.model, config.train.seed)
    common = (config.model, weights, config.optim, steps, args.rank_tokens)
    methods = []
    for name in names:
        if name == "single":
            methods.append(SinglePeer(*common, rank=mesh.rank))
        elif name == "fsdp2":
            methods.append(Fsdp2Peer(*common, device_mesh))
        elif name == "dtensor_tp":
            methods.append(TensorParallelPeer(*common, device_mesh))
        else:
            per_rank = max(sum(pad_length(len(s), mesh.sp) for s in b) // mesh.sp for b in batches)
            most = max(max(lengths), *(sum(map(len, b)) for b in batches))
            sets = [f"train.steps={steps}", f"data.max_seq_len={max(lengths)}",
                    f"data.tokens_per_step={most}",
                    f"data.tokens_per_rank={args.rank_tokens or per_rank}"]  # fmt: skip
            run = paradyse.load_config(args.config, [*args.base_sets, *sets])
            methods.append(ParaDySeMethod(run, mesh, log))
    return methods


# ------------------------------------------------------------------------------ running
def run_pass(name: str, methods, batches, repeats: int, mesh) -> PassResult:
    """Every batch `repeats` times on every method that fits it, interleaved (the order rotates
    from turn to turn), after the first batch once, untimed (warm-up, and the loss check)."""
    lengths = [[len(s) for s in b] for b in batches]
    fits = [[m.fits(ls) for ls in lengths] for m in methods]
    result = PassResult(name, [m.name for m in methods], lengths)
    for k, method in enumerate(methods):
        if fits[k][0]:
            result.first_loss[method.name] = timed_step(method, batches[0], mesh)[1]
    for b, batch in enumerate(batches):
        times: list[list[float]] = [[] for _ in methods]
        for r in range(repeats):
            shift = (b * repeats + r) % len(methods)
            for k in [*range(shift, len(methods)), *range(shift)]:
                if fits[k][b]:
                    times[k].append(timed_step(methods[k], batch, mesh)[0])
                if r == 0 and methods[k].name == "paradyse":
                    result.plans.append(methods[k].plans[-1] if fits[k][b] else "-")
        for k, method in enumerate(methods):
            result.seconds[method.name].append(statistics.median(times[k]) if times[k] else None)
    return result


# ------------------------------------------------------------------------------ main
def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        pair = int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO-HI tokens, got {text!r}") from None
    if not 2 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"need 2 <= LO <= HI, got {text!r}")
    return pair


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ranks", type=int, default=None,
                   help="processes (default 4; under torchrun: its world size)")  # fmt: skip
    p.add_argument("--steps", type=int, default=4, help="global batches per mix (default 4)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of every batch and method; the median counts")  # fmt: skip
    p.add_argument("--lengths", default="64,256,1024,4096,8192",
                   help="single lengths of the per-length table ('' to skip it)")  # fmt: skip
    p.add_argument("--mixes", default=",".join(MIXES),
                   help="mixes to measure, comma-separated (default: all)")  # fmt: skip
    p.add_argument("--short", type=_range, default=(32, 256), help="short mix (default 32-256)")
    p.add_argument("--long", type=_range, default=(4096, 8192), help="long mix (default 4096-8192)")
    p.add_argument("--tokens-per-step", type=int, default=None,
                   help="tokens per global batch (default: data.tokens_per_step)")  # fmt: skip
    p.add_argument("--rank-tokens", type=int, default=None,
                   help="most tokens one rank may hold (default: no limit)")  # fmt: skip
    p.add_argument("--memory-budget", default="",
                   help="ParaDySe's per-rank budget (default: the device's memory)")  # fmt: skip
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated, paradyse included (default: all)")  # fmt: skip
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--seed", type=int, default=None, help="default: the config's train.seed")
    p.add_argument("--quick", action="store_true",
                   help="a tiny model, 1 step, 1 repeat, short lengths: a smoke test")  # fmt: skip
    if p.parse_known_args(argv)[0].quick:  # its defaults; options given still count
        p.set_defaults(steps=1, repeats=1, lengths="32,128", short=(16, 64), long=(256, 512))
    args = p.parse_args(argv)
    args.base_sets = [*(QUICK if args.quick else []), *args.set, "train.measure_memory=false",
                      "train.progress=false", "train.metrics="]  # fmt: skip
    if args.seed is not None:
        args.base_sets.append(f"train.seed={args.seed}")
    if args.memory_budget:
        args.base_sets.append(f"parallel.memory_budget={args.memory_budget}")
    return args


def validate(args, config, world: int) -> tuple[list[str], list[int]]:
    """ValueError, one line, for what this run cannot do."""
    names = args.methods.split(",")
    if "paradyse" not in names or not set(names) <= set(METHODS):
        raise ValueError(f"--methods must name paradyse and some of {', '.join(METHODS)}")
    if not set(args.mixes.split(",")) <= {"", *MIXES}:
        raise ValueError(f"--mixes must name some of {', '.join(MIXES)}, got {args.mixes!r}")
    if args.ranks is not None and args.ranks != world:
        raise ValueError(f"--ranks {args.ranks} but the world has {world} processes")
    for flag, value in (("--steps", args.steps), ("--repeats", args.repeats),
                        ("--rank-tokens", args.rank_tokens or 1)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if config.train.dtype != "float32":
        raise ValueError(f"the peers run float32; the config says {config.train.dtype}")
    check_plain(config.model)
    if "dtensor_tp" in names:
        for key in ("heads", "kv_heads", "ffn_hidden", "vocab"):
            if getattr(config.model, key) % world:
                raise ValueError(f"dtensor_tp needs model.{key} divisible by {world} ranks")
    lengths = [int(n) for n in args.lengths.split(",") if n.strip()]
    return names, lengths


def main(argv: list[str] | None = None, *, mesh=None, log=None) -> dict:
    """Run the benchmark (collective); rank 0 prints. Returns the summary (`lines`, the
    headline last) on every rank."""
    args = parse_args(argv)
    own_mesh, mesh, say = bench_mesh(mesh, log)
    rank0 = mesh.rank == 0
    try:
        config = paradyse.load_config(args.config, args.base_sets)
        names, lengths = validate(args, config, mesh.world)
        batches = mixes(config, args)
        if lengths:
            batches["per-length"] = length_batches(lengths, mesh.world, config.train.seed)
    except ValueError as error:  # ConfigError and DataError are ValueErrors
        if rank0:
            print(f"benchmarks/peers.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    from torch.distributed.device_mesh import init_device_mesh

    device_mesh = init_device_mesh(mesh.device.type, (mesh.world,))
    shape = config.model
    say(f"peers: {mesh.world} ranks, {mesh.device.type} {mesh.backend} float32, {shape.layers} "
        f"layers H={shape.hidden} heads={shape.heads}/{shape.kv_heads} F={shape.ffn_hidden} "
        f"vocab={shape.vocab}, seed {config.train.seed}; {args.steps} steps per mix, warm-up 1, "
        f"{args.repeats} interleaved repeats (median); per-rank token limit: "
        f"{args.rank_tokens or 'none'}, paradyse budget: "
        f"{args.memory_budget or 'device'}")  # fmt: skip
    start = time.perf_counter()
    results = []
    for name, mix in batches.items():
        try:
            methods = build_methods(names, config, args, mesh, device_mesh, mix, say)
        except paradyse.RunError as error:  # e.g. a --memory-budget too small for ParaDySe
            if rank0:
                print(f"benchmarks/peers.py: error: {name}: {error}", file=sys.stderr)
            raise SystemExit(error.code) from None
        results.append(run_pass(name, methods, mix, args.repeats, mesh))
        say(f"{name}: measured ({time.perf_counter() - start:.0f} s so far)")
        del methods
        gc.collect()
    lines = format_report(results, time.perf_counter() - start)
    for line in lines:
        say(line)
    summary = {"lines": lines, "passes": {r.name: r.to_dict() for r in results},
               "loss_ok": loss_within(results)}  # fmt: skip
    if own_mesh and dist.is_initialized():
        dist.destroy_process_group()
    return summary


def relaunch(argv: list[str], ranks: int) -> int:
    """This script under torchrun with `ranks` processes, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={ranks}", os.path.abspath(__file__), *argv]  # fmt: skip
    return subprocess.call(command, env=env)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    argv = sys.argv[1:]
    ranks = parse_args(argv).ranks or 4  # --help prints and exits here
    if "RANK" not in os.environ and ranks > 1:
        sys.exit(relaunch(argv, ranks))
    sys.exit(0 if main(argv)["loss_ok"] else 1)
