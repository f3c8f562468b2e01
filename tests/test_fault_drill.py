"""The elastic fault drill: under `torchrun --max-restarts 1` one rank is killed mid-run; torchrun
restarts the workers, they resume from the last checkpoint (`--save D --resume D`), and the
final loss equals an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .harness import REPO_ROOT
from .test_train_cli import TINY_FLAGS

STEPS = 10
FLAGS = [*TINY_FLAGS, "--steps", str(STEPS), "--set", "train.measure_memory=false",
         "--set", "train.progress=false"]  # fmt: skip


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", *args, "-m", "paradyse.train", *FLAGS]  # fmt: skip


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow  # a torchrun job killed and restarted, 26 s: run it with -m slow
def test_killed_rank_resumes_from_the_last_checkpoint(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight.jsonl"
    done = subprocess.run([*_torchrun(), "--metrics", str(straight)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    want = _records(straight)[-1]

    drill, save = tmp_path / "drill.jsonl", tmp_path / "ckpt"
    command = [*_torchrun("--max-restarts", "1"), "--metrics", str(drill), "--save", str(save),
               "--resume", str(save), "--set", "train.save_every=2"]  # fmt: skip
    job = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while len(_records(drill)) < 3 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.poll() is None, "the run ended before a rank could be killed"
    workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True)
    os.kill(int(workers.stdout.split()[-1]), signal.SIGKILL)  # one worker of the first attempt
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output[-3000:]
    assert "resumed from" in output, output[-3000:]
    records = _records(drill)  # the steps after the last checkpoint appear twice
    killed_after = max(r["step"] for r in records[:3])
    restart = next(i for i, r in enumerate(records) if i and r["step"] <= records[i - 1]["step"])
    assert records[restart]["step"] % 2 == 0 and records[restart]["step"] <= killed_after + 1
    assert records[-1]["step"] == STEPS - 1
    assert abs(records[-1]["loss"] - want["loss"]) <= 1e-5 * abs(want["loss"])
