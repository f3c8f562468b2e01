"""What a run reports: one JSONL record per step, a progress line on rank 0, and the summary.

Record fields (DESIGN 9, a contract): step, loss, tokens, seq_lens, plan, predicted_s, step_s,
predicted_peak_bytes, peak_bytes, tokens_per_s; and lr, grad_norm, layer_grad_norms (per
switchable layer, null when frozen), skipped (a non-finite gradient norm: no update),
updated (false for a gradient-only step), optimizer_state_bytes (AdamW state held on the
device, most loaded rank), loss_tokens, split,
budget_bytes, micro_batches ([{seq_lens, plan, predicted_s, predicted_peak_bytes}] of rank 0's
dp group). `plan` joins the micro-batches' plans with " ; ".
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import TextIO

from planners import format_bytes

from .engine import StepResult
from .moe_metrics import load_entropy

__all__ = ["step_record", "MetricsWriter", "Progress", "summary_lines", "relative_error"]


def step_record(result: StepResult, seq_lens: list[int], split: int, budget: float) -> dict:
    tokens = sum(seq_lens)
    moe = {"moe": result.moe} if result.moe is not None else {}
    return {
        "step": result.step,
        "loss": result.loss,
        "tokens": tokens,
        "seq_lens": list(seq_lens),
        "plan": " ; ".join(str(m.plan) for m in result.micro_batches),
        "predicted_s": result.predicted_s,
        "step_s": result.step_s,
        "predicted_peak_bytes": result.predicted_peak_bytes,
        "peak_bytes": result.peak_bytes if result.peak_bytes else None,
        "tokens_per_s": tokens / result.step_s if result.step_s > 0 else None,
        "lr": result.lr,
        "grad_norm": result.grad_norm,
        "layer_grad_norms": result.layer_grad_norms,
        "skipped": result.skipped,
        "updated": result.updated,
        "optimizer_state_bytes": result.optimizer_state_bytes,
        "loss_tokens": result.loss_tokens,
        "split": split,
        "budget_bytes": int(budget),
        "micro_batches": [
            {
                "seq_lens": list(m.seq_lens),
                "plan": str(m.plan),
                "group_size": m.plan.group_size,
                "predicted_s": m.plan.predicted_s,
                "predicted_peak_bytes": m.plan.predicted_peak_bytes,
            }
            for m in result.micro_batches
        ],
        **moe,
    }


class MetricsWriter:
    """Writes one JSON object per line to `path` (rank 0 only; flushed every record, so a
    crashed run keeps every finished step); a resumed run appends."""

    def __init__(self, path: str | None, append: bool = False) -> None:
        self.file: TextIO | None = None
        if path:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            self.file = target.open("a" if append else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class Progress:
    """A one-line bar rewritten in place on a terminal; a plain line per step otherwise."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def update(self, record: dict) -> None:
        if not self.enabled:
            return
        done = record["step"] + 1
        width = 20
        filled = width * done // max(1, self.total)
        bar = "#" * filled + "." * (width - filled)
        rate = record["tokens_per_s"] or 0.0
        line = (
            f"[{bar}] step {done}/{self.total} loss {record['loss']:.4f} "
            f"{record['tokens']} tok {rate:,.0f} tok/s {record['step_s']:.2f} s | {record['plan']}"
        )
        if self.tty:
            self.stream.write("\r\033[K" + line[:200])
            if done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def relative_error(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured


def summary_lines(records: list[dict], budget: float, skipped_first: bool = True) -> list[str]:
    """The end-of-run summary. The first step is left out of the prediction errors when there
    are others (it allocates the optimizer state and warms up the kernels)."""
    if not records:
        return ["no steps were run"]
    tokens = sum(r["tokens"] for r in records)
    seconds = sum(r["step_s"] for r in records)
    plans = Counter(m["plan"] for r in records for m in r["micro_batches"])
    judged = records[1:] if skipped_first and len(records) > 1 else records
    time_errors = [relative_error(r["predicted_s"], r["step_s"]) for r in judged]
    lines = [
        f"{len(records)} steps, {tokens} tokens in {seconds:.1f} s: {tokens / seconds:,.0f} "
        f"tokens/s; loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}",
        f"plans ({len(plans)} distinct over {sum(plans.values())} micro-batches):",
    ]
    for plan, count in plans.most_common(8):
        lines.append(f"  {count:>5} x {plan}")
    if len(plans) > 8:
        lines.append(f"  ... and {len(plans) - 8} more")
    skipped = sum(1 for r in records if r.get("skipped"))
    if skipped:
        lines.append(f"{skipped} steps skipped: their gradient norm was not finite")
    lines.append(
        f"step time: predicted vs measured median relative error "
        f"{100 * statistics.median(time_errors):.1f}% (predicted: the layers only)"
    )
    measured = [r for r in judged if r["peak_bytes"]]
    if measured:
        memory_errors = [relative_error(r["predicted_peak_bytes"], r["peak_bytes"])
                         for r in measured]  # fmt: skip
        worst = max(r["peak_bytes"] for r in records if r["peak_bytes"])
        lines.append(
            f"peak memory: predicted vs measured median relative error "
            f"{100 * statistics.median(memory_errors):.1f}%; highest {format_bytes(worst)} "
            f"of a {format_bytes(budget)} budget"
        )
    else:
        lines.append("peak memory: not measured (train.measure_memory = false)")
    return lines + _moe_lines(records)


def _moe_lines(records: list[dict]) -> list[str]:
    """Expert loads of the MoE layers over the run: per layer the entropy of its load summed over
    every step (of log E when balanced), its least and most loaded expert, the last aux loss."""
    with_moe = [r["moe"] for r in records if r.get("moe")]
    if not with_moe:
        return []
    last = with_moe[-1]
    lines = [
        f"MoE: aux loss {with_moe[0]['aux_loss']:.4f} -> {last['aux_loss']:.4f}, z-loss "
        f"{last['z_loss']:.4f}; expert load over the run (entropy of max "
        f"{last['max_entropy']:.3f}):"
    ]
    for i, layer in enumerate(last["layers"]):
        load = [sum(step["layers"][i]["load"][e] for step in with_moe)
                for e in range(len(layer["load"]))]  # fmt: skip
        idle = sum(1 for n in load if n == 0)
        lines.append(
            f"  layer {layer['layer']}: entropy {load_entropy(load):.3f}, tokens per expert "
            f"{min(load)}..{max(load)}" + (f", {idle} experts never chosen" if idle else "")
        )
    return lines
