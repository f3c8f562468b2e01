"""On CPU, `init_mesh` makes malloc keep freed memory, so a step's activations do not fault their
pages in again every micro-batch (parallel_lib.host_memory.keep_freed_host_memory)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .harness import REPO_ROOT

# Five rounds of what a training step does to the heap: large activations (12, 8 and 12 MiB)
# allocated, written and freed. The page faults of the rounds after a warm-up are counted.
SCRIPT = """
import os, resource, sys, torch
os.environ.pop("WORLD_SIZE", None)
if sys.argv[1] == "mesh":
    import paradyse
    assert paradyse.init_mesh().device.type == "cpu"
def rounds(n):
    for _ in range(n):
        held = [torch.ones(3 << 20), torch.ones(2 << 20), torch.ones(3 << 20)]
        del held
rounds(3)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(5)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120,
        cwd=REPO_ROOT, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_init_mesh_on_cpu_keeps_freed_memory_for_reuse() -> None:
    pages = 5 * (32 << 20) // 4096  # every round's 32 MiB faulted in again: 40,960 pages
    plain = _faults("plain")  # 6,000-18,000 here: glibc returns part of the memory each round
    if plain < pages // 20:
        pytest.skip(f"this host's malloc re-faults little without the setting ({plain} faults)")
    assert _faults("mesh") < pages // 50
