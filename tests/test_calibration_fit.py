"""The calibration's scale and per-step overhead (`cost_models.profile_data.fit_calibration`) and
how the cost model applies them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cost_models.group_size import group_layer_cost
from cost_models.hardware import PRESETS
from cost_models.model import CostModel
from cost_models.profile_data import Profile, fit_calibration, store_calibration

from .layer_cases import SHAPE
from .test_cost_model import make_profile


def reference_fit(pairs) -> tuple[float, float]:
    """The same weighted least squares by numpy: rows (a/m, 1/m), target 1."""
    m = np.array([p[0] for p in pairs])
    a = np.array([p[1] for p in pairs])
    design = np.stack([a / m, 1.0 / m], axis=1)
    (k, c), *_ = np.linalg.lstsq(design, np.ones_like(m), rcond=None)
    return float(k), float(c)


def test_scale_and_overhead_recovered_from_exact_steps() -> None:
    analytic = [0.002, 0.004, 0.09, 0.1, 0.21, 0.3]
    measured = [1.2 * a + 0.005 for a in analytic]  # a fixed 5 ms per step
    k, c = fit_calibration(list(zip(measured, analytic, strict=True)))
    assert k == pytest.approx(1.2, rel=1e-9) and c == pytest.approx(0.005, rel=1e-9)


def test_noisy_steps_match_numpy_least_squares() -> None:
    rng = np.random.default_rng(0)
    analytic = rng.uniform(1e-3, 0.5, 9)
    measured = 1.1 * analytic + 0.004 + rng.normal(0, 1e-3, 9)
    pairs = list(zip(measured.tolist(), analytic.tolist(), strict=True))
    assert fit_calibration(pairs) == pytest.approx(reference_fit(pairs), rel=1e-9)


def test_a_negative_overhead_falls_back_to_the_scale_alone() -> None:
    analytic = [0.01, 0.1, 1.0]
    measured = [0.9 * a for a in analytic[:1]] + [1.3 * a for a in analytic[1:]]  # small: fast
    pairs = list(zip(measured, analytic, strict=True))
    assert reference_fit(pairs)[1] < 0
    ratios = [a / m for m, a in pairs]
    k, c = fit_calibration(pairs)
    assert c == 0.0 and k == pytest.approx(sum(ratios) / sum(r * r for r in ratios), rel=1e-12)
    assert fit_calibration([(1.0, 100.0)]) == (0.25, 0.0)  # the scale stays clamped


def test_overhead_added_to_every_layer_step_and_saved() -> None:
    base = dataclasses.replace(make_profile(), calibration={"ulysses": (1.5, 0.5)})
    rows = [[64, 0.011, 0.022, 0.004, 0.008], [4096, 0.305, 0.61, 0.2, 0.4],
            [8192, 0.605, 1.21, 0.4, 0.8]]  # fmt: skip
    store_calibration(base, "ulysses", rows)
    store_calibration(base, "g2:ulysses", rows)
    (kf, kb), (cf, cb) = base.calibration["ulysses"], base.calibration_overhead["ulysses"]
    assert (kf, kb) == pytest.approx((1.5, 1.5), rel=1e-9)
    assert (cf, cb) == pytest.approx((0.005, 0.01), rel=1e-9)
    raw = CostModel(PRESETS["cpu"], dataclasses.replace(base, calibration={},
                                                        calibration_overhead={}))  # fmt: skip
    model = CostModel(PRESETS["cpu"], base)
    for lens in ([64], [3000, 1000]):
        plain = raw.layer_cost(SHAPE, "ulysses", "selective", lens, 4)
        cost = model.layer_cost(SHAPE, "ulysses", "selective", lens, 4)
        assert cost.forward_s == pytest.approx(kf * plain.forward_s + cf, rel=1e-12)
        assert cost.backward_s == pytest.approx(kb * plain.backward_s + cb, rel=1e-12)
        pairs = [[n] for n in lens] + [[]] * (2 - len(lens))
        group = group_layer_cost(model, SHAPE, "ulysses", "none", pairs, 4)
        unscaled = group_layer_cost(model, SHAPE, "ulysses", "none", pairs, 4, raw=True)
        assert group.forward_s == pytest.approx(kf * unscaled.forward_s + cf, rel=1e-12)
    again = Profile.from_dict(base.to_dict())
    assert again.calibration_overhead == base.calibration_overhead
    older = base.to_dict()
    del older["calibration_overhead"]  # a profile from before: no overhead
    assert Profile.from_dict(older).calibration_overhead == {}
    assert CostModel(PRESETS["cpu"], Profile.from_dict(older)).overheads("ulysses") == (0, 0)
