"""The paper mode of the simulation: METP's own recompute (`projections`), the memory breakdown
by hand on a small case, the latency terms' sources, and the last line's form."""

from __future__ import annotations

import re

import pytest

from benchmarks import simulate_paradyse
from cost_models import CostModel, get_preset
from cost_models.counts import check_config, layer_counts
from cost_models.hardware import Hardware
from planners import Method, PlanningSetup
from planners.breakdown import longest_with_breakdown, plan_breakdown
from planners.models import ModelSpec

A100 = get_preset("a100-80g-nvlink")
SPEC = ModelSpec("small", 64, 8, 4, 16, 128, 2, 100)  # H, heads, kv heads, head_dim, F, layers, V
P, N = 4, 64  # ranks; tokens: T/P = 16 a rank, no padding


def small_setup() -> PlanningSetup:
    return PlanningSetup(SPEC, A100, sp=P, dtype="bfloat16", strategies=["tp_sp", "metp"],
                         recomputes=["none", "projections"])  # fmt: skip


def test_breakdown_terms_by_hand() -> None:
    setup = small_setup()
    tp_sp, metp = (next(o for o in setup.costs.options if o.name == name)
                   for name in ("tp_sp", "metp+projections"))  # fmt: skip
    # a rank's parameters: each layer's 1/P shard (QKV 256 x 64 + O 128 x 64 + MLP 3 x 128 x 64)
    # and its two norms whole, the embedding and head's 1/P of 100 x 64 each, the final norm
    params = 2 * ((256 * 64 + 128 * 64 + 3 * 128 * 64) // P + 2 * 64) + 2 * 100 * 64 // P + 64
    b = plan_breakdown(setup, [tp_sp, tp_sp], [N])
    assert (b.weights, b.gradients, b.optimizer) == (2 * params, 2 * params, 12 * params)
    assert b.vocabulary == 2 * 100 * 64 * 2  # the gathered embedding/head weight and gradient
    assert b.logits == 2 * 16 * 100 * 4  # two float32 (T/P, V) buffers: one chunk's
    tl, unit = 16, 16 * 64 * 2  # tokens a rank, one (T/P, H) bf16 activation
    norm = tl * 64 * (4 + 4 + 2) + 4 * tl  # float32 input copy and x_hat, bf16 output, 1/rms
    # tp_sp, no recompute: the norms; the input; Q, K, V copied in natural order; the attention
    # output, its float32 LSE and the out projection's reordered copy; SwiGLU's gate/up output,
    # silu, product (4 x T/P x F). RoPE's tables are the micro-batch's, made once for every layer
    attention = norm + unit + (128 + 2 * 64) * tl * 2 + 2 * tl * 128 * 2
    attention += tl * 8 * 4
    assert b.saved == 2 * (attention + norm + 4 * tl * 128 * 2)
    # METP's own: the norms, the input, the attention output and its LSE
    m = plan_breakdown(setup, [metp, metp], [N])
    assert m.saved == 2 * (2 * norm + unit + tl * 128 * 2 + tl * 8 * 4)
    # its weight buffers at the backward's peak: five shards (held, arriving, the gradient block,
    # the travelling sum out and in) of 6,144 elements (the MLP's and the attention's alike)
    assert m.layer_weights == 5 * 6144 * 2
    for option, split in ((tp_sp, b), (metp, m)):
        cost = CostModel(A100).layer_cost(SPEC, option.strategy, option.recompute, [N], P,
                                          dtype="bfloat16")  # fmt: skip
        assert split.transient + split.layer_weights == cost.transient_bytes
        label = option.name if option.recompute != "none" else f"{option.name}+none"
        plan = setup.planner(Method("static", label)).plan([N])
        assert split.peak == plan.predicted_peak_bytes  # the planner's own sum
    longest, at = longest_with_breakdown(setup, metp, m.peak)
    assert longest >= N and at.peak <= m.peak


def test_projections_recomputes_the_projections_only() -> None:
    none, own = (layer_counts(SPEC, "metp", [N], P, dtype="bfloat16", recompute=r)
                 for r in ("none", "projections"))  # fmt: skip
    for op, again in (("qkv", 1), ("gate_up", 1), ("out", 0), ("down", 0), ("attention", 0)):
        extra = own.flops_backward[op] - none.flops_backward[op]
        assert extra == pytest.approx(again * none.flops_forward[op]), op
    assert own.bytes_backward == none.bytes_backward  # the shards stream in the backward anyway
    rope_swiglu = (8 * 16 * (128 + 64) + 5 * 16 * 128) * 2
    assert own.elementwise_backward - none.elementwise_backward == pytest.approx(rope_swiglu)
    with pytest.raises(ValueError, match="metp only"):
        check_config(SPEC, "ring", P, "projections")
    assert Method.parse("static:metp+projections").recompute == "projections"


def test_latency_terms_load_from_older_dicts() -> None:
    d = A100.to_dict()
    del d["launch_latency"], d["collective_latency"]
    old = Hardware.from_dict(d)
    assert (old.launch_latency, old.collective_latency) == (0.0, 0.0)
    assert "tuning.cc" in A100.source and "HolisticTraceAnalysis" in A100.source


def test_paper_mode_prints_its_tables_and_last_line(capsys) -> None:
    assert simulate_paradyse.main(["--mode", "paper", "--sequences", "12"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(
        r"paper mode: GPT/GRCh38 longest = [\d,]+ tokens, without METP = [\d,]+, ratio = "
        r"\d+\.\d\dx \(paper: 329,728 / 112,128 = 2\.94x\)", out[-1],
    ), out[-1]  # fmt: skip
    text = "\n".join(out)
    assert re.search(r"^  metp\+projections +[\d,]+ .* \*$", text, re.M)
    assert "budget A: 74.01 GiB" in text and "budget B: 78.70 GiB" in text
    assert re.search(r"^GPT/grch38: 12 sequences", text, re.M)
    assert re.search(r"Table-5 style: paradyse saves -?\d+\.\d% against the worst", text)
