"""Packed micro-batches for a megatron-core GPTModel: THD tokens, labels, loss mask, positions
and `PackedSeqParams`, cut for this context-parallel rank in the zigzag layout.

Megatron's own `get_thd_batch_on_this_cp_rank` needs Transformer Engine for cp > 1; this needs
nothing but torch, and lays tokens out exactly as megatron's THD RoPE (and ParaDySe) expect.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from parallel_lib import ZigzagLayout

__all__ = ["PackedBatch", "pack_sequences"]


@dataclass
class PackedBatch:
    """One micro-batch on one cp rank: (1, T/P) tensors, as GPTModel takes them."""

    tokens: Tensor
    labels: Tensor
    loss_mask: Tensor
    """float32, 1 on real targets, 0 on padding."""
    position_ids: Tensor
    packed_seq_params: PackedSeqParams
    lengths: tuple[int, ...]
    """Real tokens per sequence (inputs, one less than the sequence given)."""
    padded: tuple[int, ...]
    """Per sequence, its length padded to a multiple of `multiple`."""

    @property
    def tokens_counted(self) -> int:
        """Targets on this rank (the loss mask's sum)."""
        return int(self.loss_mask.sum())


def pack_sequences(
    sequences: Sequence[Sequence[int] | Tensor],
    *,
    cp_size: int = 1,
    cp_rank: int = 0,
    multiple: int | None = None,
    pad_id: int = 0,
    device: torch.device | str = "cpu",
) -> PackedBatch:
    """Pack token sequences for next-token prediction (inputs seq[:-1], targets seq[1:]), each
    padded to a multiple of `multiple` (default 2*cp_size; with sequence parallelism use
    2*cp_size*tp_size so that T/P splits over tensor-parallel ranks), and cut this cp rank's
    zigzag share. cu_seqlens hold the real lengths, cu_seqlens_*_padded the padded ones (the
    layout), both of the whole sequences (megatron's convention)."""
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp rank {cp_rank} outside a cp group of {cp_size}")
    multiple = 2 * cp_size if multiple is None else multiple
    if multiple % (2 * cp_size):
        raise ValueError(f"multiple={multiple} must be a multiple of 2*cp_size={2 * cp_size}")
    seqs = [torch.as_tensor(s, dtype=torch.long).flatten() for s in sequences]
    short = [i for i, s in enumerate(seqs) if len(s) < 2]
    if not seqs or short:
        raise ValueError(f"every sequence needs at least 2 tokens (sequences {short[:4]} have not)")
    lengths = tuple(len(s) - 1 for s in seqs)
    padded = tuple(-(-n // multiple) * multiple for n in lengths)
    tokens, labels, mask, positions = [], [], [], []
    for s, n, p in zip(seqs, lengths, padded, strict=True):
        pad = p - n
        tokens.append(torch.cat([s[:-1], s.new_full((pad,), pad_id)]))
        labels.append(torch.cat([s[1:], s.new_full((pad,), pad_id)]))
        mask.append(torch.cat([torch.ones(n), torch.zeros(pad)]))
        positions.append(torch.arange(p))
    layout = ZigzagLayout(padded, cp_size, cp_rank)

    def local(parts: list[Tensor]) -> Tensor:
        return layout.shard(torch.cat(parts)).unsqueeze(0).to(device)

    def cumulative(values: Sequence[int]) -> Tensor:
        return torch.tensor([0, *values], dtype=torch.int32).cumsum(0).to(torch.int32).to(device)

    cu, cu_padded = cumulative(lengths), cumulative(padded)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_padded,
        cu_seqlens_kv_padded=cu_padded, max_seqlen_q=max(padded), max_seqlen_kv=max(padded),
    )  # fmt: skip
    return PackedBatch(
        tokens=local(tokens),
        labels=local(labels),
        loss_mask=local(mask).float(),
        position_ids=local(positions),
        packed_seq_params=params,
        lengths=lengths,
        padded=padded,
    )
