"""`paradyse-train` (also `python -m paradyse.train`): train under torchrun or as one process.

    paradyse-train --config launch/configs/cpu_tiny.toml [--set section.key=value ...]
        [--sp P] [--strategy adaptive|local|tp_sp|ulysses|ring|usp|metp]
        [--planner exact|paradyse] [--recompute none|selective|full]
        [--memory-budget 512MiB] [--steps N] [--seed S] [--metrics FILE.jsonl]
        [--save DIR] [--resume DIR] [--profile FILE.json] [--init hf:PATH]

Exit status: 0 done; 2 a bad config, flag, data path or model shape; 3 the memory budget fits
no plan, or the chosen static strategy cannot fit it. Errors are one line on stderr (rank 0).
Under torchrun the launcher itself exits 1 when a worker fails; the worker's line is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from parallel_lib import RECOMPUTE_MODES, STRATEGY_NAMES
from parallel_lib.cli import threads_from_env

from .config import ConfigError, load_config
from .trainer import RunError, Trainer

__all__ = ["main", "parser", "DEFAULT_CONFIG"]

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "launch" / "configs" / "cpu_tiny.toml"
"""The default configuration; without it (an installed wheel) the built-in defaults, which
equal it except that no cost-model profile is measured."""

_FLAGS = {  # flag destination -> (section, key)
    "sp": ("parallel", "sp"),
    "strategy": ("parallel", "strategy"),
    "planner": ("parallel", "planner"),
    "recompute": ("parallel", "recompute"),
    "memory_budget": ("parallel", "memory_budget"),
    "profile": ("parallel", "profile"),
    "steps": ("train", "steps"),
    "seed": ("train", "seed"),
    "metrics": ("train", "metrics"),
    "save": ("train", "save"),
    "resume": ("train", "resume"),
    "init": ("model", "init"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="paradyse-train",
        description="Train a decoder LLM with per-micro-batch, per-layer strategy switching.",
        epilog="Exit status: 0 done, 2 bad input, 3 the memory budget cannot be met.",
    )
    p.add_argument("--config", help=f"TOML config (default: {DEFAULT_CONFIG.name})")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field; repeatable")  # fmt: skip
    p.add_argument("--sp", type=int, help="switchable group size (default: the world size)")
    p.add_argument("--strategy", choices=("adaptive", *STRATEGY_NAMES),
                   help="adaptive: the planner; a name: that strategy everywhere")  # fmt: skip
    p.add_argument("--planner", choices=("exact", "paradyse"), help="method used by adaptive")
    p.add_argument("--recompute", choices=RECOMPUTE_MODES,
                   help="force a recompute mode (default: the planner decides)")  # fmt: skip
    p.add_argument("--memory-budget", metavar="BYTES",
                   help="per-rank budget the planner respects, e.g. 512MiB "
                        "(default: the device's memory)")  # fmt: skip
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--seed", type=int, help="seed of the weights and the data order")
    p.add_argument("--metrics", metavar="FILE.jsonl", help="one JSON record per step")
    p.add_argument(
        "--save", metavar="DIR", help="checkpoint here (train.save_every, and at the end)"
    )
    p.add_argument("--resume", metavar="DIR", help="continue from a checkpoint (or DIR/latest)")
    p.add_argument("--profile", metavar="FILE.json",
                   help="cost-model profile; measured here and written if missing")  # fmt: skip
    p.add_argument("--init", metavar="hf:PATH",
                   help="start from a Hugging Face Llama folder or GGUF file (its config sets "
                        "the model's shape)")  # fmt: skip
    return p


def _overrides(args: argparse.Namespace) -> list[str]:
    """--set values, then the dedicated flags (which win)."""
    out = list(args.set)
    for dest, (section, key) in _FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            out.append(f"{section}.{key}={value}")
    return out


def _fail(message: str, code: int) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"paradyse-train: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    trainer = None
    try:
        path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
        config = load_config(path, _overrides(args))
        torch.set_num_threads(threads_from_env())
        trainer = Trainer(config)
        trainer.run()
    except ConfigError as error:
        _fail(str(error), 2)
    except RunError as error:
        _fail(str(error), error.code)
    finally:
        if trainer is not None:
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
