"""`paradyse_gpt_layer_spec`: megatron-core's GPT layer spec with ParaDySe's core attention."""

from __future__ import annotations

import copy
import functools

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec

from .attention import ParaDySeCoreAttention
from .planning import StrategyChooser

__all__ = ["paradyse_gpt_layer_spec", "with_paradyse_attention"]


def with_paradyse_attention(
    spec: ModuleSpec, chooser: StrategyChooser | None = None, backend: str = "auto"
) -> ModuleSpec:
    """A copy of a transformer-layer spec whose self-attention's core attention is
    `ParaDySeCoreAttention` (every layer sharing `chooser`, a new one by default). Works on the
    local spec and on Transformer Engine's (`get_gpt_layer_with_transformer_engine_spec()`: TE's
    linears and norms, ParaDySe's attention)."""
    spec = copy.deepcopy(spec)
    attention = getattr(getattr(spec, "submodules", None), "self_attention", None)
    if attention is None or attention.module is not SelfAttention:
        found = getattr(attention, "module", attention)
        raise ValueError(f"expected a GPT layer spec with SelfAttention, got {found!r}")
    builder = functools.partial(
        ParaDySeCoreAttention, chooser=chooser if chooser is not None else StrategyChooser(),
        backend=backend,
    )  # fmt: skip
    attention.submodules.core_attention = builder
    return spec


def paradyse_gpt_layer_spec(
    *,
    normalization: str | None = None,
    qk_layernorm: bool = False,
    num_experts: int | None = None,
    moe_grouped_gemm: bool = False,
    chooser: StrategyChooser | None = None,
    backend: str = "auto",
) -> ModuleSpec:
    """`get_gpt_layer_local_spec(...)` (megatron-core's own linears, norms and MLP or MoE) with
    ParaDySe's core attention; pass it to `GPTModel(transformer_layer_spec=...)`. normalization:
    'LayerNorm' (default) or 'RMSNorm'. chooser: the strategy chooser all layers share (None: a
    new `StrategyChooser()`: this machine's datasheet rates); backend: the attention kernels."""
    spec = get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=qk_layernorm,
        normalization=normalization,
    )  # fmt: skip
    return with_paradyse_attention(spec, chooser, backend)
