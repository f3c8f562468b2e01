"""The small MoE of launch/configs/cpu_moe.toml against a dense model with the same active
parameters per token, trained the same way.

    python benchmarks/moe.py [--config launch/configs/cpu_moe.toml] [--nproc 4] [--steps 40]
        [--seed 0] [--set SECTION.KEY=VALUE ...] [--out runs/moe_bench] [--dry-run]

Both runs are `torchrun --standalone --nproc-per-node N -m paradyse.train` on the same config,
data, steps and seed; the dense one is the same config with `model.moe=none` and `model.ffn_hidden`
set to the MoE layer's active width (top_k x expert_ffn_hidden + the shared experts' width).
Outputs: OUT/{moe,dense}/ (log, metrics.jsonl, ckpt/: the MoE checkpoint is what
`integrations.alloc_moe` evaluates) and OUT/results.json.

Columns: parameters (all, and active per token: the routed experts a token keeps and the rest);
tokens/s (median over the steps after the first, from the metrics); the training loss at the
first step, and the mean over the last 5 steps; for the MoE, the aux loss at the first and the last
step, and per MoE layer the entropy of its expert load over the run (log E = even) and its least
loaded expert's pairs over the run (0 = an expert never chosen).
Last line: `MoE/dense: final loss X.XXXx, tokens/s Y.YYYx`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

if not __package__:  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paradyse.config import ConfigError, load_config  # noqa: E402
from paradyse.metrics import load_entropy  # noqa: E402

LAST = 5
"""Steps the final loss is averaged over."""


def parameter_counts(model) -> tuple[int, int]:
    """(all parameters, active per token) of a ModelConfig, embedding and head included."""
    H, d = model.hidden, model.head_dim
    attn = H * d * (2 * model.heads + 2 * model.kv_heads) + 2 * H
    dense_mlp = 3 * H * model.ffn_hidden
    embed = model.vocab * H * (1 if model.tie_embeddings else 2) + H
    total = active = embed + model.layers * attn
    for i in range(model.layers):
        if model.moe_layer(i):
            m = model.moe
            shared = 3 * H * m.shared_experts * m.expert_ffn_hidden
            expert = 3 * H * m.expert_ffn_hidden
            total += m.experts * H + m.experts * expert + shared
            active += m.experts * H + m.top_k * expert + shared
        else:
            total += dense_mlp
            active += dense_mlp
    return total, active


def _train(name: str, args, sets: list[str], out: Path) -> list[dict]:
    folder = out / name
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={args.nproc}", "-m", "paradyse.train", "--config", args.config,
        *[a for s in sets for a in ("--set", s)],
        "--set", f"train.steps={args.steps}", "--set", f"train.seed={args.seed}",
        "--set", f"train.metrics={folder / 'metrics.jsonl'}",
        "--set", f"train.save={folder / 'ckpt'}", "--set", "train.progress=false",
    ]  # fmt: skip
    print(" ".join(command), flush=True)
    if args.dry_run:
        return []
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with open(folder / "train.log", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    if done.returncode:
        sys.exit(f"{name} run failed (exit {done.returncode}); see {folder / 'train.log'}")
    return [json.loads(line) for line in open(folder / "metrics.jsonl")]


def _row(records: list[dict]) -> dict:
    speeds = [r["tokens_per_s"] for r in records[1:] if r["tokens_per_s"]]
    row = {
        "tokens_per_s": statistics.median(speeds),
        "first_loss": records[0]["loss"],
        "final_loss": statistics.mean(r["loss"] for r in records[-LAST:]),
    }
    moe = [r["moe"] for r in records if r.get("moe")]
    if moe:
        row["aux"] = (moe[0]["aux_loss"], moe[-1]["aux_loss"])
        row["layers"] = []
        for i, layer in enumerate(moe[-1]["layers"]):
            load = [sum(s["layers"][i]["load"][e] for s in moe) for e in range(len(layer["load"]))]
            row["layers"].append({"layer": layer["layer"], "entropy": load_entropy(load),
                                  "min_load": min(load), "max_load": max(load)})  # fmt: skip
        row["max_entropy"] = moe[-1]["max_entropy"]
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="launch/configs/cpu_moe.toml")
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", default="runs/moe_bench")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.set)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    model = config.model
    if model.moe is None:
        sys.exit(f"error: {args.config} has no [model.moe] table")
    m = model.moe
    width = m.top_k * m.expert_ffn_hidden + m.shared_experts * m.expert_ffn_hidden
    dense_sets = [*args.set, "model.moe=none", f"model.ffn_hidden={width}"]
    dense_model = load_config(args.config, dense_sets).model
    out = Path(args.out)
    runs = {"moe": _train("moe", args, args.set, out),
            "dense": _train("dense", args, dense_sets, out)}  # fmt: skip
    if args.dry_run:
        return
    rows = {name: _row(records) for name, records in runs.items()}
    for name, cfg in (("moe", model), ("dense", dense_model)):
        rows[name]["parameters"], rows[name]["active_parameters"] = parameter_counts(cfg)
    print(f"\n{args.nproc} ranks, {args.steps} steps, seed {args.seed}, {args.config}")
    print("| model | parameters | active / token | tokens/s | loss, step 1 | loss, last 5 |")
    print("|---|---|---|---|---|---|")
    for name, label in (("moe", f"MoE {m.experts}x{m.expert_ffn_hidden} top-{m.top_k}"),
                        ("dense", f"dense ffn {width}")):  # fmt: skip
        r = rows[name]
        cells = [
            label,
            f"{r['parameters']:,}",
            f"{r['active_parameters']:,}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['first_loss']:.4f}",
            f"{r['final_loss']:.4f}",
        ]
        print("| " + " | ".join(cells) + " |")
    moe = rows["moe"]
    print(f"\nMoE aux loss {moe['aux'][0]:.4f} -> {moe['aux'][1]:.4f}; expert load over the run "
          f"(entropy of max {moe['max_entropy']:.3f}):")  # fmt: skip
    for layer in moe["layers"]:
        print(f"  layer {layer['layer']}: entropy {layer['entropy']:.3f}, pairs per expert "
              f"{layer['min_load']:,}..{layer['max_load']:,}")  # fmt: skip
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    d = rows["dense"]
    print(
        f"MoE/dense: final loss {moe['final_loss'] / d['final_loss']:.3f}x, "
        f"tokens/s {moe['tokens_per_s'] / d['tokens_per_s']:.3f}x"
    )


if __name__ == "__main__":
    main()
