"""MoE models end to end: 5 float32 steps of a tiny MoE on the default corpus give the same
losses, auxiliary losses and expert loads in one process, under every static strategy and
adaptive at sp = 4, and at dp = 2 x sp = 2; 6 steps straight equal 3 + save + 3 resumed on
another sp; bad MoE configs are refused in one line; the metrics and summary carry the loads."""

from __future__ import annotations

import pytest

from paradyse import RunError, Trainer, load_config
from paradyse.metrics import summary_lines
from parallel_lib import STRATEGY_NAMES, get_strategy

from .harness import run_distributed
from .layer_cases import mesh_for
from .test_engine import TINY

MOE = [
    "model.moe.experts=8", "model.moe.top_k=2", "model.moe.expert_ffn_hidden=32",
    "model.moe.shared_experts=1", "model.moe.first_dense_layers=1",
    "model.moe.aux_loss_coef=0.01", "model.moe.z_loss_coef=0.001",
    "data.tokens_per_step=1024", "data.max_seq_len=512",
]  # fmt: skip
"""cpu_moe.toml shrunk to test size: 3 layers (the first dense), 8 experts, top-2, a shared one;
steps of 1,024 tokens (still several micro-batches of 256 tokens per rank at sp = 1)."""


def _config(*extra: str):
    return load_config(None, [*TINY, *MOE, *extra])


def _run(sp: int, *extra: str) -> list[dict]:
    trainer = Trainer(_config(*extra), mesh=mesh_for(sp), log=lambda *_: None)
    return [{"loss": r["loss"], "moe": r["moe"]} for r in trainer.run()]


def _all_runs() -> dict[str, list[dict]]:
    shape = _config().model.shape
    runs = {}
    for name in STRATEGY_NAMES:
        if get_strategy(name).supports(shape, 4)[0]:
            runs[name] = _run(4, f"parallel.strategy={name}")
    runs["adaptive"] = _run(4)
    runs["dp2xsp2"] = _run(2)
    return runs


@pytest.fixture(scope="module")
def local_run() -> list[dict]:
    return _run(1, "parallel.strategy=local")


def _close(got: float, want: float, what) -> None:
    assert abs(got - want) <= 1e-5 * abs(want), (what, got, want)


def test_moe_losses_agree_across_strategies_and_meshes(local_run) -> None:
    assert local_run[-1]["loss"] < local_run[0]["loss"]  # it trains
    per_rank = run_distributed(4, _all_runs, timeout=600)
    assert all(r == per_rank[0] for r in per_rank[1:])  # every rank logs the same numbers
    assert {"tp_sp", "ulysses", "ring", "usp", "metp", "adaptive", "dp2xsp2"} <= set(per_rank[0])
    for name, steps in per_rank[0].items():
        for i, (got, want) in enumerate(zip(steps, local_run, strict=True)):
            _close(got["loss"], want["loss"], (name, i, "loss"))
            _close(got["moe"]["aux_loss"], want["moe"]["aux_loss"], (name, i, "aux"))
            _close(got["moe"]["z_loss"], want["moe"]["z_loss"], (name, i, "z"))
            loads = [layer["load"] for layer in got["moe"]["layers"]]
            assert loads == [layer["load"] for layer in want["moe"]["layers"]], (name, i)


def test_moe_metrics_report_every_layer(local_run) -> None:
    first = local_run[0]["moe"]
    assert [layer["layer"] for layer in first["layers"]] == [1, 2]  # layer 0 is dense
    for layer in first["layers"]:
        # top-2 of every real token, every token of the step routed once per MoE layer
        assert sum(layer["load"]) % 2 == 0 and sum(layer["load"]) > 0
        assert 0 < layer["load_entropy"] <= first["max_entropy"] + 1e-12
    records = [{"moe": r["moe"]} for r in local_run]
    lines = summary_lines(
        [{**r, "tokens": 1, "step_s": 1.0, "loss": 1.0, "micro_batches": [],
          "predicted_s": 1.0, "peak_bytes": None} for r in records], 1e9
    )  # fmt: skip
    moe_lines = [line for line in lines if "layer 1:" in line or line.startswith("MoE:")]
    assert len(moe_lines) == 2, lines


def _resumed(sp: int, path: str) -> list[dict]:
    trainer = Trainer(_config("train.steps=6", f"train.resume={path}"), mesh=mesh_for(sp),
                      log=lambda *_: None)  # fmt: skip
    return [{"loss": r["loss"], "moe": r["moe"]} for r in trainer.run()]


def test_moe_resume_continues_the_run(tmp_path) -> None:
    saved = run_distributed(4, _run, 4, "train.steps=6", f"train.save={tmp_path}",
                            "train.save_every=3")[0]  # fmt: skip
    straight = run_distributed(2, _run, 2, "train.steps=6")[0]
    for got, want in zip(saved, straight, strict=True):
        _close(got["loss"], want["loss"], "saved run")
    resumed = run_distributed(2, _resumed, 2, str(tmp_path / "step-00000003"))[0]  # sp 4 -> 2
    assert len(resumed) == 3
    for i, (got, want) in enumerate(zip(resumed, straight[3:], strict=True)):
        _close(got["loss"], want["loss"], ("resumed", i))
        _close(got["moe"]["aux_loss"], want["moe"]["aux_loss"], ("resumed aux", i))


def _refusal(sp: int, *extra: str) -> str:
    try:
        Trainer(_config(*extra), mesh=mesh_for(sp), log=lambda *_: None)
    except RunError as error:
        return str(error)
    return "accepted"


def test_bad_moe_configs_name_the_fix() -> None:
    with pytest.raises(ValueError, match=r"top_k \(9\) exceeds model.moe.experts \(8\)"):
        _config("model.moe.top_k=9")
    with pytest.raises(ValueError, match="unknown config key model.moe.expert"):
        _config("model.moe.expert=4")
    message = run_distributed(4, _refusal, 4, "model.moe.experts=6")[0]
    assert "model.moe.experts (6) is not divisible by the group size 4" in message, message
    assert "\n" not in message


def test_benchmark_counts_the_parameters_of_the_model() -> None:
    from benchmarks.moe import parameter_counts
    from paradyse import DecoderModel
    from parallel_lib import CommGroup

    config = _config().model
    total, active = parameter_counts(config)
    model = DecoderModel(config, CommGroup.single())
    assert total == sum(p.numel() for p in model.parameters())
    m, H = config.moe, config.hidden
    unused = (m.experts - m.top_k) * 3 * H * m.expert_ffn_hidden  # per MoE layer
    assert active == total - (config.layers - m.first_dense_layers) * unused
