"""Alloc-MoE's evaluation on the MoE model that launch/configs/cpu_moe.toml trains.

    python benchmarks/alloc_moe.py [--checkpoint runs/moe_bench/moe/ckpt]
        [--config launch/configs/cpu_moe.toml] [--set SECTION.KEY=VALUE ...]
        [--sensitivity runs/alloc_moe/sensitivity.json] [--budgets B,...]
        [--eval-tokens 32768] [--calibration-tokens 16384] [--out runs/alloc_moe]

The checkpoint is benchmarks/moe.py's (train it first). The sensitivity profile is measured
when its file is missing (`python -m integrations.alloc_moe profile`), on calibration text of the
run's corpus after the trained batches; the evaluation text follows it (both unseen). For every
budget (default 1/3, 1/2, 2/3 and 5/6 of L x K) and method: perplexity, the activations per token
counted in the MoE layers, expert-load Spearman and JS divergence against the full model, the
correlation of experts kept with routing entropy, forward tokens/s on a prefill-like micro-batch
and on 256 single-token rows (ratios to the full routing, timed interleaved).
Last line: `Alloc-L+T beats uniform at N of M budgets; beats every baseline at K of M`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if not __package__:  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from integrations.alloc_moe.__main__ import main as alloc_main  # noqa: E402

BASELINES = ("uniform", "top_p", "naee")


def summary(rows: list[dict]) -> str:
    """The last line: at how many budgets Alloc-L+T's perplexity is below uniform's and below
    every baseline's."""
    budgets = sorted({r["budget"] for r in rows if r["method"] != "full"})
    ppl = {(r["budget"], r["method"]): r["perplexity"] for r in rows}
    beats_uniform = sum(ppl[b, "alloc_lt"] < ppl[b, "uniform"] for b in budgets)
    beats_all = sum(all(ppl[b, "alloc_lt"] < ppl[b, m] for m in BASELINES) for b in budgets)
    return (f"Alloc-L+T beats uniform at {beats_uniform} of {len(budgets)} budgets; beats every "
            f"baseline at {beats_all} of {len(budgets)}")  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/moe_bench/moe/ckpt")
    parser.add_argument("--config", default="launch/configs/cpu_moe.toml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--sensitivity", default="")
    parser.add_argument("--budgets", default="")
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--out", default="runs/alloc_moe")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [args.checkpoint, "--config", args.config,
              "--calibration-tokens", str(args.calibration_tokens),
              *[a for s in args.set for a in ("--set", s)]]  # fmt: skip
    sensitivity = args.sensitivity or str(out / "sensitivity.json")
    if not Path(sensitivity).is_file() and alloc_main(["profile", *common, "--out", sensitivity]):
        sys.exit(2)
    rows_path = out / "rows.json"
    argv = ["evaluate", *common, "--sensitivity", sensitivity,
            "--eval-tokens", str(args.eval_tokens), "--out", str(rows_path)]  # fmt: skip
    if args.budgets:
        argv += ["--budgets", args.budgets]
    if alloc_main(argv):
        sys.exit(2)
    print(summary(json.loads(rows_path.read_text())))


if __name__ == "__main__":
    main()
