"""The profiler and the validator: they run end to end, and user mistakes get one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from cost_models import CostModel, Profile, get_preset

from .harness import run_distributed
from .layer_cases import SHAPE, mesh_for

SUMMARY = re.compile(
    r"^time error: median \d+\.\d% worst \d+\.\d% \| memory error: median \d+\.\d% worst \d+\.\d%$"
)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=120
    )


def _one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_validate_refuses_a_profile_of_another_version(tmp_path) -> None:
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"schema": "paradyse.cost_profile", "version": 0}))
    _one_line_error(_run("cost_models.validate", "--profile", str(path)), "version", "profile")


def test_validate_refuses_a_corrupt_profile(tmp_path) -> None:
    path = tmp_path / "cut.json"
    path.write_text('{"schema": "paradyse.cost_profile", "version": 1, "matmul": [[1')
    _one_line_error(_run("cost_models.validate", "--profile", str(path)), "corrupt")


def test_validate_refuses_a_missing_profile(tmp_path) -> None:
    missing = tmp_path / "nope.json"
    _one_line_error(_run("cost_models.validate", "--profile", str(missing)), str(missing))


def test_profile_refuses_an_output_folder_that_does_not_exist(tmp_path) -> None:
    out = tmp_path / "no" / "such" / "folder" / "p.json"
    _one_line_error(_run("cost_models.profile", "--out", str(out)), "does not exist")


def _profile_and_validate(out: str) -> tuple[list, dict]:
    from cost_models.hardware import detect
    from cost_models.profile import measure_profile
    from cost_models.validate import summary, validate

    mesh = mesh_for()
    profile = measure_profile(mesh, SHAPE, max_tokens=64)
    if mesh.rank == 0:
        profile.save(out)
    model = CostModel(detect(), profile)
    cells = validate(mesh, SHAPE, model, ["tp_sp", "ring"], ["none", "full"], [48], 2, repeats=1)
    return [(c.measured_s, c.predicted_s, c.measured_bytes, c.predicted_bytes) for c in cells], {
        "summary": summary(cells),
        "groups": sorted(profile.collectives["all_gather"]),
    }


def test_profile_then_validate_on_two_ranks(tmp_path) -> None:
    out = tmp_path / "profile.json"
    cells, info = run_distributed(2, _profile_and_validate, str(out), timeout=300)[0]
    assert len(cells) == 4
    for measured_s, predicted_s, measured_bytes, predicted_bytes in cells:
        assert measured_s > 0 and predicted_s > 0
        assert measured_bytes > 0 and predicted_bytes > 0
    assert SUMMARY.match(info["summary"]), info["summary"]
    assert info["groups"] == [2]
    profile = Profile.load(out)  # the written file is a valid, current profile
    assert profile.machine["world_size"] == 2 and profile.reduce_scatter_copy
    assert set(profile.calibration) == {"tp_sp", "ulysses", "ring", "metp", "g1:local"}
    assert set(profile.calibration_points) >= {"tp_sp/none", "ring/full"}
    cost = CostModel(get_preset("cpu"), profile).layer_cost(SHAPE, "ring", "none", [40, 8], 2)
    assert cost.time_s > 0


def test_cost_models_imports_neither_torch_nor_the_project() -> None:
    """DESIGN 2: only the measuring entry points may import torch, parallel_lib and paradyse."""
    code = (
        "import sys, cost_models, cost_models.counts, cost_models.memory, cost_models.model, "
        "cost_models.static, cost_models.profile_data, cost_models.hardware\n"
        "bad = [m for m in ('torch', 'parallel_lib', 'paradyse', 'planners') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"cost_models imported {proc.stdout.strip()}"


def test_validate_refuses_bad_arguments_in_one_line(tmp_path) -> None:
    validate = "cost_models.validate"
    _one_line_error(_run(validate, "--tokens", "abc"), "--tokens", "abc")
    _one_line_error(_run(validate, "--tokens", "1", "--sequences", "2"), "--sequences 2")
    _one_line_error(_run(validate, "--heads", "0"), "--heads")
    _one_line_error(_run(validate, "--strategies", "sideways"), "sideways")
    _one_line_error(_run("cost_models.profile", "--out", str(tmp_path)), "is a folder")


def test_a_profile_of_another_dtype_is_refused(tmp_path) -> None:
    from cost_models.profile_data import Curve, LinkFit

    profile = Profile(
        machine={"dtype": "float32", "sp": 1},
        matmul=Curve([(1, 1e-6), (1e9, 1e-2)]),
        attention_forward=Curve([(1, 1e-6), (1e9, 1e-2)]),
        attention_backward=Curve([(1, 1e-6), (1e9, 1e-2)]),
        elementwise=LinkFit(0.0, 1e10),
        collectives={},
    )
    path = tmp_path / "f32.json"
    profile.save(path)
    message = _one_line_error(
        _run("cost_models.validate", "--profile", str(path), "--dtype", "bfloat16"), "bfloat16"
    )
    assert "--dtype bfloat16" in message
    model = CostModel(get_preset("cpu"), profile)
    with pytest.raises(ValueError, match="profile again with --dtype bfloat16"):
        model.layer_cost(SHAPE, "local", "none", [8], 1, dtype="bfloat16")
