"""The `paradyse-train` contract (DESIGN 9): per-step metrics, the memory budget respected and
switching plans under it, a static strategy that cannot fit failing before training with exit 3,
bad input failing with exit 2, every error one line on stderr, and one real end-to-end run.

Every run uses a tiny model and no cost-model profile (datasheet rates), so nothing is measured
before training. Multi-rank checks build a Trainer inside the shared gloo pool; a handful of
subprocesses check what only a real process shows (exit status, stderr, torchrun)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import paradyse.train
from paradyse.config import apply_override, load_config
from paradyse.train import DEFAULT_CONFIG
from paradyse.trainer import EXIT_MEMORY, EXIT_USAGE, RunError, Trainer
from planners import format_bytes, parse_bytes

from .harness import REPO_ROOT, run_distributed
from .layer_cases import mesh_for

TINY_MODEL = {
    "hidden": 64,
    "heads": 4,
    "kv_heads": 2,
    "head_dim": 16,
    "ffn_hidden": 128,
    "layers": 3,
}
TOKENS_PER_STEP = 4096
TINY = [f"model.{key}={value}" for key, value in TINY_MODEL.items()] + [
    f"data.tokens_per_step={TOKENS_PER_STEP}",
    "data.max_seq_len=2048",
    "data.tokens_per_rank=1024",
    "parallel.profile=",
    "train.progress=false",
]
TINY_FLAGS = [arg for item in TINY for arg in ("--set", item)]

TIGHT_SP2 = "9MiB"
"""At sp=2 (dp=1) the tiny model's weights, gradients and AdamW state take about 2 MiB per rank,
the leanest plan of a full 2048-token micro-batch (metp, full recompute) 7.4 MiB, and the fastest
plan everywhere (metp, no recompute) 17.8 MiB measured. 9 MiB sits between: the planner must
recompute on the fuller micro-batches and less or not at all on the lighter ones (3 distinct
plans over the first 10 steps of the stdlib corpus; measured peak 8.6 MiB)."""

TIGHT_SP1 = "6MiB"
"""At sp=1 the tiny model's static memory is about 2.2 MiB (so 6 MiB is not impossible) and a
full 1024-token micro-batch under `local` needs about 8.7 MiB (so it does not fit)."""

ERROR = "paradyse-train: error: "
DESIGN9_FIELDS = {
    "step": int,
    "loss": float,
    "tokens": int,
    "seq_lens": list,
    "plan": str,
    "predicted_s": float,
    "step_s": float,
    "predicted_peak_bytes": (int, float),
    "peak_bytes": (int, float),
    "tokens_per_s": float,
}


def _config(*overrides: str):
    return load_config(DEFAULT_CONFIG, [*TINY, *overrides])


def _cli(*args: str, launcher: tuple[str, ...] = ("-m", "paradyse.train"), timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, *launcher, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_error_line(stderr: str) -> str:
    """The single line stderr must hold, without its prefix."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(ERROR), f"stderr: {stderr!r}"
    return lines[0][len(ERROR) :]


def _byte_amounts(message: str) -> list[float]:
    return [parse_bytes(m) for m in re.findall(r"\d+(?:\.\d+)? [KMGT]iB", message)]


# ---------------------------------------------------------------- workers (every rank runs them)


def tight_budget_run(metrics_path: str) -> dict:
    logged: list[str] = []
    config = _config(
        "train.steps=10",
        "train.measure_memory=true",
        f"parallel.memory_budget={TIGHT_SP2}",
        f"train.metrics={metrics_path}",
    )
    trainer = Trainer(config, mesh=mesh_for(2), log=logged.append)
    records = trainer.run()
    return {
        "records": records,
        "summary": trainer.summary(),
        "logged": logged,
        "budget": trainer.budget_bytes,
        "split_len": trainer.split_len,
    }


def construct(overrides: tuple[str, ...], model: dict | None = None) -> tuple[int, str] | None:
    """(exit code, message) of the RunError that constructing a Trainer raises, or None.
    `model`: fields set together (apply_override), e.g. heads and kv_heads."""
    try:
        config = _config(*overrides)
        if model:
            config = apply_override(config, "model", **model)
        Trainer(config, mesh=mesh_for(2), log=lambda *_: None)
    except RunError as error:
        return error.code, str(error)
    return None


def construct_each(*cases: tuple[str, ...]) -> list[tuple[int, str] | None]:
    return [construct(overrides) for overrides in cases]


# ---------------------------------------------------------------- 1. the budget, plans, metrics


def test_tight_budget_switches_plans_and_is_respected(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    results = run_distributed(2, tight_budget_run, str(metrics))
    budget = parse_bytes(TIGHT_SP2)
    for rank, result in enumerate(results):
        assert result["budget"] == budget
        for r in result["records"]:
            assert r["peak_bytes"] is not None, f"rank {rank} step {r['step']}: not measured"
            assert r["peak_bytes"] <= budget, f"rank {rank} step {r['step']}: {r['peak_bytes']}"
            for m in r["micro_batches"]:
                assert m["predicted_peak_bytes"] <= budget, f"rank {rank}: {m}"
    ours = results[0]
    plans = {m["plan"] for r in ours["records"] for m in r["micro_batches"]}
    assert len(plans) >= 3, f"only {sorted(plans)} under {TIGHT_SP2}"

    lines = metrics.read_text(encoding="utf-8").splitlines()
    written = [json.loads(line) for line in lines]
    assert written == ours["records"]  # rank 0 writes exactly what run() returned
    assert [r["step"] for r in written] == list(range(10))
    for r in written:
        for key, kind in DESIGN9_FIELDS.items():
            assert isinstance(r[key], kind), f"step {r['step']}: {key}={r[key]!r}"
        lens = r["seq_lens"]
        assert lens and all(isinstance(n, int) and 1 <= n <= ours["split_len"] for n in lens)
        assert r["tokens"] == sum(lens) <= TOKENS_PER_STEP
        assert math.isfinite(r["loss"]) and 0 < r["loss"] < 10
        assert r["plan"] == " ; ".join(m["plan"] for m in r["micro_batches"])
        assert sorted(n for m in r["micro_batches"] for n in m["seq_lens"]) == sorted(lens)
        assert r["predicted_s"] > 0 and r["step_s"] > 0 and r["predicted_peak_bytes"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_s"])

    for summary in (ours["summary"], ours["logged"]):
        text = "\n".join(summary)
        assert re.search(r"step time: .*median relative error \d", text), text
        assert re.search(r"peak memory: .*median relative error \d", text), text
        assert f"{len(plans)} distinct" in text and format_bytes(budget) in text


# ---------------------------------------------------------------- 2. a static strategy too big


def test_static_strategy_that_cannot_fit_exits_3():
    """sp=1 has only `local`: below a full micro-batch's need it fails before training."""
    done = _cli(*TINY_FLAGS, "--strategy", "local", "--memory-budget", TIGHT_SP1)
    assert done.returncode == EXIT_MEMORY, done.stderr
    message = _one_error_line(done.stderr)
    assert "local" in message and format_bytes(parse_bytes(TIGHT_SP1)) in message
    need = max(_byte_amounts(message))
    assert need > parse_bytes(TIGHT_SP1), message
    assert "tokens/s" not in done.stdout  # it failed before training


def test_static_tp_sp_without_recompute_cannot_fit_where_adaptive_does():
    budget = f"parallel.memory_budget={TIGHT_SP2}"
    static = ("parallel.strategy=tp_sp", "parallel.recompute=none", budget)
    adaptive = ("parallel.strategy=adaptive", budget)
    for failure, success in run_distributed(2, construct_each, static, adaptive):
        assert success is None, success
        assert failure is not None
        code, message = failure
        assert code == EXIT_MEMORY and "\n" not in message
        assert "tp_sp" in message and format_bytes(parse_bytes(TIGHT_SP2)) in message
        assert max(_byte_amounts(message)) > parse_bytes(TIGHT_SP2), message


# ---------------------------------------------------------------- 3. bad input


def test_model_that_cannot_split_over_sp():
    """heads = kv_heads = 3 over sp=2 (set together with apply_override: --set cannot, see the
    xfail in test_config)."""
    for failure in run_distributed(2, construct, (), {"heads": 3, "kv_heads": 3}):
        assert failure is not None
        code, message = failure
        assert code == EXIT_USAGE and "\n" not in message
        assert "heads (3)" in message and "sp=2" in message


def test_model_that_cannot_split_under_torchrun_prints_once(tmp_path):
    config = tmp_path / "heads3.toml"
    model = {**TINY_MODEL, "heads": 3, "kv_heads": 3}
    lines = [f"{key} = {value}" for key, value in model.items()]
    config.write_text("\n".join(["[model]", *lines, "[parallel]", 'profile = ""', ""]))
    done = _cli(
        "--config",
        str(config),
        launcher=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                  "-m", "paradyse.train"),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr  # torchrun's own status when a worker fails
    output = done.stdout + done.stderr
    errors = [line for line in output.splitlines() if line.startswith(ERROR)]
    assert len(errors) == 1, output  # rank 0 only
    assert "heads (3)" in errors[0] and "sp=2" in errors[0]
    assert re.search(r"exitcode\W+2\b", done.stderr), done.stderr  # the workers' status


def test_impossible_budget_exits_3():
    done = _cli(*TINY_FLAGS, "--memory-budget", "1KiB")
    assert done.returncode == EXIT_MEMORY, done.stderr
    message = _one_error_line(done.stderr)
    assert "1.00 KiB" in message and "impossible" in message


@pytest.mark.parametrize(
    "args, names",
    [
        (["--set", "data.source=files", "--set", "data.path=/nonexistent.jsonl"], "nonexistent"),
        (["--set", "train.stpes=3"], "train.stpes"),
        (["--set", "optim.lr=0"], "optim.lr"),
        (["--config", "/nonexistent.toml"], "/nonexistent.toml"),
        (["--sp", "3"], "sp"),
        (["--memory-budget", "lots"], "--memory-budget"),
        (["--metrics", "/"], "metrics file"),
        (["--profile", "p-{host}.json"], "{sp}, {dtype} and {device}"),
        (["--steps", "0"], "train.steps"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, args, names):
    """In this process (no process group here: a world of one), through main() itself."""
    threads = torch.get_num_threads()  # main() sets the process's intra-op threads
    try:
        with pytest.raises(SystemExit) as info:
            paradyse.train.main([*TINY_FLAGS, *args])
    finally:
        torch.set_num_threads(threads)
    assert info.value.code == EXIT_USAGE
    out, err = capsys.readouterr()
    assert names in _one_error_line(err) and "tokens/s" not in out


def test_unknown_flag_value_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        paradyse.train.main(["--strategy", "fastest"])
    assert info.value.code == EXIT_USAGE
    last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse: usage, then the error
    assert last.startswith(ERROR) and "fastest" in last


# ---------------------------------------------------------------- 4. end to end


def test_end_to_end_single_process(tmp_path):
    metrics = tmp_path / "run.jsonl"
    done = _cli(*TINY_FLAGS, "--steps", "3", "--metrics", str(metrics))
    assert done.returncode == 0, done.stderr
    assert ERROR not in done.stderr
    records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert all(set(DESIGN9_FIELDS) <= set(r) for r in records)
    output = done.stdout + done.stderr
    assert "tokens/s" in output and output.count("median relative error") == 2, output
