"""benchmarks/profile_choices.py: the planner's picks under two profiles and the regret of
choosing by the other one."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.profile_choices import batch_shapes, compare_choices, format_choices, option_times
from cost_models.hardware import PRESETS
from paradyse.config import load_config

from .test_cost_model import make_profile


def test_batch_shapes_fill_the_longest_length() -> None:
    assert batch_shapes(4, 1024, 128) == [[128] * 4, [256] * 4, [512] * 2, [1024]]
    assert batch_shapes(2, 64) == [[64]]


def test_regret_is_the_other_picks_cost_judged_by_each_profile() -> None:
    batches = [[64, 64], [4096], [8192]]  # nothing fits the last one
    first = {"a": [1.0, 10.0, None], "b": [2.0, 12.0, None], "c": [None, 11.0, None]}
    second = {"a": [1.5, 10.0, None], "b": [1.2, 9.0, None], "c": [None, 8.0, None], "d": [1] * 3}
    ratios, picks = compare_choices(first, second, batches)
    assert [o for o, _ in ratios] == ["a", "b", "c"]  # d: only the second prices it
    assert dict(ratios)["a"] == [1.5, 1.0, None] and dict(ratios)["c"] == [None, 8.0 / 11.0, None]
    assert picks[2] == (8192, None, None, None)
    # batch 0: first picks a, second picks b; by first b costs 2/1, by second a costs 1.5/1.2
    assert picks[0][:3] == (128, "a", "b") and picks[0][3] == pytest.approx(1.0)
    # batch 1: first picks a (10), second picks c (8): by first c costs 11/10, by second 10/8
    assert picks[1][:3] == (4096, "a", "c") and picks[1][3] == pytest.approx(0.25)
    lines = format_choices(ratios, picks, batches)
    assert (
        lines[-1]
        == "choices: the same option at 0 of 2 lengths; worst regret +100.0% (2x64 tokens)"
    )


def test_one_profile_against_a_uniformly_slower_copy_picks_alike() -> None:
    """A machine 1.3x slower in every calibrated step moves every option alike: every ratio is
    the same and no pick changes."""
    config = load_config("launch/configs/cpu_tiny.toml", ["parallel.memory_budget=128MiB"])
    keys = ["tp_sp", "ulysses", "ring", "usp", "metp", "g2:tp_sp", "g2:ulysses", "g2:ring",
            "g2:metp", "g1:local"]  # fmt: skip
    base = dataclasses.replace(make_profile(), calibration=dict.fromkeys(keys, (1.1, 1.2)))
    slower = dataclasses.replace(base, calibration=dict.fromkeys(keys, (1.43, 1.56)))
    batches = batch_shapes(4, 2048, 256)
    tables = [option_times(config, 4, PRESETS["cpu"], p, batches) for p in (base, slower)]
    ratios, picks = compare_choices(*tables, batches)
    assert len(ratios) == 30  # 10 options x 3 recompute modes
    for option, row in ratios:
        assert all(r == pytest.approx(1.3, rel=0.05) for r in row if r is not None), option
    assert all(a == b and regret == pytest.approx(0.0, abs=1e-12) for _, a, b, regret in picks)


def test_compare_prints_the_coefficients_then_the_choices(tmp_path, capsys) -> None:
    from benchmarks.profile_stability import main

    keys = ["tp_sp", "ulysses", "g1:local"]
    machine = {"device": "cpu", "dtype": "float32", "sp": 4, "max_tokens": 1024}
    first = dataclasses.replace(make_profile(), machine=machine,
                                calibration=dict.fromkeys(keys, (1.0, 1.0)))  # fmt: skip
    second = dataclasses.replace(first, calibration={**first.calibration, "tp_sp": (3.0, 2.5)})
    first.save(tmp_path / "a.json")
    second.save(tmp_path / "b.json")
    main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--budget", "1GiB"])
    lines = capsys.readouterr().out.splitlines()
    assert "13 of 15 coefficients within 10% (worst: calibration/tp_sp.forward 3.00x)" in lines
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("tp_sp+")}
    assert 2.5 <= float(rows["tp_sp+none"][1].rstrip("x")) <= 3.0  # tp_sp 2.5-3x slower
    picks = [line.split() for line in lines if line.endswith("%") and "x" in line.split()[0]]
    assert [p[0] for p in picks] == ["4x64", "4x128", "4x256", "2x512", "1x1024"]
    assert all(p[2] != "tp_sp+none" for p in picks)  # the second profile never picks tp_sp
    assert lines[-1].startswith("choices: the same option at ")


def test_compare_refuses_profiles_of_another_model(tmp_path) -> None:
    from benchmarks.profile_stability import main

    machine = {"device": "cpu", "dtype": "float32", "sp": 4, "shape": [64, 4, 2, 16, 128]}
    profile = dataclasses.replace(make_profile(), machine=machine)
    profile.save(tmp_path / "a.json")
    with pytest.raises(SystemExit) as exit_info:
        main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "a.json")])
    assert "pass --config of the profiled model" in str(exit_info.value.code)
