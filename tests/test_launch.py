"""The launchers: launch/run_local.sh and the SLURM template, each run for real on 2 CPU ranks
(the template with `srun` and `scontrol` stood in by shims, as on a one-node allocation), and
the GPU configs, which must load and fit their per-GPU budget on the hardware they are for."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cost_models import get_preset
from paradyse import load_config
from paradyse.planning import run_method, run_setup

from .harness import REPO_ROOT
from .test_train_cli import TINY_FLAGS

ROOT = Path(REPO_ROOT)
RUN_FLAGS = [*TINY_FLAGS, "--steps", "2", "--set", "train.measure_memory=false"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_trained(done: subprocess.CompletedProcess) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "2 steps" in output and "tokens/s" in output, output[-3000:]


def test_run_local_trains_on_two_cpu_ranks() -> None:
    done = subprocess.run(
        ["bash", "launch/run_local.sh", *RUN_FLAGS], cwd=ROOT, env=_env(NPROC="2"),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    _check_trained(done)


def test_slurm_template_runs_its_torchrun_line_on_two_cpu_ranks(tmp_path) -> None:
    shims = tmp_path / "bin"
    shims.mkdir()
    # scontrol show hostnames <list> -> this host; srun <options> cmd... -> cmd... (one task)
    (shims / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    (shims / "srun").write_text(
        '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n'
    )
    for shim in shims.iterdir():
        shim.chmod(0o755)
    env = _env(
        PATH=f"{shims}:{os.environ['PATH']}", SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1",
        SLURM_GPUS_PER_NODE="cpu:2", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(ROOT),
        PORT=str(_free_port()), CONFIG="launch/configs/cpu_tiny.toml",
    )  # fmt: skip
    spooled = tmp_path / "slurm_script"  # sbatch runs a copy of the script, elsewhere
    spooled.write_text((ROOT / "launch" / "slurm" / "train.sbatch").read_text())
    done = subprocess.run(
        ["bash", str(spooled), *RUN_FLAGS], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    _check_trained(done)


def test_slurm_template_has_one_line_each_for_nodes_gpus_and_config() -> None:
    text = (ROOT / "launch" / "slurm" / "train.sbatch").read_text()
    marked = [line for line in text.splitlines() if "# <-" in line and not line.startswith("# ")]
    assert [line.split()[1].split("=")[0] if line.startswith("#SBATCH") else line.split("=")[0]
            for line in marked] == ["--nodes", "--gpus-per-node", "CONFIG"]  # fmt: skip


@pytest.mark.parametrize(
    "name, hardware, dp", [("llama_7b", "h100-sxm", 1), ("llama_70b", "h100-sxm", 4),
                           ("llama_70b", "a100-80g-nvlink", 4)],
)  # fmt: skip
def test_gpu_configs_fit_their_gpus(name, hardware, dp) -> None:
    """Each config's fullest micro-batch (one max_seq_len sequence) plans within an 80-GB GPU
    at its sp, for the dp its comment names; the planner is the run's own."""
    config = load_config(ROOT / "launch" / "configs" / f"{name}.toml")
    sp = config.parallel.sp
    assert config.model.sp_problem(sp) is None
    assert config.data.tokens_per_rank * sp == config.data.max_seq_len
    setup = run_setup(config, sp=sp, dp=dp, hardware=get_preset(hardware))
    planner = setup.planner(run_method(config))
    assert planner.fits([config.data.max_seq_len])
    assert planner.longest_fitting(1 << 21) >= config.data.max_seq_len
