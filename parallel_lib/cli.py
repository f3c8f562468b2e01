"""Small helpers the command-line tools share: threads per rank, the layer-shape flags, integer
lists and the one-line error exit. argparse lives in the entry points; these only fill it in."""

from __future__ import annotations

import argparse
import os
import sys

from .shape import LayerShape

__all__ = ["threads_from_env", "add_shape_arguments", "shape_from", "int_list", "fail"]


def threads_from_env() -> int:
    """Intra-op threads per rank: OMP_NUM_THREADS when it is a positive integer, else 1."""
    value = os.environ.get("OMP_NUM_THREADS", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def add_shape_arguments(p: argparse.ArgumentParser) -> None:
    """--hidden --heads --kv-heads --head-dim --ffn --dtype, read back by `shape_from`."""
    p.add_argument("--hidden", type=int, default=256, help="model width H")
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads")
    p.add_argument("--head-dim", type=int, default=None, help="default: hidden / heads")
    p.add_argument("--ffn", type=int, default=704, help="SwiGLU width F")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def shape_from(args: argparse.Namespace) -> LayerShape:
    """The LayerShape of the shape flags; ValueError, one line, for an impossible one."""
    for flag, value in (("--hidden", args.hidden), ("--heads", args.heads),
                        ("--kv-heads", args.kv_heads), ("--ffn", args.ffn)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{flag} must be positive, got {value}")
    if args.head_dim is None and args.hidden % args.heads:
        raise ValueError(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
    head_dim = args.head_dim or args.hidden // args.heads
    return LayerShape(args.hidden, args.heads, args.kv_heads, head_dim, args.ffn)


def int_list(flag: str, text: str) -> list[int]:
    """Comma-separated integers of a flag; ValueError, one line naming the flag, otherwise."""
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None


def fail(prog: str, message: str, code: int = 2) -> None:
    """One line on stderr from rank 0, and exit."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(code)
