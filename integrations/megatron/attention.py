"""`ParaDySeCoreAttention`: megatron-core's `core_attention` on ParaDySe's kernels and strategies.

It takes what megatron's `SelfAttention` hands its core attention, after the QKV projection and
rotary embeddings: query (T, heads, d), key and value (T, kv_heads, d) of this rank's heads, for
packed sequences (`PackedSeqParams`, qkv_format 'thd', b = 1 folded away), or (s, b, heads, d)
for a plain batch. With context parallelism over megatron's cp group of P ranks the tokens are
this rank's zigzag share (chunks r and 2P-1-r of every sequence padded to a multiple of 2P: what
megatron's THD RoPE, `get_batch_on_this_cp_rank` and `integrations.megatron.data` lay out), which
is ParaDySe's unified layout, so the attention runs as:
- ring: zigzag ring attention over the cp group (`parallel_lib.ring_attention`);
- ulysses: an all-to-all to whole sequences on heads/P, varlen attention, and back;
- usp: Ulysses inside groups of u ranks and the ring across them (after `init_usp_groups`).
The strategy of each micro-batch is `TransformerConfig.cp_comm_type`'s when set ('p2p' ring,
'a2a' ulysses, 'a2a+p2p' usp), else the `StrategyChooser`'s (ParaDySe's cost model and planner).
Masking is causal within each sequence (GQA as megatron's: query head i reads key/value head
i // (heads/kv_heads)); padding sits at the end of a sequence, so real tokens never see it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from parallel_lib import CommGroup, ZigzagLayout, all_to_all, ring_attention, varlen_attention
from planners.models import ModelSpec

from .groups import cp_comm_group
from .planning import CP_COMM_TYPES, Choice, StrategyChooser, heads_allow

__all__ = ["ParaDySeCoreAttention", "cp_attention"]

_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)


@functools.lru_cache(maxsize=64)
def _layout(padded: tuple[int, ...], P: int, rank: int, device: torch.device) -> ZigzagLayout:
    return ZigzagLayout(padded, P, rank, device)


def cp_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    padded_lens: Sequence[int],
    group: CommGroup,
    inner: int = 1,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Causal attention of sequences of `padded_lens` (multiples of 2P) spread zigzag over the
    group of P ranks: q (T/P, heads, d), k and v (T/P, kv_heads, d) this rank's tokens; returns
    (T/P, heads, d). inner = u: the all-to-all degree (1 ring, P ulysses, else usp); the ring runs
    over the P/u groups."""
    q, k, v = (t.contiguous() for t in (q, k, v))
    padded = tuple(int(n) for n in padded_lens)
    P = group.size
    if sum(padded) != q.shape[0] * P:
        raise ValueError(
            f"{q.shape[0]} local tokens, but sequences of padded lengths summing to "
            f"{sum(padded)} over {P} cp ranks give {sum(padded) / P:g}"
        )
    if P == 1:  # any lengths: one rank holds whole sequences
        bounds = [0]
        for n in padded:
            bounds.append(bounds[-1] + n)
        return varlen_attention(q, k, v, bounds, scale=scale, backend=backend)
    layout = _layout(padded, P, group.rank, q.device)
    u = inner
    inner_group, outer = group.factor(u)
    if u > 1:
        T, h, d = q.shape
        kv = k.shape[1]
        if h % u or kv % u:
            raise ValueError(f"an all-to-all over {u} ranks needs {h} and {kv} heads divisible")
        # [q | k | v] heads of each destination side by side: one all-to-all for the three
        x = torch.cat([t.view(T, u, -1, d) for t in (q, k, v)], dim=2).flatten(1, 2)
        x = all_to_all(x, inner_group, scatter_dim=1, gather_dim=0)  # (u*T/P, (h+2kv)/u, d)
        q, k, v = x.split([h // u, kv // u, kv // u], dim=1)
        first = group.rank - inner_group.rank
        _, to_sorted, from_sorted = layout.gathered(range(first, first + u))
        q, k, v = (t.index_select(0, to_sorted) for t in (q, k, v))
    if outer.size == 1:
        o = varlen_attention(q, k, v, layout.bounds, scale=scale, backend=backend)
    else:
        bounds = [b // outer.size for b in layout.bounds]
        o = ring_attention(q, k, v, bounds, outer, scale=scale, backend=backend)
    if u > 1:
        o = o.index_select(0, from_sorted)
        o = all_to_all(o, inner_group, scatter_dim=0, gather_dim=1)  # (T/P, h, d)
    return o


class ParaDySeCoreAttention(MegatronModule):
    """Megatron-Core core attention on ParaDySe's kernels (see the module doc). The arguments
    are those megatron's `SelfAttention` passes its core attention, plus:

    chooser: the `StrategyChooser` shared by the model's layers (`paradyse_gpt_layer_spec` makes
    one; None: one of this layer's own); backend: the attention kernels ('auto': CUDA varlen
    flash for fp16/bf16 on GPUs, CPU flash on CPU, else plain torch; see
    `parallel_lib.attention`)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        *,
        chooser: StrategyChooser | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        problems = []
        if attention_type != "self":
            problems.append(f"attention_type {attention_type!r} (self-attention only)")
        if attn_mask_type not in _CAUSAL:
            problems.append(f"attn_mask_type {attn_mask_type.name} (causal only)")
        if dropout:
            problems.append(f"attention_dropout={dropout} (set attention_dropout=0.0)")
        if config.window_size is not None:
            problems.append("window_size (sliding-window attention)")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            problems.append(f"softmax_type {config.softmax_type!r} (vanilla only)")
        if cp_comm_type is not None and cp_comm_type not in CP_COMM_TYPES:
            problems.append(
                f"cp_comm_type {cp_comm_type!r} (choose {', '.join(CP_COMM_TYPES)} or None: "
                "the planner chooses)"
            )
        if problems:
            raise ValueError("ParaDySeCoreAttention does not support " + "; ".join(problems))
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp = self.tp_group.size() if self.tp_group is not None else 1
        self.layer_number = max(1, layer_number)
        self.heads = config.num_attention_heads // tp
        self.kv_heads = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        # apply_query_key_layer_scaling divides the scale by the layer number and multiplies the
        # scores back in float32 (megatron's DotProductAttention): the product is the scale
        self.scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(self.head_dim)
        self.forced = CP_COMM_TYPES.get(cp_comm_type) if cp_comm_type else None
        self.chooser = chooser if chooser is not None else StrategyChooser()
        self.backend = backend
        self._shape = ModelSpec(
            "megatron-core attention", hidden=config.hidden_size, heads=self.heads,
            kv_heads=self.kv_heads, head_dim=self.head_dim, layers=config.num_layers, vocab=1,
            ffn_hidden=max(1, (config.ffn_hidden_size or 1) // tp),
        )  # fmt: skip
        self.last_choice: Choice | None = None
        """The choice of the last forward (for logs and tests)."""

    def cp_group(self) -> CommGroup:
        pg = getattr(self.pg_collection, "cp", None)
        if pg is None and parallel_state.model_parallel_is_initialized():
            pg = parallel_state.get_context_parallel_group()
        return cp_comm_group(pg)

    def choice(self, group: CommGroup, padded: Sequence[int]) -> Choice:
        """This layer's strategy for a micro-batch of these padded lengths on `group`."""
        P = group.size
        if self.forced is None or P == 1:
            dtype = str(self.config.params_dtype).removeprefix("torch.")
            return self.chooser.choose(self._shape, group, padded, self.layer_number - 1, dtype)
        inner = {"ring": 1, "ulysses": P}.get(self.forced)
        if inner is None:  # usp: the largest inner degree the groups and heads allow
            fits = [u for u in sorted(group.factors, reverse=True)
                    if not heads_allow("usp", self.heads, self.kv_heads, P, u)]  # fmt: skip
            if not fits:
                raise ValueError("cp_comm_type 'a2a+p2p' needs init_usp_groups() and heads "
                                 "divisible by the inner degree")  # fmt: skip
            inner = fits[0]
        reason = heads_allow(self.forced, self.heads, self.kv_heads, P, inner)
        if reason:
            raise ValueError(f"cp_comm_type {self.forced}: {reason}")
        return Choice(self.forced, inner)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        """(T, heads*d) for packed sequences, (s, b, heads*d) for a plain batch. attention_mask
        is not read: the mask is causal within every sequence (pass PackedSeqParams for
        document boundaries)."""
        if attention_bias is not None:
            raise ValueError("ParaDySeCoreAttention takes no attention_bias")
        if attn_mask_type is not None and attn_mask_type not in _CAUSAL:
            raise ValueError(f"ParaDySeCoreAttention is causal only, got {attn_mask_type.name}")
        group = self.cp_group()
        P = group.size
        packed = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if packed:
            padded = _padded_lengths(packed_seq_params)
            q, k, v = query, key, value
            if q.dim() == 4:  # (T, 1, h, d)
                q, k, v = (t.squeeze(1) for t in (q, k, v))
        else:
            s, b = query.shape[:2]
            padded = (s * P,) * b
            q, k, v = (t.transpose(0, 1).flatten(0, 1) for t in (query, key, value))
        if sum(padded) != q.shape[0] * P:
            raise ValueError(
                f"{q.shape[0]} local tokens on {P} cp ranks, but the packed sequences hold "
                f"{sum(padded)} (cu_seqlens_q_padded, else cu_seqlens_q)"
            )
        bad = [n for n in padded if n % (2 * P)]
        if P > 1 and bad:
            raise ValueError(
                f"context parallel {P} needs every sequence padded to a multiple of {2 * P}, got "
                f"{bad[:4]}: pad with integrations.megatron.pack_sequences"
            )
        self.last_choice = choice = self.choice(group, padded)
        o = cp_attention(
            q, k, v, padded, group, choice.inner, scale=self.scale, backend=self.backend
        )
        if packed:
            return o.flatten(1)
        return o.unflatten(0, (b, s)).transpose(0, 1).flatten(2)  # (s, b, h*d)


def _padded_lengths(params: PackedSeqParams) -> tuple[int, ...]:
    """Per sequence, its padded length (the layout's), from cu_seqlens_q_padded or cu_seqlens_q."""
    cu_q, cu_kv = params.cu_seqlens_q_padded, params.cu_seqlens_kv_padded
    cu_q = params.cu_seqlens_q if cu_q is None else cu_q
    cu_kv = params.cu_seqlens_kv if cu_kv is None else cu_kv
    bounds = [int(c) for c in cu_q.tolist()]
    if cu_kv is not None and cu_kv is not cu_q and [int(c) for c in cu_kv.tolist()] != bounds:
        raise ValueError("self-attention needs the same query and key/value sequence bounds")
    return tuple(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a)
