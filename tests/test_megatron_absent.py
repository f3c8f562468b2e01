"""Without megatron-core the project is whole: the library imports, `integrations.megatron` says
how to install it, and the integration's tests skip with that reason. megatron-core is hidden
from fresh interpreters by a `sitecustomize` whose import hook refuses `megatron` (what a
machine without it sees), so this runs whether or not it is installed here.

The whole suite without it: `PYTHONPATH=DIR python -m pytest -q`, DIR holding that
sitecustomize.py (`hide_megatron(DIR)`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .harness import REPO_ROOT

HIDE = '''\
"""Hide megatron-core from this interpreter (tests/test_megatron_absent.py)."""
import sys


class _NoMegatron:
    def find_spec(self, name, path=None, target=None):
        if name == "megatron" or name.startswith("megatron."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)
        return None


sys.meta_path.insert(0, _NoMegatron())
'''


def hide_megatron(folder: Path) -> dict[str, str]:
    """Write the hiding sitecustomize.py into `folder`; the environment that loads it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(HIDE, encoding="utf-8")
    path = os.pathsep.join([str(folder), REPO_ROOT])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def test_the_library_imports_and_integrations_megatron_says_how_to_install(tmp_path) -> None:
    code = (
        "import paradyse, parallel_lib, planners, cost_models, integrations\n"
        "from paradyse.integration import available_integrations\n"
        "assert 'megatron' in available_integrations()\n"
        "try:\n"
        "    import megatron.core\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('megatron was not hidden')\n"
        "try:\n"
        "    import integrations.megatron\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, env=hide_megatron(tmp_path / "hide"), timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pip install -e '.[megatron]'" in done.stdout, done.stdout


def test_the_integration_tests_skip_with_the_reason(tmp_path) -> None:
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
               "tests/test_megatron.py"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                          env=hide_megatron(tmp_path / "hide"), timeout=300)  # fmt: skip
    # 5: pytest's "no tests collected", the module being skipped whole; a suite run passes
    assert done.returncode in (0, 5), done.stdout[-3000:]
    assert "1 skipped" in done.stdout and "passed" not in done.stdout, done.stdout[-2000:]
    assert "SKIPPED" in done.stdout and "megatron-core is not installed" in done.stdout, (
        done.stdout[-2000:]
    )
