"""Sub-groups on ranks that share fewer cores than there are ranks (4 CPU processes on 2 cores):
a sub-group done early hands its cores to the others (`cost_models.group_size.shared_makespan`,
`CostModel.shared_cores`)."""

from __future__ import annotations

import dataclasses

import pytest

from cost_models.group_size import group_layer_cost, shared_makespan
from cost_models.hardware import PRESETS
from cost_models.model import CostModel

from .layer_cases import SHAPE
from .test_cost_model import make_profile

QUIET = {"cpus_usable": 2, "ranks_here": 4, "torch_threads": 1}
"""Four ranks of one thread on two cores, as this project's CPU runs."""


def stepped_makespan(times, g: int, cores: float, dt: float = 1e-4) -> float:
    """The same processor sharing, simulated in small time steps: every busy rank of P runs at
    min(1, cores / busy) of a core, and rank work is times[o] cores / P core-seconds."""
    P = g * len(times)
    left = [t * cores / P for t in times]
    clock = 0.0
    while any(w > 0 for w in left):
        busy = g * sum(w > 0 for w in left)
        rate = min(1.0, cores / busy)
        left = [w - rate * dt if w > 0 else w for w in left]
        clock += dt
    return clock


@pytest.mark.parametrize(
    ("times", "g", "cores"),
    [([1.0, 0.5], 2, 2.0), ([0.3, 1.2, 0.7, 0.05], 1, 2.0), ([1.0, 0.5], 2, 3.0),
     ([0.8, 0.2, 0.4, 0.4], 1, 1.0)],
)  # fmt: skip
def test_makespan_is_processor_sharing(times, g, cores) -> None:
    expected = stepped_makespan(times, g, cores)
    assert shared_makespan(times, g, cores) == pytest.approx(expected, abs=2e-4)


def test_makespan_by_hand_and_its_limits() -> None:
    # pairs of 4 ranks on 2 cores: 0.5 and 0.25 core-seconds a rank; all four busy at half a
    # core until 0.5 s, then two ranks with a core each finish the other 0.25
    assert shared_makespan([1.0, 0.5], 2, 2.0) == pytest.approx(0.75)
    assert shared_makespan([0.4, 0.4, 0.4, 0.4], 1, 2.0) == pytest.approx(0.4)  # as calibrated
    assert shared_makespan([1.0, 0.5], 2, None) == 1.0  # a device each: the slowest sets it
    assert shared_makespan([0.7], 4, 2.0) == 0.7
    assert shared_makespan([1.0, 0.5], 2, 4.0) == 1.0  # a core per rank: the slowest
    with pytest.raises(ValueError, match="cores must be positive"):
        shared_makespan([1.0, 0.5], 2, 0.0)


def test_shared_cores_from_the_profile_conditions() -> None:
    def model(device="cpu", **conditions) -> CostModel:
        profile = make_profile()
        machine = {**profile.machine, "device": device}
        return CostModel(
            PRESETS["cpu"], dataclasses.replace(profile, machine=machine, conditions=conditions)
        )

    assert model(**QUIET).shared_cores(4) == 2.0
    assert model(**QUIET).shared_cores(2) == 1.0  # dp=2 x sp=2: each sp group half the cores
    assert model(**QUIET).shared_cores(4, nodes_spanned=2) is None
    assert model(**{**QUIET, "torch_threads": 2}).shared_cores(4) == 1.0
    assert model(**{**QUIET, "cpus_usable": 8}).shared_cores(4) is None  # a core per rank
    assert model().shared_cores(4) is None  # a profile without conditions
    assert model("cuda", **QUIET).shared_cores(4) is None  # GPUs do not share the host's cores
    assert CostModel(PRESETS["h100-sxm"]).shared_cores(4) is None  # datasheet rates


def test_uneven_sub_groups_priced_on_shared_cores() -> None:
    profile = make_profile()
    every_rank = CostModel(PRESETS["cpu"], profile)
    on_cpu = {**profile.machine, "device": "cpu"}
    shared = CostModel(PRESETS["cpu"], dataclasses.replace(profile, machine=on_cpu,
                                                           conditions=QUIET))  # fmt: skip
    uneven, even = [[512], [64, 64]], [[256], [256]]
    for recompute in ("none", "selective", "full"):
        alone = [every_rank.layer_cost(SHAPE, "ulysses", recompute, lens, 2, calibration="")
                 for lens in uneven]  # fmt: skip
        plain = group_layer_cost(every_rank, SHAPE, "ulysses", recompute, uneven, 4, raw=True)
        cost = group_layer_cost(shared, SHAPE, "ulysses", recompute, uneven, 4, raw=True)
        for d in ("forward_s", "backward_s"):
            slowest = max(getattr(c, d) for c in alone)
            gathers = getattr(plain, d) - slowest  # a device each: the slowest, plus the gathers
            assert gathers > 0
            expected = shared_makespan([getattr(c, d) for c in alone], 2, 2.0) + gathers
            assert getattr(cost, d) == pytest.approx(expected, rel=1e-12)
        assert cost.time_s < plain.time_s  # the short pair's cores go to the long one
        assert cost.saved_bytes == plain.saved_bytes  # memory is per rank: unchanged
        for model in (shared, every_rank):  # even sub-groups: as the calibration measured
            a = group_layer_cost(model, SHAPE, "ulysses", recompute, even, 4)
            b = group_layer_cost(every_rank, SHAPE, "ulysses", recompute, even, 4)
            assert a.time_s == pytest.approx(b.time_s, rel=1e-12)
