"""Tiny random transformers MoE models of each family, and counters of the expert matmuls they
run, for tests/test_alloc_moe_hf.py."""

from __future__ import annotations

import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

from integrations.alloc_moe.hf import (  # noqa: E402
    apply_router_hook,
    hf_moe_blocks,
)
from parallel_lib.routing import Routing, top_k_routing  # noqa: E402

VOCAB = 64
COMMON = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
              num_hidden_layers=3, max_position_embeddings=128, attn_implementation="eager",
              pad_token_id=0)  # fmt: skip
FAMILIES = {
    # name: (config class, model class, renormalize as the family routes, config fields)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", True,
                dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", False,
                  dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                       shared_expert_intermediate_size=24, num_experts_per_tok=4,
                       norm_topk_prob=False, mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", True,
                  dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8, head_dim=8,
                       num_experts_per_tok=4, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", False,
              dict(intermediate_size=16, num_experts=8, num_experts_per_tok=4,
                   norm_topk_prob=False)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", False,
                    dict(num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16,
                         n_routed_experts=8, num_experts_per_tok=4, n_shared_experts=1,
                         first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                         qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                         routed_scaling_factor=2.5, topk_method="group_limited_greedy",
                         n_group=4, topk_group=2)),
}  # fmt: skip
NAMES = list(FAMILIES)


def build(name: str, seed: int = 0, **overrides):
    """A tiny random float32 model of the family, in eval mode."""
    config_cls, model_cls, _, fields = FAMILIES[name]
    config = getattr(transformers, config_cls)(**{**COMMON, **fields, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config).float().eval()


@functools.cache
def tiny(name: str):
    """The shared model of a family (tests leave it unpatched: every hook is removed)."""
    return build(name)


def token_ids(batch: int = 3, length: int = 13, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids, mask=None) -> torch.Tensor:
    return model(ids, attention_mask=mask).logits


def made_up_sensitivity(layers: int, top_k: int) -> list[list[float]]:
    """Perplexity falling with k, faster in shallow layers (the paper's finding)."""
    return [[10.0 + 8.0 * (layers - i) / k for k in range(1, top_k + 1)] for i in range(layers)]


def reduced_budget(moe) -> int:
    """About half of L * K_orig, above L so that Alloc-L has a choice."""
    L = len(moe.layers)
    return max(L + 1, L * moe.top_k // 2)


class ExpertSpy:
    """Counts, independently of the adapter, the matmuls and rows each MoE block's experts get
    (forward pre-hooks on the expert modules)."""

    def __init__(self, model) -> None:
        self.calls, self.rows, self.experts, self.handles = {}, {}, {}, []
        for block in hf_moe_blocks(model):
            self.calls[block.index] = self.rows[block.index] = 0
            self.experts[block.index] = set()
            for e, expert in enumerate(block.module.experts):
                hook = functools.partial(self._seen, block.index, e)
                self.handles.append(expert.register_forward_pre_hook(hook))

    def _seen(self, layer, e, module, args) -> None:
        assert args[0].shape[0] > 0, f"expert {e} of MoE layer {layer} ran on no row"
        self.calls[layer] += 1
        self.rows[layer] += args[0].shape[0]
        self.experts[layer].add(e)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class Recorder:
    """Routes with `inner` and keeps every request and routing it saw."""

    def __init__(self, inner=None) -> None:
        self.inner, self.requests, self.routings = inner or top_k_routing, [], []

    def __call__(self, request) -> Routing:
        routing = self.inner(request)
        self.requests.append(request)
        self.routings.append(routing)
        return routing


def run_counted(model, hook, ids, mask=None, **kwargs):
    """Logits with `hook`, the handle's counts and the spy's, the patch removed after."""
    spy = ExpertSpy(model)
    try:
        with apply_router_hook(model, hook, **kwargs) as handle:
            out = logits(model, ids, mask)
    finally:
        spy.remove()
    return out, handle, spy


def assert_counts_agree(handle, spy) -> None:
    """The block's own count is what the experts computed, no more, no less."""
    for count, block in zip(handle.counts, handle.blocks, strict=True):
        assert (count.calls, count.rows) == (spy.calls[block.index], spy.rows[block.index])
