"""The profiler and the validator: they run end to end, and user mistakes get one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cost_models import CostModel, Profile, get_preset
from cost_models.stability import drifted

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


def _scaled(profile: Profile, k: float) -> Profile:
    """The profile with every time k x: curves' times, latencies, and bandwidths / k."""
    data = profile.to_dict()
    for key in ("matmul", "attention_forward", "attention_backward"):
        data[key] = [[x, t * k] for x, t in data[key]]
    links = [data["elementwise"], *(f for t in data["collectives"].values() for f in t.values())]
    for fit in links:
        fit["alpha"], fit["beta"] = fit["alpha"] * k, fit["beta"] / k
    return Profile.from_dict(data)


NOISE = 3.0
"""How far the check of the profile measured just now may stray here, on the coefficients the
profiler pinned down (spread within its 10% target): this 2-core machine is shared, and a
second's load swing moves a small collective's latency 2x; one it could not pin down (p2p
latency on 2 ranks: a spread of 112% in one profile here) moved 7x. On a quiet machine the
ratios stay within the default 1.5x (docs/cost_models.md)."""


_QKV_OUT = (2 * SHAPE.heads + 2 * SHAPE.kv_heads) * SHAPE.head_dim  # q, k, v and out
WHOLE_LAYER_BYTES = 4 * SHAPE.hidden * (_QKV_OUT + 3 * SHAPE.ffn_hidden)  # and gate, up, down
"""One layer's whole float32 weights, what g = 1 gathers: measured 21-28% over the model in 2 of
12 runs (163-246 KiB on a 633 KiB prediction), within 20% in the others."""


def _spread_key(check_name: str) -> str:
    """The profile's spread entry of a start-up check point: a 2 MiB message is its kind's
    bandwidth, the elementwise add its bandwidth."""
    if check_name == "elementwise":
        return "elementwise.beta"
    return check_name.replace(" 2MiB", ".beta")


SLOW = 10.0
"""The factor the slow profile multiplies every time by: beyond NOISE x the check's 1.5, so the
slow profile is flagged on every point however the measured ratios strayed within NOISE."""


def _start_up_check(profile: Profile, folder: str) -> dict:
    """The start-up check on the profile measured just now (measured again up to three times
    until it holds within NOISE: noise can only make it fail) and on the profile with every
    time SLOW x (through resolve_profile, as a run loads a cached profile)."""
    import torch

    from cost_models.profile_check import check_points
    from cost_models.stability import drifted
    from paradyse.planning import resolve_profile

    mesh = mesh_for()
    for _ in range(3):
        now = check_points(mesh, profile, SHAPE, torch.float32)
        if not drifted({n: m / p for n, (m, p) in now.items()}, NOISE):
            break
    slow = _scaled(profile, SLOW)
    predicted = {n: p for n, (_, p) in check_points(mesh, slow, SHAPE, torch.float32).items()}
    path = f"{folder}/slow.json"
    if mesh.rank == 0:
        slow.save(path)
    warned, off = [], []
    resolve_profile(path, mesh, SHAPE, torch.float32, max_tokens=64, warn=warned.append)
    resolve_profile(path, mesh, SHAPE, torch.float32, warn=off.append, check=0)
    return {"now": now, "slow_predicted": predicted, "warned": warned, "off": off}


def _profile_and_validate(out: str) -> tuple[list, dict]:
    from cost_models.hardware import detect
    from cost_models.profile import measure_profile
    from cost_models.validate import summary, validate
    from cost_models.validate_groups import validate_sub_groups

    mesh = mesh_for()
    profile = measure_profile(mesh, SHAPE, max_tokens=64)
    if mesh.rank == 0:
        profile.save(out)
    check = _start_up_check(profile, str(Path(out).parent))
    model = CostModel(detect(), profile)
    cells = validate(mesh, SHAPE, model, ["tp_sp", "ring"], ["none", "full"], [48], 2, repeats=1)
    cells += validate_sub_groups(mesh, SHAPE, model, ["local", "tp_sp", "ring"], ["none", "full"],
                                 [48], 2, [1], repeats=1)  # fmt: skip
    return [
        (c.strategy, c.measured_s, c.predicted_s, c.measured_bytes, c.predicted_bytes)
        for c in cells
    ], {  # fmt: skip
        "summary": summary(cells),
        "groups": sorted(profile.collectives["all_gather"]),
        "check": check,
    }


def test_profile_then_validate_on_two_ranks(tmp_path) -> None:
    out = tmp_path / "profile.json"
    cells, info = run_distributed(2, _profile_and_validate, str(out), timeout=300)[0]
    # g = 1 on 2 ranks offers local alone: each rank its own sequence, the weights gathered
    assert [c[0] for c in cells] == ["tp_sp"] * 2 + ["ring"] * 2 + ["g1:local"] * 2
    for name, measured_s, predicted_s, measured_bytes, predicted_bytes in cells:
        assert measured_s > 0 and predicted_s > 0
        assert measured_bytes > 0 and predicted_bytes > 0
        # MemTracker against the memory model (sub-groups measured 13% apart at this size);
        # gloo may hold a gathered copy of the layer's weights a moment past its last use
        held = WHOLE_LAYER_BYTES if name.startswith("g") else 0
        assert abs(predicted_bytes - measured_bytes) <= 0.2 * measured_bytes + held, name
    assert SUMMARY.match(info["summary"]), info["summary"]
    assert info["groups"] == [2]
    profile = Profile.load(out)  # the written file is a valid, current profile
    assert profile.machine["world_size"] == 2 and profile.reduce_scatter_copy
    assert set(profile.calibration) == {"tp_sp", "ulysses", "ring", "metp", "g1:local"}
    assert set(profile.calibration_points) >= {"tp_sp/none", "ring/full"}
    cost = CostModel(get_preset("cpu"), profile).layer_cost(SHAPE, "ring", "none", [40, 8], 2)
    assert cost.time_s > 0
    assert profile.conditions["ranks"] == 2 and profile.conditions["load_before"] is not None
    assert {"matmul", "p2p/2.alpha", "elementwise.beta", "calibration/ring.forward"} <= set(
        profile.spread
    )
    check = info["check"]
    assert set(check["now"]) == {"matmul", "elementwise", "all_gather/2.alpha",
                                 "all_gather/2 2MiB", "all_to_all/2.alpha", "all_to_all/2 2MiB",
                                 "p2p/2.alpha"}  # fmt: skip
    ratios = {n: m / p for n, (m, p) in check["now"].items()}
    pinned = {n: r for n, r in ratios.items() if profile.spread[_spread_key(n)] <= 0.1}
    assert not drifted(pinned, NOISE), f"the profile measured just now fails its check: {ratios}"
    for name, (_, predicted) in check["now"].items():  # SLOW x every time: every ratio / SLOW
        assert check["slow_predicted"][name] == pytest.approx(SLOW * predicted, rel=1e-9)
    assert set(drifted({n: r / SLOW for n, r in ratios.items()})) == set(ratios)
    assert len(check["warned"]) == 1 and "no longer predicts" in check["warned"][0]
    assert "rm " in check["warned"][0] and check["off"] == []


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
    _one_line_error(_run(validate, "--group-sizes", "3"), "--group-sizes [3] do not divide sp=1")
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
