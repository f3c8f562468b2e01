"""A profile that holds (`cost_models.stability`): the spread and the stopping rule on synthetic
samples, the robust link fit, the conditions a profile records (and older profiles without
them), the busy warning, and the start-up check's verdict. Pure Python, synthetic numbers: no
timing is asserted."""

from __future__ import annotations

import itertools
import json
import os

import pytest

from cost_models import stability
from cost_models.profile_data import Curve, LinkFit, Profile
from cost_models.stability import (
    abs_spread,
    busy_reasons,
    conditions_now,
    conditions_record,
    drift_warning,
    drifted,
    link_from,
    profile_warnings,
    settle,
    spread,
    unsettled,
)
from paradyse.config import ConfigError, load_config


def test_spread_is_the_relative_interquartile_range() -> None:
    assert spread([1.0]) == 0.0 and spread([2.0, 2.0, 2.0]) == 0.0
    assert spread([0.9, 1.0, 1.1]) == pytest.approx(0.1)  # three values: half their range
    assert spread([1, 1, 1, 1, 1, 1, 1, 10]) == 0.0  # one outlier of eight moves no quartile
    assert spread([0.0, 0.0, 1.0]) == 99.0  # a median of 0: large, and still plain JSON
    assert abs_spread([0.0, 0.1, 0.2]) == pytest.approx(0.1)


def _rounds(values):
    """A round function giving the next of `values` (the last repeated), and its call count."""
    it, calls = itertools.chain(values, itertools.repeat(values[-1])), []

    def one_round():
        calls.append(1)
        return {"t": next(it)}

    return one_round, calls


def test_settle_stops_once_the_spread_is_under_the_target() -> None:
    steady, calls = _rounds([1.0, 1.01, 0.99])
    assert settle(steady, target=0.1)["t"] == [1.0, 1.01, 0.99] and len(calls) == 3
    # an outlier: the quartiles need more rounds to leave it out, then the median holds
    jumpy, calls = _rounds([1.0, 2.0, 1.0, 1.0, 1.0])
    assert len(settle(jumpy, target=0.1)["t"]) == 5 and len(calls) == 5
    noisy, calls = _rounds([1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0])
    assert len(settle(noisy, target=0.1, max_rounds=6)["t"]) == 6  # the cap
    assert spread(settle(_rounds([1.0, 2.0, 3.0])[0], max_rounds=4)["t"]) > 0.1


def test_settle_waits_for_every_quantity() -> None:
    values = iter([(1.0, 1.0), (1.0, 3.0), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0)])
    history = settle(lambda: dict(zip(("a", "b"), next(values), strict=True)), target=0.1)
    assert len(history["a"]) == len(history["b"]) == 5
    overlap = iter([0.0, 0.02, 0.01])  # a fraction near 0: its absolute spread is small
    assert len(settle(lambda: {"o": next(overlap)}, spread_of=abs_spread)["o"]) == 3


def test_link_from_measured_latency_and_a_trimmed_bandwidth() -> None:
    alpha, beta = 1e-4, 1e9
    samples = [(n, alpha + n / beta) for n in (1e3, 1e6, 1e7, 1e8)]
    fit = link_from(alpha, samples)
    assert fit.alpha == alpha and fit.beta == pytest.approx(beta)
    # the 1 KB message is all latency: left out, it cannot skew beta
    noisy = [(1e3, 3 * alpha), *samples[1:]]
    assert link_from(alpha, noisy).beta == pytest.approx(beta)
    # every size latency-bound: the largest transfer's own rate, never faster
    flat = [(1e3, 1.1e-4), (1e4, 1.1e-4)]
    assert link_from(alpha, flat) == LinkFit(alpha, 1e4 / 1.1e-4)


def _profile(**extra) -> Profile:
    curve = Curve([(1e6, 1e-4), (1e9, 1e-1)])
    return Profile(
        machine={"dtype": "float32", "sp": 4},
        matmul=curve,
        attention_forward=curve,
        attention_backward=curve,
        elementwise=LinkFit(1e-6, 1e10),
        collectives={"p2p": {4: LinkFit(1e-4, 1e9)}},
        **extra,
    )


def test_conditions_and_spreads_are_recorded_and_loaded(tmp_path) -> None:
    before = conditions_now()
    conditions = conditions_record(before, conditions_now(), own_cpu_s=0.0, ranks=4,
                                   ranks_here=4, threads=1, torch_version="2.x")  # fmt: skip
    for key in ("load_before", "load_after", "cpu_count", "torch_threads", "omp_num_threads",
                "torch", "hostname", "started", "ranks_here", "other_cpu"):  # fmt: skip
        assert key in conditions, key
    assert conditions["cpu_count"] == os.cpu_count() and conditions["torch_threads"] == 1
    spreads = {"p2p/4.alpha": 0.3, "matmul": 0.02}
    profile = _profile(conditions=conditions, spread=spreads)
    profile.save(tmp_path / "p.json")
    again = Profile.load(tmp_path / "p.json")
    assert again.conditions == conditions and again.spread == spreads
    assert json.loads((tmp_path / "p.json").read_text())["version"] == 2
    assert unsettled(again.spread, again.spread_target) == ["p2p/4.alpha"]


def test_a_version_1_profile_still_loads(tmp_path) -> None:
    old = _profile().to_dict()
    for key in ("conditions", "spread", "spread_target"):
        del old[key]
    (tmp_path / "v1.json").write_text(json.dumps({**old, "version": 1}))
    profile = Profile.load(tmp_path / "v1.json")
    assert profile.conditions == {} and profile.spread == {}
    assert profile_warnings(profile) == []  # nothing recorded: nothing to warn about


def test_a_busy_machine_is_flagged_in_one_line(monkeypatch) -> None:
    cores = stability.usable_cpus()
    monkeypatch.setattr(stability, "_busy_cpu_seconds", lambda: None)
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 5.0, 1.0, 1.0))
    busy = conditions_record(conditions_now(), conditions_now(), own_cpu_s=None, ranks=4,
                             ranks_here=4, threads=1, torch_version="2.x")  # fmt: skip
    lines = profile_warnings(_profile(conditions=busy, spread={"matmul": 0.01}), "p.json")
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "busy" in lines[0] and f"load average {cores + 5.0:.2f}" in lines[0]
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    quiet = conditions_record(conditions_now(), conditions_now(), own_cpu_s=None, ranks=4,
                              ranks_here=4, threads=1, torch_version="2.x")  # fmt: skip
    assert profile_warnings(_profile(conditions=quiet, spread={"matmul": 0.01})) == []


def test_busy_reasons_from_other_processes_and_from_the_spread() -> None:
    quiet = {"cpus_usable": 16, "ranks_here": 4, "load_before": [1.0, 1, 1], "other_cpu": 0.5}
    assert busy_reasons(quiet) == []
    assert "other processes" in busy_reasons({**quiet, "other_cpu": 13.0})[0]
    # 2 cores, 4 ranks: nothing left free, so half a core of outside load is already busy
    small = {"cpus_usable": 2, "ranks_here": 4, "load_before": [0.8, 1, 1], "other_cpu": 0.1}
    assert busy_reasons(small) == ["load average 0.80 before the run"]
    assert "median spread 30%" in busy_reasons(quiet, {"a": 0.3, "b": 0.4, "c": 0.01})[0]


def test_the_unsettled_coefficients_are_named() -> None:
    spreads = {"matmul": 0.02, "p2p/4.alpha": 0.35, "all_to_all/2.alpha": 0.12}
    lines = profile_warnings(_profile(spread=spreads))
    assert lines == [
        "warning: the profile: 2 of 3 coefficients not pinned down (spread above 10%): "
        "p2p/4.alpha 35%, all_to_all/2.alpha 12%"
    ]


def test_the_start_up_check_flags_drift_either_way() -> None:
    ratios = {"matmul": 1.2, "p2p/4.alpha": 3.0, "elementwise": 0.4, "all_gather/4.alpha": 0.7}
    far = drifted(ratios, 1.5)
    assert list(far) == ["p2p/4.alpha", "elementwise"]  # largest drift first
    assert drifted({k: 1.0 for k in ratios}) == {}
    line = drift_warning(far, path="p.json", threshold=1.5, remeasure="rm p.json",
                         load=[3.0, 1, 1], cpus=2)  # fmt: skip
    assert "\n" not in line and "p2p/4.alpha 3.00x" in line and "elementwise 0.40x" in line
    assert line.endswith("re-measure it: rm p.json") and "load average now 3.00" in line


def test_the_check_threshold_is_a_config_key() -> None:
    assert load_config(None).parallel.profile_check == 1.5
    assert load_config(None, ["parallel.profile_check=0"]).parallel.profile_check == 0
    with pytest.raises((ConfigError, ValueError), match="profile_check"):
        load_config(None, ["parallel.profile_check=0.5"])


def test_the_stability_benchmark_compares_every_coefficient() -> None:
    from benchmarks.profile_stability import format_table, ratio_rows, summary

    first = _profile(spread={"matmul": 0.02}, calibration={"ring": (1.0, 2.0)}, overlap=0.3)
    second = _profile(calibration={"ring": (1.05, 3.0)}, overlap=0.35)
    second.matmul = Curve([(1e6, 2e-4), (1e9, 1e-1)])  # one point 2x, the other the same
    rows = {r.name: r for r in ratio_rows(first, second)}
    assert rows["matmul"].ratio == pytest.approx(2**0.5) and rows["matmul"].worst == pytest.approx(
        2
    )
    assert rows["calibration/ring.forward"].agrees and not rows["calibration/ring.backward"].agrees
    assert rows["overlap"].ratio == pytest.approx(0.05) and rows["overlap"].agrees
    assert "elementwise.alpha" not in rows and rows["p2p/4.alpha"].ratio == 1.0
    assert len(format_table(list(rows.values())).splitlines()) == 2 + len(rows)
    assert summary(list(rows.values())).endswith("(worst: calibration/ring.backward 1.50x)")
