"""The profiler's interleaved calibration rounds (`cost_models.profile_calibration.calibrate`),
with a simulated machine as the timer: what it stores, when it stops, the order it times in,
and that a slow spell of the machine no longer lands on one option alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cost_models.profile_calibration import Case, calibrate

from .test_cost_model import make_profile

TRUTH = {"tp_sp": ((1.5, 0.002), (1.2, 0.004)), "g2:ulysses": ((0.8, 0.0), (2.0, 0.001))}
"""key -> (forward (scale, overhead), backward (scale, overhead)) of the simulated machine."""
ANALYTIC = [(0.01, 0.02), (0.05, 0.1), (0.2, 0.4)]


def make_cases() -> list[Case]:
    cases = []
    for key in TRUTH:
        for recompute in ("none", "full"):
            for tokens, analytic in zip((64, 1024, 2048), ANALYTIC, strict=True):
                weight = torch.ones(1, requires_grad=True)
                cases.append(Case(key, recompute, tokens, lambda w=weight: w * 2.0,
                                  torch.ones(1), analytic))  # fmt: skip
    return cases


class Machine:
    """Times a case as its key's true scale x analytic + overhead, times a slowdown for calls
    that fall in [slow_from, slow_to) (a slow spell of the machine); records the order."""

    def __init__(self, cases: list[Case], slow: tuple[int, int] = (0, 0), factor: float = 3.0):
        self.by_step = {id(c.step): c for c in cases}
        self.calls: list[Case] = []
        self.slow, self.factor = slow, factor

    def __call__(self, step, dy) -> tuple[float, float]:
        case = self.by_step[id(step)]
        spell = self.factor if self.slow[0] <= len(self.calls) < self.slow[1] else 1.0
        self.calls.append(case)
        return tuple(
            spell * (TRUTH[case.key][phase][0] * case.analytic[phase] + TRUTH[case.key][phase][1])
            for phase in (0, 1)
        )


def test_exact_steps_fit_every_option_in_three_rounds() -> None:
    cases, profile = make_cases(), dataclasses.replace(make_profile(), calibration={})
    machine = Machine(cases)
    calibrate(cases, profile, timer=machine)
    assert len(machine.calls) == 3 * len(cases)  # spreads 0: stops after the minimum
    for key, ((kf, cf), (kb, cb)) in TRUTH.items():
        assert profile.calibration[key] == pytest.approx((kf, kb), rel=1e-9)
        assert profile.calibration_overhead[key] == pytest.approx((cf, cb), rel=1e-6, abs=1e-12)
        assert profile.spread[f"calibration/{key}.forward"] == 0.0
        for recompute in ("none", "full"):
            rows = profile.calibration_points[f"{key}/{recompute}"]
            assert [r[0] for r in rows] == [64, 1024, 2048]
            assert [tuple(r[3:]) for r in rows] == ANALYTIC


def test_rounds_rotate_and_time_every_case_once_each() -> None:
    cases = make_cases()
    machine = Machine(cases)
    calibrate(cases, dataclasses.replace(make_profile(), calibration={}), timer=machine)
    n = len(cases)
    rounds = [machine.calls[r * n : (r + 1) * n] for r in range(3)]
    for timed in rounds:
        assert sorted(map(id, timed)) == sorted(map(id, cases))  # each case once per round
    assert len({id(timed[0]) for timed in rounds}) == 3  # a different case first each round
    for timed in rounds:  # the options' cases dealt in turn: a short spell meets both
        assert all(timed[i].key != timed[i + 1].key for i in range(n - 1))


def test_a_slow_spell_does_not_move_any_option() -> None:
    """A spell three times slower over the first round and a half (18 of 12 x 7 calls). Timed
    the old way, each option's rounds back to back, tp_sp's first three rounds (6 cases each)
    would all fall in it: a spread of 0, a stop after 3 rounds and a scale 3x too large.
    Interleaved, every case meets the spell at most twice in 7 rounds, the medians leave it out
    and the fit is exact."""
    cases, profile = make_cases(), dataclasses.replace(make_profile(), calibration={})
    machine = Machine(cases, slow=(0, 18))
    calibrate(cases, profile, timer=machine)
    for key, ((kf, _), (kb, _)) in TRUTH.items():
        assert profile.calibration[key] == pytest.approx((kf, kb), rel=1e-9)
    assert len(machine.calls) == 7 * len(cases)  # the spell kept the rounds' spread up


def test_no_cases_calibrate_nothing() -> None:
    profile = dataclasses.replace(make_profile(), calibration={}, calibration_points={})
    calibrate([], profile, timer=Machine([]))
    assert profile.calibration == {} and profile.calibration_points == {}
