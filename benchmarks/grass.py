"""Full fine-tuning, LISA, static GRASS and GRASS on the same model, data, steps and seed.

    python benchmarks/grass.py [--config launch/configs/smollm2_sft.toml] [--set SECTION.KEY=V]
        [--nproc 4] [--steps 16] [--seed 0] [--lr 5e-5] [--gamma 2] [--period 4]
        [--probe-steps 2] [--methods full,uniform,static,grass] [--measure-memory]
        [--budget 3GiB] [--heldout FILE.jsonl] [--eval-limit N] [--out runs/grass_bench]
        [--dry-run]

Each method is `[integrations.grass] mode = M` on one config (full, uniform = LISA, static,
grass), trained by `torchrun --standalone --nproc-per-node N -m paradyse.train` in its own
processes (a fresh process group each), then exported (`integrations.hf.export`) and evaluated
(`integrations.hf.evaluate`) on the held-out problems (default: heldout.jsonl beside
data.path). Everything lands in OUT/METHOD/ (replaced: *.log, metrics.jsonl, ckpt/, hf/,
eval.json); OUT/results.json holds the table's numbers. The runs train under the config's own
memory budget; --budget only sets the longest-length column. `--dry-run` prints the commands
and the longest-length column only.

Columns:
- held-out loss, exact match k/n: `integrations.hf.evaluate` (mean token loss of the answers;
  greedy generation, the answer sentence's number compared exactly).
- tokens/s: the median over the steps after the first of the metrics' tokens_per_s (GRASS's
  probing steps, gradient-only, count as steps).
- peak MiB: the highest measured peak_bytes of a step on the most loaded rank (only with
  --measure-memory, which sets train.measure_memory and slows CPU steps about 2x); pred. MiB:
  the planner's predicted_peak_bytes, always there.
- optimizer state: the highest `optimizer_state_bytes` of the metrics (AdamW state held on the
  device after a step, most loaded rank; state parked in host memory is not counted).
- longest@BUDGET: the longest single sequence the exact planner fits in --budget per rank,
  computed in this process without training: every layer trained (full), or gamma layers
  trained and the others frozen, their AdamW moments off the device when offload is on (the
  sampling methods; which layers does not matter, they are alike). Memory alone decides it.

Last line: `GRASS/full held-out loss = X.XXXx, GRASS/LISA = Y.YYYx` (below 1: GRASS lower).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

if not __package__:  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cost_models import detect  # noqa: E402
from paradyse.config import ConfigError, apply_override, load_config  # noqa: E402
from paradyse.init import InitError, with_pretrained_shape  # noqa: E402
from paradyse.planning import exact_setup, run_setup  # noqa: E402

NAMES = {"full": "full", "uniform": "LISA", "static": "static GRASS", "grass": "GRASS"}
"""integrations.grass.mode -> the method's name in the table."""
ALIASES = {"lisa": "uniform"}
OPTIMIZER_STATE_FIELD = "optimizer_state_bytes"
"""The metrics field of device-resident optimizer state (absent from records of older runs)."""
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/grass.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="launch/configs/smollm2_sft.toml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a config override for every method; repeatable")  # fmt: skip
    p.add_argument("--nproc", type=int, default=4, help="ranks per run (dp x sp)")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="train.seed (GRASS's draws follow it)")
    p.add_argument("--lr", type=float, default=None, help="optim.lr (default: the config's)")
    p.add_argument("--gamma", type=int, default=2, help="layers trained at a time")
    p.add_argument("--period", type=int, default=4, help="steps between draws")
    p.add_argument("--probe-steps", type=int, default=2, help="GRASS's gradient-only steps")
    p.add_argument("--methods", default="full,uniform,static,grass",
                   help="comma-separated: full, uniform (or lisa), static, grass")  # fmt: skip
    p.add_argument("--measure-memory", action="store_true",
                   help="train.measure_memory: each step's peak (~2x slower on CPU)")  # fmt: skip
    p.add_argument("--budget", default="3GiB", help="per-rank budget of the longest column")
    p.add_argument("--heldout", default=None, help="default: heldout.jsonl beside data.path")
    p.add_argument("--eval-limit", type=int, default=None, help="first N held-out problems")
    p.add_argument("--eval-threads", type=int, default=2, help="OMP threads of the evaluation")
    p.add_argument("--out", type=Path, default=Path("runs/grass_bench"))
    p.add_argument("--dry-run", action="store_true", help="print the commands; run nothing")
    args = p.parse_args(argv)
    modes = [ALIASES.get(m.strip(), m.strip()) for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in modes if m not in NAMES]
    if unknown or not modes:
        p.error(f"--methods: unknown {', '.join(unknown) or '(none)'}; use {', '.join(NAMES)}")
    if args.nproc < 1 or args.steps < 1:
        p.error("--nproc and --steps must be at least 1")
    args.modes = list(dict.fromkeys(modes))
    return args


def common_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides every method shares (the user's --set first: the flags win)."""
    out = [*args.set, f"train.steps={args.steps}", f"train.seed={args.seed}",
           f"train.measure_memory={str(args.measure_memory).lower()}",
           f"integrations.grass.gamma={args.gamma}", f"integrations.grass.period={args.period}",
           f"integrations.grass.probe_steps={args.probe_steps}"]  # fmt: skip
    if args.lr is not None:
        out.append(f"optim.lr={args.lr}")
    return out


def method_overrides(args: argparse.Namespace, mode: str) -> list[str]:
    folder = args.out / mode
    return [*common_overrides(args), f"integrations.grass.mode={mode}",
            f"train.save={folder / 'ckpt'}", f"train.metrics={folder / 'metrics.jsonl'}",
            "train.resume=", "train.progress=false"]  # fmt: skip


def commands(args: argparse.Namespace, mode: str, heldout: Path) -> dict[str, list[str]]:
    """The train, export and evaluate command lines of one method."""
    py, folder = sys.executable, args.out / mode
    train = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
             str(args.nproc), "-m", "paradyse.train", "--config", args.config]  # fmt: skip
    for override in method_overrides(args, mode):
        train += ["--set", override]
    evaluate = [py, "-m", "integrations.hf.evaluate", str(folder / "hf"), str(heldout),
                "--out", str(folder / "eval.json")]  # fmt: skip
    if args.eval_limit:
        evaluate += ["--limit", str(args.eval_limit)]
    return {
        "train": train,
        "export": [py, "-m", "integrations.hf.export", str(folder / "ckpt"), str(folder / "hf")],
        "evaluate": evaluate,
    }


def longest_lengths(args: argparse.Namespace, config) -> dict[str, int]:
    """Per method, the longest sequence the exact planner fits in --budget (see the docstring)."""
    sp = config.parallel.sp or args.nproc
    if args.nproc % sp:
        raise ValueError(f"--nproc {args.nproc} is not a multiple of parallel.sp={sp}")
    setup = exact_setup(run_setup(config, sp=sp, dp=args.nproc // sp, hardware=detect()))
    planner, layers = setup.planner("exact"), config.model.layers
    grass = config.integrations["grass"]
    if grass.gamma > layers:
        raise ValueError(f"--gamma {grass.gamma} exceeds the model's {layers} layers")
    frozen = list(range(grass.gamma, layers))
    out = {}
    for mode in args.modes:
        if mode == "full":
            planner.set_step()
        else:
            planner.set_step(frozen=frozen, offloaded=frozen if grass.offload else ())
        out[mode] = planner.longest_fitting()
    return out


def run_stage(name: str, command: list[str], log: Path, env: dict[str, str]) -> float:
    """Run one stage, its output in `log`; SystemExit with the log's tail if it fails."""
    start = time.perf_counter()
    with log.open("w") as file:
        done = subprocess.run(command, stdout=file, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"benchmarks/grass.py: {name} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def summarise(folder: Path) -> dict:
    """The table's numbers of one method from its metrics and evaluation."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    evaluation = json.loads((folder / "eval.json").read_text())
    rates = [r["tokens_per_s"] for r in records[1:] or records if r["tokens_per_s"]]
    peaks = [r["peak_bytes"] for r in records if r.get("peak_bytes")]
    states = [r[OPTIMIZER_STATE_FIELD] for r in records if r.get(OPTIMIZER_STATE_FIELD)]
    return {
        "steps": len(records),
        "final_train_loss": records[-1]["loss"],
        "heldout_loss": evaluation["heldout_loss"],
        "correct": evaluation["correct"],
        "n": evaluation["n"],
        "tokens_per_s": statistics.median(rates) if rates else None,
        "peak_bytes": max(peaks) if peaks else None,
        "predicted_peak_bytes": max(r["predicted_peak_bytes"] for r in records),
        "optimizer_state_bytes": max(states) if states else None,
    }


def _mib(value) -> str:
    return f"{value / 2**20:.0f}" if value else "-"


def table(results: dict[str, dict], longest: dict[str, int], budget: str) -> list[str]:
    with_state = any(r.get("optimizer_state_bytes") for r in results.values())
    head = ["method", "held-out loss", "exact match", "tokens/s", "peak MiB", "pred. MiB"]
    head += ["opt. state MiB"] * with_state + [f"longest@{budget}"]
    rows = [head]
    for mode, r in results.items():
        row = [NAMES[mode], f"{r['heldout_loss']:.4f}", f"{r['correct']}/{r['n']}",
               f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-",
               _mib(r["peak_bytes"]), _mib(r["predicted_peak_bytes"])]  # fmt: skip
        row += [_mib(r.get("optimizer_state_bytes"))] * with_state + [str(longest[mode])]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for row in rows:  # the method left-aligned, the numbers right-aligned
        cells = [c.rjust(w) for c, w in zip(row, widths, strict=True)]
        lines.append("  ".join([row[0].ljust(widths[0]), *cells[1:]]))
    return lines


def headline(results: dict[str, dict]) -> str:
    def ratio(other: str) -> str:
        if "grass" not in results or other not in results:
            return "n/a"
        return f"{results['grass']['heldout_loss'] / results[other]['heldout_loss']:.3f}x"

    return f"GRASS/full held-out loss = {ratio('full')}, GRASS/LISA = {ratio('uniform')}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)
    try:
        config, _ = with_pretrained_shape(load_config(args.config, common_overrides(args)))
        budgeted = apply_override(config, "parallel", memory_budget=args.budget)
        longest = longest_lengths(args, budgeted)
    except (ConfigError, InitError, ValueError) as error:
        print(f"benchmarks/grass.py: error: {error}", file=sys.stderr)
        return 2
    heldout = Path(args.heldout or Path(config.data.path).parent / "heldout.jsonl")
    if not args.dry_run and not heldout.is_file():
        print(f"benchmarks/grass.py: error: no held-out file {heldout}: pass --heldout",
              file=sys.stderr)  # fmt: skip
        return 2
    train_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    eval_env = {**os.environ, "OMP_NUM_THREADS": str(args.eval_threads)}
    results = {}
    for mode in args.modes:
        stages = commands(args, mode, heldout)
        if args.dry_run:
            print(f"# {NAMES[mode]} (longest@{args.budget}: {longest[mode]} tokens)")
            for command in stages.values():
                print(" ".join(command))
            continue
        folder = args.out / mode
        shutil.rmtree(folder, ignore_errors=True)  # no stale checkpoint, export or metrics
        folder.mkdir(parents=True)
        for name, command in stages.items():
            env = eval_env if name == "evaluate" else train_env
            seconds = run_stage(f"{name} of {NAMES[mode]}", command, folder / f"{name}.log", env)
            print(f"{NAMES[mode]}: {name} {seconds:.0f} s", flush=True)
        results[mode] = {**summarise(folder), "longest": longest[mode]}
    if args.dry_run:
        return 0
    info = {"config": args.config, "overrides": common_overrides(args), "nproc": args.nproc,
            "budget": args.budget, "heldout": str(heldout), "results": results}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(info, indent=1) + "\n")
    grass = config.integrations["grass"]
    print(f"\n{config.model.layers} layers, gamma {grass.gamma}, period {grass.period}, "
          f"probe_steps {grass.probe_steps}, offload {grass.offload}, {args.steps} steps, "
          f"seed {args.seed}, {args.nproc} ranks, budget {args.budget} per rank")  # fmt: skip
    for line in table(results, longest, args.budget):
        print(line)
    print(headline(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
