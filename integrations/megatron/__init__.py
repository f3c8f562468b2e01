"""Megatron-Core: ParaDySe's switchable attention inside megatron-core models (docs/megatron.md).

`paradyse_gpt_layer_spec()` is megatron-core's local GPT layer spec with `ParaDySeCoreAttention`
as the self-attention's core attention: packed variable-length sequences (`PackedSeqParams`,
THD), causal, GQA, and context parallelism over megatron's cp group by ParaDySe's zigzag ring,
Ulysses or USP, chosen per micro-batch by ParaDySe's cost model and planner (`StrategyChooser`).
`pack_sequences` lays packed micro-batches out for a cp rank. Needs megatron-core 0.16.1
(`pip install -e .[megatron]`); nothing here patches megatron.
"""

try:
    import megatron.core  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised by tests/test_megatron_absent.py
    raise ImportError(
        "integrations.megatron needs megatron-core: pip install -e '.[megatron]' "
        f"(megatron-core==0.16.1) ({error})"
    ) from error

from .attention import ParaDySeCoreAttention, cp_attention
from .data import PackedBatch, pack_sequences
from .groups import cp_comm_group, init_usp_groups, reset_groups
from .planning import CP_COMM_TYPES, Choice, StrategyChooser
from .spec import paradyse_gpt_layer_spec, with_paradyse_attention

CONFIGURED_BY = "paradyse_gpt_layer_spec() in a megatron-core model (docs/megatron.md)"
"""How a run turns this package on (it is no [integrations.NAME] table)."""

__all__ = [
    "CONFIGURED_BY",
    "CP_COMM_TYPES",
    "Choice",
    "PackedBatch",
    "ParaDySeCoreAttention",
    "StrategyChooser",
    "cp_attention",
    "cp_comm_group",
    "init_usp_groups",
    "pack_sequences",
    "paradyse_gpt_layer_spec",
    "reset_groups",
    "with_paradyse_attention",
]
