"""planners.Planner: options, cost tables and their cache, hysteresis, plans, the error for an
impossible budget, and the same plans on every rank."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from cost_models import CostModel, get_preset, static_memory
from parallel_lib import LayerShape, get_strategy
from planners import (
    InfeasibleError,
    LayerCosts,
    Option,
    Plan,
    Planner,
    config_supports,
    enumerate_options,
)
from planners.models import get_model

from .harness import run_distributed

LLAMA = get_model("llama-70b")
A100 = get_preset("a100-80g-nvlink")


def library_supports(option: Option, shape, P: int) -> tuple[bool, str]:
    """What the engine passes: the strategy library's own check."""
    extra = {"inner": option.inner} if option.inner else {}
    return get_strategy(option.strategy, **extra).supports(shape, P)


def test_options_at_p8_are_18_and_match_the_strategy_library() -> None:
    options = enumerate_options(LLAMA, 8)
    names = [o.name for o in options]
    assert len(names) == 18
    assert names[:3] == ["tp_sp", "tp_sp+selective", "tp_sp+full"]
    assert {"usp2x4", "usp4x2+full", "metp+selective"} <= set(names)
    assert "local" not in {o.strategy for o in options}
    for shape, sizes in ((LayerShape(256, 8, 4, 32, 704), (1, 2, 4)),
                         (LayerShape(8192, 64, 8, 128, 28672), (1, 2, 4, 8))):  # fmt: skip
        for P in sizes:
            ours = [o.name for o in enumerate_options(shape, P)]
            theirs = [o.name for o in enumerate_options(shape, P, supports=library_supports)]
            assert ours == theirs, P
    assert [o.name for o in enumerate_options(LayerShape(256, 8, 4, 32, 704), 1)][:1] == ["local"]


def test_options_can_be_restricted_and_refusals_say_what_to_change() -> None:
    options = enumerate_options(LLAMA, 8, strategies=["ring", "usp"], recomputes=["full"])
    assert [o.name for o in options] == ["ring+full", "usp2x4+full", "usp4x2+full"]
    with pytest.raises(ValueError, match=r"no strategy can run this layer on sp=3 .*"
                       r"choose sp among \[1, 2, 4, 8\]"):  # fmt: skip
        enumerate_options(LLAMA, 3)
    with pytest.raises(ValueError, match="unknown strategy 'zero'"):
        enumerate_options(LLAMA, 8, strategies=["zero"])
    assert config_supports(Option("usp", "none", 2, 2), LLAMA, 4) == (True, "")
    assert not config_supports(Option("tp_sp"), LLAMA, 3)[0]


def test_plan_string_is_compact() -> None:
    options = (
        (Option("tp_sp"),) * 20 + (Option("ring", "full"),) * 4 + (Option("usp", "none", 2, 4),)
    )
    plan = Plan(options, 1.0, 2, "exact", signature=(16,))
    assert str(plan) == "tp_sp x20 | ring+full x4 | usp2x4 x1"
    assert plan.strategies[-1] == "usp" and plan.recomputes[20] == "full"


class CountingModel(CostModel):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.calls = 0

    def layer_cost(self, *args, **kwargs):
        self.calls += 1
        return super().layer_cost(*args, **kwargs)


def test_plan_predictions_match_the_cost_model_and_tables_are_cached() -> None:
    model = CountingModel(A100)
    options = enumerate_options(LLAMA, 8)
    costs = LayerCosts(model, LLAMA, LLAMA.layers, 8, options, dtype="bfloat16", vocab=32000)
    static = static_memory(LLAMA, LLAMA.layers, 32000, sp=8, dtype="bfloat16").total
    planner = Planner(costs, 80e9, static_bytes=static)
    plan = planner.plan([65536, 3000, 17])
    assert model.calls == 18
    layer_costs = [
        model.layer_cost(LLAMA, o.strategy, o.recompute, [17, 3000, 65536], 8, dtype="bfloat16",
                         inner=o.inner)
        for o in plan.options
    ]  # fmt: skip
    head = 3 * sum(costs.signature([65536, 3000, 17])) * (32000 // 8) * 4  # whole logits
    step = CostModel.step(layer_costs, static, head_bytes=head)
    assert plan.predicted_s == pytest.approx(step.time_s, rel=1e-12)
    assert abs(plan.predicted_peak_bytes - step.peak_bytes) <= 1
    assert plan.predicted_peak_bytes <= 80e9
    calls = model.calls
    # the same lengths in another order, or padding to the same multiple of 2P: cached
    assert planner.plan([17, 65536, 3000]) is planner.plan([3000, 17, 65530])
    assert model.calls == calls
    assert costs.signature([17, 3000, 65536]) == (32, 3008, 65536)
    # chunked logits (the trainer's default): the head's transient is one chunk's
    chunked = LayerCosts(model, LLAMA, LLAMA.layers, 8, options, dtype="bfloat16",
                         vocab=32000, logits_chunk=1024)  # fmt: skip
    assert chunked.tables([65536, 3000, 17]).head_bytes == 2 * 1024 * 32000 * 4


@dataclass(frozen=True)
class FakeCost:
    time_s: float
    saved_bytes: int
    transient_bytes: int


class TableModel:
    """Costs by (strategy, the batch's first padded length): a planner test without physics."""

    def __init__(self, table: dict) -> None:
        self.table = table

    def layer_cost(self, shape, strategy, recompute, seq_lens, P, **_):
        time, saved = self.table[(strategy, seq_lens[0])]
        return FakeCost(time, saved, 0)


def fake_planner(table, hysteresis=0.05, budget=100) -> Planner:
    options = [Option("tp_sp"), Option("ring")]
    costs = LayerCosts(TableModel(table), LLAMA, 2, 2, options)
    return Planner(costs, budget, hysteresis=hysteresis)


def test_hysteresis_keeps_a_plan_within_5_percent_and_only_if_it_fits() -> None:
    table = {("tp_sp", 4): (1.0, 1), ("ring", 4): (2.0, 1),  # batch A: tp_sp
             ("tp_sp", 8): (1.04, 1), ("ring", 8): (1.0, 1),  # B: ring, tp_sp 4% slower
             ("tp_sp", 12): (1.06, 1), ("ring", 12): (1.0, 1),  # C: tp_sp 6% slower
             ("tp_sp", 16): (1.0, 101), ("ring", 16): (1.5, 1)}  # D: no tp_sp fits  # fmt: skip
    planner = fake_planner(table)
    assert str(planner.plan([4])) == "tp_sp x2"
    kept = planner.plan([8])
    assert str(kept) == "tp_sp x2" and kept.kept and kept.predicted_s == pytest.approx(2.08)
    assert str(planner.plan([12])) == "ring x2"
    assert str(planner.plan([8])) == "ring x2"  # the new best is the previous plan now
    assert str(planner.plan([4])) == "tp_sp x2"
    assert str(planner.plan([16])) == "ring x2"  # 202 bytes > 100: not kept
    no_smoothing = fake_planner(table, hysteresis=0.0)
    no_smoothing.plan([4])
    assert str(no_smoothing.plan([8])) == "ring x2"
    with pytest.raises(ValueError, match="hysteresis"):
        fake_planner(table, hysteresis=-1)


def test_infeasible_names_memory_budget_and_the_longest_sequence_that_fits() -> None:
    options = enumerate_options(LLAMA, 8)
    costs = LayerCosts(CostModel(A100), LLAMA, LLAMA.layers, 8, options, dtype="bfloat16",
                       vocab=LLAMA.vocab)  # fmt: skip
    static = static_memory(LLAMA, LLAMA.layers, LLAMA.vocab, sp=8, dtype="bfloat16").total
    planner = Planner(costs, 40e9, static_bytes=static)
    longest = planner.longest_fitting()
    assert longest % 16 == 0 and planner.fits([longest]) and not planner.fits([longest + 16])
    with pytest.raises(InfeasibleError) as caught:
        planner.plan([longest + 16])
    error = caught.value
    assert error.longest_fitting == longest and error.budget_bytes == 40e9
    assert error.leanest_bytes > 40e9
    assert f"the longest single sequence that fits is {longest:,} tokens" in str(error)
    assert str(error).startswith("no plan fits: the leanest plan needs ")
    assert planner.plan([longest]).predicted_peak_bytes <= 40e9
    static_planner = Planner(costs, 40e9, static_bytes=static, method="static:tp_sp")
    assert static_planner.longest_fitting() < longest  # tp_sp holds whole sequences
    with pytest.raises(InfeasibleError, match="static:tp_sp does not fit: it needs"):
        static_planner.plan([longest])
    with pytest.raises(ValueError, match="static:zero: no such option"):
        Planner(costs, 40e9, method="static:zero")
    with pytest.raises(InfeasibleError, match="weights, gradients and optimizer state alone"):
        Planner(costs, static / 2, static_bytes=static).plan([16])


def test_exact_is_never_slower_than_any_baseline_on_the_cost_model() -> None:
    options = enumerate_options(LLAMA, 8)
    costs = LayerCosts(CostModel(A100), LLAMA, LLAMA.layers, 8, options, dtype="bfloat16",
                       vocab=LLAMA.vocab)  # fmt: skip
    static = static_memory(LLAMA, LLAMA.layers, LLAMA.vocab, sp=8, dtype="bfloat16").total
    methods = ["exact", "paradyse"] + [f"static:{s}" for s in ("tp_sp", "ring", "usp", "metp")]
    planners = {m: Planner(costs, 80e9, static_bytes=static, method=m, hysteresis=0)
                for m in methods}  # fmt: skip
    rng = np.random.default_rng(0)
    for _ in range(25):
        lens = rng.integers(1, 200_000, rng.integers(1, 4)).tolist()
        exact = planners["exact"].plan(lens) if planners["exact"].fits(lens) else None
        for m in methods[1:]:
            if planners[m].fits(lens):
                assert exact is not None
                assert exact.predicted_s <= planners[m].plan(lens).predicted_s * (1 + 1e-12)


def plans_on_this_rank() -> list[str]:
    options = enumerate_options(LLAMA, 8)
    costs = LayerCosts(CostModel(A100), LLAMA, LLAMA.layers, 8, options, dtype="bfloat16",
                       vocab=LLAMA.vocab)  # fmt: skip
    planner = Planner(costs, 60e9)
    rng = np.random.default_rng(5)
    out = []
    for _ in range(12):
        plan = planner.plan(rng.integers(1, 150_000, 3).tolist())
        out.append(f"{plan} {plan.predicted_s!r} {plan.predicted_peak_bytes} {plan.kept}")
    return out


def test_every_rank_plans_the_same() -> None:
    # spawned workers hash strings with their own random seeds: no ordering may depend on it
    first, second = run_distributed(2, plans_on_this_rank)
    assert first == second == plans_on_this_rank()
