"""One way to build a planner: the trainer and `planners.explain` give the same plan and
predicted peak for the same model, budget, hardware and lengths; the method is parsed once into
a typed `Method`; frozen layers are priced by their own rows (no weight-gradient work) and
offloaded optimizer state leaves the static memory."""

from __future__ import annotations

import re

import pytest

from cost_models import CostModel, get_preset, layer_counts
from cost_models.counts import comm_bytes
from cost_models.group_size import group_layer_cost
from paradyse import Trainer, load_config
from parallel_lib import LayerShape
from planners import Method, PlanningSetup
from planners.explain import main as explain

from .harness import run_distributed
from .layer_cases import mesh_for

CONFIG = "launch/configs/cpu_tiny.toml"
LENGTHS = [3000, 700, 90]
BUDGET = "90MiB"


def _trainer_plan(budget: str, lens: list[int]) -> tuple[str, int, float]:
    config = load_config(CONFIG, ["parallel.profile=", f"parallel.memory_budget={budget}",
                                  "train.progress=false"])  # fmt: skip
    plan = Trainer(config, mesh=mesh_for(4), log=lambda *_: None).planner.plan(lens)
    return str(plan), plan.predicted_peak_bytes, plan.predicted_s


def test_explain_and_the_trainer_plan_alike(capsys) -> None:
    """4 ranks (LOCAL_WORLD_SIZE 4 in the harness), this machine's hardware, datasheet rates."""
    trainer = run_distributed(4, _trainer_plan, BUDGET, LENGTHS)
    assert len({t for t in trainer}) == 1  # every rank plans alike
    plan, peak, seconds = trainer[0]
    config = load_config(CONFIG)
    m = config.model
    code = explain([
        "--model", "cpu-tiny", "--hidden", str(m.hidden), "--heads", str(m.heads),
        "--kv-heads", str(m.kv_heads), "--head-dim", str(m.head_dim), "--ffn", str(m.ffn_hidden),
        "--layers", str(m.layers), "--vocab", str(m.vocab), "--sp", "4", "--dp", "1",
        "--devices-per-node", "4", "--dtype", "float32", "--memory-budget", BUDGET,
        "--seq-lens", ",".join(map(str, LENGTHS)),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"^plan \(exact\): (.+)$", out, re.M).group(1) == plan
    assert int(re.search(r"\(([\d,]+) bytes\)", out).group(1).replace(",", "")) == peak
    assert f"{seconds:.4f} s" in out
    assert "|" in plan, "the budget should force a mixed plan, or the test shows little"


def test_a_method_is_parsed_once_into_a_typed_value() -> None:
    assert Method.parse("static:usp2x2+full") == Method("static", "usp2x2+full")
    method = Method.parse("static:ring")
    assert (method.strategy, method.recompute, str(method)) == ("ring", None, "static:ring")
    assert Method.for_run("adaptive", "paradyse") == Method("paradyse")
    assert Method.for_run("tp_sp", "exact", "full") == Method("static", "tp_sp+full")
    assert Method.parse(method) is method
    for bad in ("greedy", "static:", "static:ring+some"):
        with pytest.raises(ValueError, match="method|option name"):
            Method.parse(bad)
    labels = ["tp_sp", "tp_sp+full", "usp2x2", "usp2x2+full", "ring+full"]
    assert Method.parse("static:usp").columns(labels) == [2, 3]
    assert Method.parse("static:tp_sp+full").columns(labels) == [1]
    with pytest.raises(ValueError, match="no such option"):
        Method.parse("static:metp").columns(labels)


SHAPE = LayerShape(hidden=256, heads=8, kv_heads=4, head_dim=32, ffn_hidden=704)


@pytest.mark.parametrize("strategy", ["local", "tp_sp", "ulysses", "ring", "usp", "metp"])
def test_a_frozen_layer_drops_exactly_the_weight_gradient_work(strategy: str) -> None:
    """FLOPs: each matmul's weight gradient costs its forward's FLOPs; bytes: the weight
    gradients' collectives of each strategy's formula."""
    P = 1 if strategy == "local" else 4
    lens = [700, 300, 25]
    trained = layer_counts(SHAPE, strategy, lens, P)
    frozen = layer_counts(SHAPE, strategy, lens, P, trainable=False)
    matmul_forward = sum(k.flops * k.count for k in trained.kernels_forward if k.kind == "matmul")
    assert trained.flops - frozen.flops == pytest.approx(matmul_forward, rel=1e-12)
    assert frozen.bytes_forward == trained.bytes_forward
    T, H = sum(-(-n // (2 * P)) * 2 * P for n in lens), SHAPE.hidden
    shard = ((8 + 2 * 4) * 32 * H + 8 * 32 * H) // P + 3 * (704 // P) * H  # elements per rank
    dropped = {
        "local": {},
        "tp_sp": {"all_gather": 2 * (P - 1) * T // P * H * 4},  # the inputs gathered again
        "ulysses": {"reduce_scatter": (P - 1) * shard * 4},
        "ring": {"reduce_scatter": (P - 1) * shard * 4},
        "usp": {"reduce_scatter": (P - 1) * shard * 4},
        "metp": {"p2p": P * shard * 4},  # the travelling weight-gradient sums
    }[strategy]
    for kind, nbytes in trained.bytes_backward.items():
        assert nbytes - frozen.bytes_backward.get(kind, 0) == dropped.get(kind, 0), kind
    want = comm_bytes(SHAPE, strategy, T, P, trainable=False)[1]
    assert frozen.bytes_backward == want


def test_frozen_layers_cut_the_predicted_step_and_may_change_the_plan() -> None:
    """Half the layers frozen: every option of a frozen layer is faster by its weight-gradient
    work and saves less; the step's time drops; at a tight budget the plan changes."""
    setup = PlanningSetup(load_config(CONFIG).model, get_preset("a100-80g-nvlink"), sp=4,
                          dtype="float32", budget_bytes=2.0e9)  # fmt: skip
    costs, lens = setup.costs, [131072]
    trained, frozen = costs.tables(lens), costs.tables(lens, frozenset({0, 1}))
    model = CostModel(setup.hardware)
    for j, option in enumerate(costs.options):
        if option.group is None:
            cost = model.layer_cost(SHAPE, option.strategy, option.recompute, lens, 4,
                                    inner=option.inner, trainable=False)  # fmt: skip
        else:  # the one sequence on the first sub-group; the others train the idle token
            dealt = [lens] + [[]] * (4 // option.group - 1)
            cost = group_layer_cost(model, SHAPE, option.strategy, option.recompute, dealt, 4,
                                    inner=option.inner, trainable=False)  # fmt: skip
        assert frozen.time[0, j] == cost.time_s < trained.time[0, j]
        assert frozen.saved[0, j] <= trained.saved[0, j]
        assert frozen.time[3, j] == trained.time[3, j]  # layers 2, 3 still train
    budget = _tight_budget(setup, lens)
    tight = PlanningSetup(setup.model, setup.hardware, sp=4, dtype="float32",
                          budget_bytes=budget)  # fmt: skip
    planner = tight.planner(hysteresis=0.0)
    all_trained = planner.plan(lens)
    planner.set_step(frozen=[0, 1])
    half_frozen = planner.plan(lens)
    assert half_frozen.frozen == frozenset({0, 1})
    assert half_frozen.predicted_s < all_trained.predicted_s
    assert half_frozen.options != all_trained.options


def _tight_budget(setup: PlanningSetup, lens: list[int]) -> float:
    """A budget just above the all-trainable optimum's leanest fitting plan: where freezing
    layers (which saves memory) lets a faster option in."""
    loose = setup.planner(hysteresis=0.0)
    fastest = loose.plan(lens)  # no memory pressure: the fastest option everywhere
    for fraction in (0.5, 0.6, 0.7, 0.8, 0.9):
        budget = setup.static_bytes + fraction * (fastest.predicted_peak_bytes - setup.static_bytes)
        tight = PlanningSetup(setup.model, setup.hardware, sp=4, dtype="float32",
                              budget_bytes=budget)  # fmt: skip
        trained, frozen = tight.planner(hysteresis=0.0), tight.planner(hysteresis=0.0)
        frozen.set_step(frozen=[0, 1])
        if trained.fits(lens) and trained.plan(lens).options != frozen.plan(lens).options:
            return budget
    raise AssertionError("no budget where freezing layers changes the plan")


def test_offloaded_optimizer_state_leaves_the_static_memory() -> None:
    setup = PlanningSetup(load_config(CONFIG).model, get_preset("cpu"), sp=2, budget_bytes=1e9)
    planner = setup.planner()
    full = planner.step_static_bytes
    planner.set_step(offloaded=[1, 3])
    assert full - planner.step_static_bytes == 2 * setup.static.layer_moments > 0
    with pytest.raises(ValueError, match=r"frozen layers \[7\] outside"):
        planner.set_step(frozen=[7])


def test_tied_embeddings_are_planned_as_one_weight() -> None:
    """The static memory counts a tied model's embedding and head once, as the model holds
    them (its parameters, counted here, are the reference)."""
    import dataclasses

    from paradyse import DecoderModel
    from parallel_lib import CommGroup

    untied = load_config(CONFIG).model
    tied = dataclasses.replace(untied, tie_embeddings=True)
    hardware = get_preset("a100-80g-nvlink")
    per_rank = {}
    for model in (untied, tied):
        setup = PlanningSetup(model, hardware, sp=1, dtype="float32")
        params = sum(p.numel() for p in DecoderModel(model, CommGroup.single()).parameters())
        assert setup.static.weights == 4 * params
        per_rank[model.tie_embeddings] = setup.static.weights
    assert per_rank[False] - per_rank[True] == 4 * untied.vocab * untied.hidden
