"""MoE configurations and router-hook outputs a layer cannot run are refused in one line:
top_k above the expert count, experts (or the shared width) that sp does not divide, pairs
outside the local tokens or the experts, unequal lengths, a (token, expert) pair twice."""

from __future__ import annotations

import pytest
import torch

from paradyse import DecoderModel, ModelConfig, SwitchableDecoderLayer
from paradyse.moe import MoeConfig
from parallel_lib import CommGroup
from parallel_lib.moe import MoeShape
from parallel_lib.routing import RouterRequest, Routing

from .layer_cases import RankStandIn
from .moe_cases import SHAPE, MoeCase, to_local


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text, f"not one line: {text!r}"
    return text


def test_top_k_above_experts_is_refused() -> None:
    with pytest.raises(ValueError, match=r"top_k \(5\) exceeds model.moe.experts \(4\)") as e:
        MoeShape(experts=4, top_k=5, expert_ffn_hidden=8)
    assert "set top_k to at most" in _one_line(e)
    with pytest.raises(ValueError, match=r"top_k \(9\) exceeds model.moe.experts \(8\)") as e:
        MoeConfig(experts=8, top_k=9)
    _one_line(e)


def test_experts_not_divisible_by_sp_is_refused() -> None:
    moe = MoeShape(experts=6, top_k=2, expert_ffn_hidden=8)
    with pytest.raises(
        ValueError, match=r"experts \(6\) is not divisible by the group size 4"
    ) as e:
        SwitchableDecoderLayer(SHAPE, RankStandIn(0, 4), moe=moe)
    assert "choose sp among [1, 2, 3, 6]" in _one_line(e)
    SwitchableDecoderLayer(SHAPE, RankStandIn(1, 2), moe=moe)  # 6 experts do split over 2
    moe_config = MoeConfig(experts=6, top_k=2, expert_ffn_hidden=8)
    shape = {"hidden": 32, "heads": 8, "kv_heads": 4, "head_dim": 8, "ffn_hidden": 64}
    config = ModelConfig(**shape, layers=2, vocab=64, moe=moe_config)
    with pytest.raises(ValueError, match=r"sp=4: model.moe.experts \(6\) is not divisible") as e:
        DecoderModel(config, RankStandIn(0, 4))
    assert "choose sp among" in _one_line(e)
    assert config.sp_problem(2) is None


def _hooked_layer(moe: MoeShape, hook):
    """A one-process MoE layer routing through `hook`, its micro-batch and input."""
    case = MoeCase(moe, [5, 3])
    layer = SwitchableDecoderLayer(SHAPE, CommGroup.single(), moe=moe, random_init=False)
    layer.load_full_weights({k: v.float() for k, v in case.full[0].items()})
    layer.mlp.hook = hook
    batch = case.batch(1, 0)
    return layer, batch, to_local(batch, case.xs).float()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("expert_high", r"expert index outside \[0, 8\)"),
        ("expert_negative", r"expert index outside \[0, 8\)"),
        ("token_high", r"token index outside \[0, "),
        ("lengths", r"1-D token, expert and weight tensors of one length"),
    ],
)
def test_hook_with_bad_pairs_is_refused(bad: str, message: str) -> None:
    moe = MoeShape(8, 2, 16)

    def hook(request: RouterRequest) -> Routing:
        n = request.probs.shape[0]
        token, expert = torch.arange(n), torch.zeros(n, dtype=torch.int64)
        weight = torch.ones(n)
        if bad == "expert_high":
            expert[-1] = moe.experts
        elif bad == "expert_negative":
            expert[0] = -1
        elif bad == "token_high":
            token[-1] = n
        else:
            weight = weight[:-1]
        return Routing(token, expert, weight)

    layer, batch, x = _hooked_layer(moe, hook)
    with pytest.raises(ValueError, match=message) as e:
        layer(x, batch, "local")
    _one_line(e)


def test_hook_with_duplicate_pairs_is_refused() -> None:
    """A (token, expert) pair returned twice would count twice under expert parallelism and once
    under tp_sp (its weight is scattered into a dense (T/P, E) table): refused in one line."""
    moe = MoeShape(8, 2, 16)

    def hook(request: RouterRequest) -> Routing:
        n = request.probs.shape[0]
        token = torch.cat([torch.arange(n), torch.zeros(1, dtype=torch.int64)])
        return Routing(token, torch.zeros_like(token), torch.ones(n + 1))

    layer, batch, x = _hooked_layer(moe, hook)
    for strategy in ("local", "tp_sp"):
        with pytest.raises(ValueError, match=r"router hook: .*pair.* twice") as e:
            layer(x, batch, strategy)
        _one_line(e)
