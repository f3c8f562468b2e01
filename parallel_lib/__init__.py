"""Strategy function library over the unified layout: collectives, attention kernels, strategies.

Imports torch only. Every function that communicates takes its `CommGroup` explicitly.
"""

from .attention import attention_backward, attention_forward, merge_lse, varlen_attention
from .comm import (
    all_gather_dim0,
    all_gather_tokens,
    all_reduce_,
    all_to_all,
    reduce_scatter_dim0,
    reduce_scatter_tokens,
)
from .group_size import GroupSplit, split_group
from .groups import CommCounter, CommGroup, count_bytes, new_groups, new_sp_groups
from .layer_step import LayerWeights, decoder_layer_step
from .layout import ZigzagLayout, pad_length, zigzag_natural_index
from .mesh import Mesh, init_mesh, rank0_value
from .mlp import MLP_MODES, MLP_NAMES, SWIGLU, Mlp, SwiGLU, get_mlp
from .ops import apply_rotary, split_qkv, swiglu
from .ring import RingExchange
from .ring_attention import ring_attention
from .shape import AttentionWeights, LayerShape, MlpWeights
from .strategies import RECOMPUTE_MODES, STRATEGY_NAMES, Strategy, get_strategy
from .streaming import streamed_linear
from .zero import gather_weight, zero_linear

__all__ = [
    "MLP_MODES",
    "MLP_NAMES",
    "RECOMPUTE_MODES",
    "STRATEGY_NAMES",
    "SWIGLU",
    "AttentionWeights",
    "CommCounter",
    "CommGroup",
    "GroupSplit",
    "LayerShape",
    "LayerWeights",
    "Mesh",
    "Mlp",
    "MlpWeights",
    "RingExchange",
    "Strategy",
    "SwiGLU",
    "ZigzagLayout",
    "all_gather_dim0",
    "all_gather_tokens",
    "all_reduce_",
    "all_to_all",
    "apply_rotary",
    "attention_backward",
    "attention_forward",
    "count_bytes",
    "decoder_layer_step",
    "gather_weight",
    "get_mlp",
    "get_strategy",
    "init_mesh",
    "merge_lse",
    "new_groups",
    "new_sp_groups",
    "pad_length",
    "rank0_value",
    "reduce_scatter_dim0",
    "reduce_scatter_tokens",
    "ring_attention",
    "split_group",
    "split_qkv",
    "streamed_linear",
    "swiglu",
    "varlen_attention",
    "zero_linear",
    "zigzag_natural_index",
]
