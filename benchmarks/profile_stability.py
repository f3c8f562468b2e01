"""Does a profile hold? Measure this machine's cost-model profile twice, back to back, and print
the ratio between the two for every coefficient.

    python benchmarks/profile_stability.py [--config launch/configs/cpu_tiny.toml] [--nproc 4]
        [--runs 2] [--load 0] [--quiet-wait 0] [--out-dir runs/profile_stability] [--budget B]
    python benchmarks/profile_stability.py --compare A.json B.json [--config ...] [--budget B]

Each run is `torchrun --standalone --nproc-per-node NPROC -m cost_models.profile` with the
config's layer shape and the trainer's longest measured sequence (data.max_seq_len, 64 to
8192), as `make run` measures its profile; OMP_NUM_THREADS=1. `--load K` keeps K busy Python
loops running beside the profiles (a busy machine, which the profiler must flag);
`--quiet-wait S` waits up to S seconds before each run for the 1-minute load average to fall
under the cores the ranks leave free (+0.5; a previous run's own load lingers in it).

The table: per coefficient the first and second value, second / first, and each run's spread;
a curve's row is the geometric mean of the ratios at the first profile's points (what "within
10%" judges), with its worst point beside it; the overlap (a fraction) shows its difference.
The elementwise latency is left out: the model prices elementwise traffic by bandwidth only.
Its last line is
    N of M coefficients within 10% (worst: NAME X.XXx)

Then what the planner does with each profile (`benchmarks/profile_choices.py`): every uniform
option priced under both on micro-batches of 64 tokens up to the longest measured, within
`--budget` (default: the config's), the ratio of the two predictions per option and length,
each profile's pick per length and the regret of choosing by the other profile. The last line:
    choices: the same option at N of M lengths; worst regret +X.X% (KxL tokens)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if not __package__:  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.profile_choices import (  # noqa: E402
    batch_shapes,
    compare_choices,
    format_choices,
    option_times,
)
from cost_models import detect  # noqa: E402
from cost_models.profile_data import Profile  # noqa: E402
from cost_models.stability import load_allowance, usable_cpus  # noqa: E402
from paradyse.config import load_config  # noqa: E402

CURVES = ("matmul", "attention_forward", "attention_backward", "attention_forward_full",
          "attention_backward_full")  # fmt: skip
AGREE = 0.10


@dataclass
class Row:
    name: str
    first: float
    second: float
    ratio: float
    """second / first (the overlap: second - first)."""
    worst: float | None = None
    """A curve's point ratio farthest from 1."""
    spreads: tuple = (None, None)

    @property
    def agrees(self) -> bool:
        """Within 10%: the ratio (a curve's geometric mean over its points), or the overlap's
        difference."""
        if self.name == "overlap":
            return abs(self.ratio) <= AGREE
        return max(self.ratio, 1 / self.ratio) <= 1 + AGREE


def _coefficients(p: Profile) -> dict[str, float]:
    """The scalar coefficients the model prices with (not the elementwise alpha: unused)."""
    values = {"elementwise.beta": p.elementwise.beta}
    for kind, fits in p.collectives.items():
        for size, fit in sorted(fits.items()):
            values[f"{kind}/{size}.alpha"] = fit.alpha
            values[f"{kind}/{size}.beta"] = fit.beta
    for name, (forward, backward) in p.calibration.items():
        values[f"calibration/{name}.forward"] = forward
        values[f"calibration/{name}.backward"] = backward
    return values


def ratio_rows(a: Profile, b: Profile) -> list[Row]:
    """One row per coefficient the two profiles share."""
    rows = []
    for name in CURVES:
        ca, cb = getattr(a, name), getattr(b, name)
        if ca is None or cb is None:
            continue
        ratios = [cb(x) / t for x, t in ca.points]
        mean = math.exp(statistics.fmean(math.log(r) for r in ratios))
        worst = max(ratios, key=lambda r: abs(math.log(r)))
        rows.append(Row(name, float("nan"), float("nan"), mean, worst,
                        (a.spread.get(name), b.spread.get(name))))  # fmt: skip
    va, vb = _coefficients(a), _coefficients(b)
    for name in sorted(va.keys() & vb.keys()):  # sorted here: a set's order varies by process
        ratio = vb[name] / va[name] if va[name] else (1.0 if vb[name] == va[name] else math.inf)
        rows.append(Row(name, va[name], vb[name], ratio, None,
                        (a.spread.get(name), b.spread.get(name))))  # fmt: skip
    if a.collectives:  # the overlap is measured where there are collectives
        rows.append(Row("overlap", a.overlap, b.overlap, b.overlap - a.overlap, None,
                        (a.spread.get("overlap"), b.spread.get("overlap"))))  # fmt: skip
    return rows


def _pct(value) -> str:
    return "" if value is None else f"{value:.0%}"


def format_table(rows: list[Row]) -> str:
    lines = ["| coefficient | first | second | second / first | worst point | spread 1 | "
             "spread 2 | within 10% |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ratio = f"{r.ratio:+.2f}" if r.name == "overlap" else f"{r.ratio:.2f}x"
        first, second = ("", "") if math.isnan(r.first) else (f"{r.first:.3g}", f"{r.second:.3g}")
        worst = "" if r.worst is None else f"{r.worst:.2f}x"
        lines.append(f"| {r.name} | {first} | {second} | {ratio} | {worst} | "
                     f"{_pct(r.spreads[0])} | {_pct(r.spreads[1])} | "
                     f"{'yes' if r.agrees else 'NO'} |")  # fmt: skip
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    def drift(r: Row) -> float:
        return abs(r.ratio) if r.name == "overlap" else abs(math.log(r.ratio))

    worst = max(rows, key=drift)
    shown = f"{worst.ratio:+.2f}" if worst.name == "overlap" else f"{worst.ratio:.2f}x"
    return (f"{sum(r.agrees for r in rows)} of {len(rows)} coefficients within 10% "
            f"(worst: {worst.name} {shown})")  # fmt: skip


def _wait_quiet(seconds: float, nproc: int) -> None:
    allowance, end = load_allowance(usable_cpus(), nproc), time.time() + seconds
    while time.time() < end and os.getloadavg()[0] > allowance:
        time.sleep(5)


def _profile(out: Path, args, shape, max_tokens: int) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.nproc}", "-m", "cost_models.profile", "--out", str(out),
               "--hidden", str(shape.hidden), "--heads", str(shape.heads), "--kv-heads",
               str(shape.kv_heads), "--head-dim", str(shape.head_dim), "--ffn",
               str(shape.ffn_hidden), "--dtype", args.dtype,
               "--max-tokens", str(max_tokens)]  # fmt: skip
    load = os.getloadavg()
    print(f"$ {' '.join(command[2:])}   (load average {load[0]:.2f} {load[1]:.2f})", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith(("wrote", "spread:", "warning:", "python -m cost_models.profile")):
            print("  " + line)
    if proc.returncode:
        sys.exit(f"the profiler failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")


def _choice_setting(profile: Profile, config) -> tuple[int, int]:
    """(sp, longest tokens) of the choices: the profile's, which must have been measured for the
    config's model (SystemExit, one line, otherwise)."""
    machine, shape = profile.machine, config.model.shape
    wanted = [shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.ffn_hidden]
    if machine.get("shape") not in (None, wanted) or machine.get("dtype") != config.train.dtype:
        sys.exit(f"profile_stability.py: the profiles were measured for shape "
                 f"{machine.get('shape')} in {machine.get('dtype')}, the config's model is "
                 f"{wanted} in {config.train.dtype}: pass --config of the profiled "
                 "model")  # fmt: skip
    if "sp" not in machine:
        sys.exit("profile_stability.py: the profile does not record its sp (an older file): "
                 "measure it again to compare the choices")  # fmt: skip
    return machine["sp"], machine.get("max_tokens", 8192)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="launch/configs/cpu_tiny.toml")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--load", type=int, default=0, help="busy loops to run beside the profiles")
    p.add_argument("--quiet-wait", type=float, default=0.0)
    p.add_argument("--out-dir", default="runs/profile_stability")
    p.add_argument("--compare", nargs=2, metavar="JSON", help="only compare two profiles")
    p.add_argument("--budget", help="memory budget per rank of the choices (default: config's)")
    args = p.parse_args(argv)
    config = load_config(args.config, [f"parallel.memory_budget={args.budget}"] * bool(args.budget))
    if args.compare:
        paths = [Path(x) for x in args.compare]
    else:
        args.dtype = config.train.dtype
        max_tokens = max(64, min(8192, config.data.max_seq_len))  # as the trainer measures
        folder = Path(args.out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                 for _ in range(args.load)]  # fmt: skip
        paths = [folder / f"profile-{i + 1}.json" for i in range(args.runs)]
        try:
            for path in paths:
                _wait_quiet(args.quiet_wait, args.nproc)
                _profile(path, args, config.model.shape, max_tokens)
        finally:
            for loop in loops:
                loop.kill()
                loop.wait()
    profiles = [Profile.load(path) for path in paths]
    for path, profile in zip(paths, profiles, strict=True):
        c = profile.conditions
        if c:
            print(f"{path}: load average {c['load_before']} before, {c['load_after']} after; "
                  f"other processes {c['other_cpu']} cores; {c['seconds']} s")  # fmt: skip
    if len(profiles) >= 2:
        rows = ratio_rows(profiles[0], profiles[1])
        print(format_table(rows))
        print(summary(rows))
        sp, longest = _choice_setting(profiles[0], config)
        batches = batch_shapes(sp, longest)
        tables = [option_times(config, sp, detect(), p, batches) for p in profiles[:2]]
        for line in format_choices(*compare_choices(*tables, batches), batches):
            print(line)


if __name__ == "__main__":
    main()
