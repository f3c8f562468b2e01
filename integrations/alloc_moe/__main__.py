"""python -m integrations.alloc_moe profile | allocate | evaluate (docs/alloc_moe.md).

    profile CHECKPOINT --out S.json [--config CFG] [--set K=V] [--calibration-tokens N]
        Alloc-L's sensitivity profile S on calibration text of the run's corpus the checkpoint
        never trained on (L x K perplexity runs), written as JSON.
    allocate S.json --budget B
        The per-layer top-K_l of Alloc-L at budget B (activations per token, summed over layers).
    evaluate CHECKPOINT --sensitivity S.json [--budgets B,...] [--methods M,...] [--out R.json]
        Every method at every budget on held-out text: perplexity, activations per token counted
        in the MoE layers, expert-load Spearman and JS against the full model, correlation of
        experts kept with routing entropy, forward tokens/s (prefill-like and single-token rows).

CFG (default launch/configs/cpu_moe.toml) must be the training run's config: its data, seed
and batch size say which text the checkpoint saw. A bad input exits 2 with one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from paradyse.config import ConfigError, load_config

from . import METHODS, allocate_layers, moe_layers_of, save_sensitivity
from .allocate import sensitivity_matrix

DEFAULT_CONFIG = "launch/configs/cpu_moe.toml"
SEQ_LEN = 512


def _data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a ParaDySe checkpoint of an MoE model (or its folder)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="the training run's config")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN, help="tokens per sequence")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m integrations.alloc_moe",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    profile = sub.add_parser("profile", help="measure Alloc-L's sensitivity profile")
    _data_args(profile)
    profile.add_argument("--out", required=True, help="the sensitivity JSON to write")
    allocate = sub.add_parser("allocate", help="Alloc-L's top-K per layer at a budget")
    allocate.add_argument("sensitivity")
    allocate.add_argument("--budget", type=int, required=True)
    evaluate = sub.add_parser("evaluate", help="every method at every budget on held-out text")
    _data_args(evaluate)
    evaluate.add_argument("--sensitivity", required=True)
    evaluate.add_argument("--budgets", default="", help="comma-separated (default: 1/3, 1/2, "
                          "2/3 and 5/6 of L x K, rounded)")  # fmt: skip
    evaluate.add_argument("--methods", default=",".join(METHODS))
    evaluate.add_argument("--eval-tokens", type=int, default=32768)
    evaluate.add_argument("--out", default="", help="write the rows as JSON here")
    return parser


def default_budgets(full: int, layers: int) -> list[int]:
    """1/3, 1/2, 2/3 and 5/6 of L x K, rounded, at least L, each once."""
    budgets = [max(layers, round(full * f)) for f in (1 / 3, 1 / 2, 2 / 3, 5 / 6)]
    return sorted(set(budgets))


def _setup(args):
    from .evaluate import load_checkpoint_model, unseen_sequences

    config = load_config(args.config, args.set)
    model, step = load_checkpoint_model(args.checkpoint)
    calibration = unseen_sequences(config, step, args.calibration_tokens, args.seq_len)
    return config, model, step, calibration


def _profile(args) -> None:
    from .report import profile_sensitivity

    config, model, step, calibration = _setup(args)
    moe = moe_layers_of(model)
    print(f"profiling {len(moe.layers)} MoE layers x top-1..{moe.top_k} on "
          f"{sum(len(s) for s in calibration)} unseen tokens after step {step}")  # fmt: skip
    S = profile_sensitivity(model, calibration, args.batch_tokens)
    save_sensitivity(args.out, S, moe.layers, moe.top_k, calibration={
        "checkpoint": str(args.checkpoint), "config": args.config, "after_step": step,
        "tokens": sum(len(s) for s in calibration), "seq_len": args.seq_len,
    })  # fmt: skip
    print(f"wrote {args.out}")


def _allocate(args) -> None:
    record = json.loads(Path(args.sensitivity).read_text())
    S = sensitivity_matrix(record["S"])
    print(json.dumps(allocate_layers(S, args.budget)))


def _evaluate(args) -> None:
    from .evaluate import unseen_sequences
    from .report import evaluation_rows

    config, model, step, calibration = _setup(args)
    moe = moe_layers_of(model)
    skip = sum(len(s) for s in calibration)
    held_out = unseen_sequences(config, step, args.eval_tokens, args.seq_len, skip_tokens=skip)
    budgets = ([int(b) for b in args.budgets.split(",")] if args.budgets
               else default_budgets(moe.full_budget, len(moe.layers)))  # fmt: skip
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    rows = evaluation_rows(model, held_out, calibration, args.sensitivity, budgets, methods,
                           batch_tokens=args.batch_tokens)  # fmt: skip
    print_table(rows, moe)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


def print_table(rows: list[dict], moe) -> None:
    from .report import NAMES

    print(f"\n{len(moe.layers)} MoE layers, top-{moe.top_k} of {moe.experts} experts; budget "
          f"B = activations per token over the MoE layers (full: {moe.full_budget})")  # fmt: skip
    print("| B | method | perplexity | act./token | load Spearman | load JS | kept~entropy "
          "| prefill tok/s | 1-token rows tok/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']} | {NAMES[r['method']]} | {r['perplexity']:.4f} | "
              f"{r['activations_per_token']:.2f} | {r['load_spearman']:.3f} | "
              f"{r['load_js']:.4f} | {r['entropy_correlation']:.3f} | "
              f"{r['prefill_tokens_per_s']:,.0f} ({r['prefill_speedup']:.2f}x) | "
              f"{r['decode_tokens_per_s']:,.0f} ({r['decode_speedup']:.2f}x) |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        {"profile": _profile, "allocate": _allocate, "evaluate": _evaluate}[args.command](args)
    except (ConfigError, ValueError, OSError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
