"""Packed micro-batches in the unified zigzag layout."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from parallel_lib import GroupSplit, ZigzagLayout, pad_length

from .data.instruct import target_count

__all__ = ["PackedBatch", "IGNORE_INDEX", "target_count"]

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (padding, the last token of each sequence)."""


def _as_ids(seq) -> Tensor:
    """A sequence of token ids (list, numpy array or tensor) as an int64 CPU tensor."""
    if isinstance(seq, Tensor):
        return seq.to("cpu", torch.int64)
    return torch.as_tensor(np.asarray(seq, dtype=np.int64))


@dataclass(frozen=True, eq=False)
class PackedBatch:
    """One rank's share of a micro-batch of variable-length sequences.

    Each sequence is padded at its end to a multiple of 2P (padding comes after every real token,
    so causal attention keeps it out of every real token's output; its loss is masked), cut into
    2P chunks, and rank r holds chunks r and 2P-1-r of each (see `parallel_lib.layout`). With
    P = 1 this is plain packing.

    Masked tokens: a token stored as its bitwise complement `~id` (negative) is read as `id` but
    is no next-token target (instruction data masks prompts this way). The mark rides in the
    token arrays themselves, so cutting, micro-batching and stream positions need no change."""

    layout: ZigzagLayout
    """Index maps: cu_seqlens, local bounds, positions, gathered <-> natural permutations."""
    seq_lens: tuple[int, ...]
    """Unpadded sequence lengths, in batch order."""
    input_ids: Tensor
    """(T/P,) int64 token ids of the local tokens (padding = pad_id)."""
    labels: Tensor
    """(T/P,) int64 next-token targets, IGNORE_INDEX where there is none."""
    loss_mask: Tensor
    """(T/P,) bool: True where the token carries loss."""
    num_loss_tokens: int
    """Tokens carrying loss in the whole micro-batch (sum over ranks): `target_count` summed."""
    split: GroupSplit | None = None
    """Set when the micro-batch runs on sub-groups (`parallel_lib.group_size`): these are the
    sequences of this rank's sub-group, laid out over its g ranks (`sp_size` is g)."""

    @classmethod
    def pack(
        cls,
        sequences: Sequence[Sequence[int]],
        sp_size: int = 1,
        sp_rank: int = 0,
        *,
        device: torch.device | str = "cpu",
        pad_id: int = 0,
        split: GroupSplit | None = None,
    ) -> PackedBatch:
        """Pack token-id sequences for rank `sp_rank` of a switchable group of `sp_size`;
        a negative token `~id` is input `id` and no target. With `split` (a sub-group's
        sequences), `sp_size` and `sp_rank` must be the sub-group's size and this rank's
        position in it."""
        if split is not None and (sp_size, sp_rank) != (split.size, split.position):
            raise ValueError(
                f"a sub-group of {split.size} packs for its own ranks: sp_size={split.size}, "
                f"sp_rank={split.position}, got {sp_size} and {sp_rank}"
            )
        if not sequences:
            raise ValueError("a micro-batch needs at least one sequence")
        lens = [len(s) for s in sequences]
        if min(lens) < 1:
            raise ValueError("sequences must hold at least one token")
        padded = [pad_length(n, sp_size) for n in lens]
        layout = ZigzagLayout(padded, sp_size, sp_rank, device)
        tokens = torch.full((layout.total_tokens,), pad_id, dtype=torch.int64)
        labels = torch.full((layout.total_tokens,), IGNORE_INDEX, dtype=torch.int64)
        for start, seq in zip(layout.bounds, sequences, strict=False):
            marked = _as_ids(seq)
            ids = torch.where(marked < 0, ~marked, marked)
            tokens[start : start + len(ids)] = ids
            targets = torch.where(marked[1:] < 0, IGNORE_INDEX, ids[1:])
            labels[start : start + len(ids) - 1] = targets
        local = layout.local_natural_index.cpu()
        labels = labels[local]
        return cls(
            layout=layout,
            seq_lens=tuple(lens),
            input_ids=tokens[local].to(layout.device),
            labels=labels.to(layout.device),
            loss_mask=(labels != IGNORE_INDEX).to(layout.device),
            num_loss_tokens=sum(target_count(s) for s in sequences),
            split=split,
        )

    @property
    def sp_size(self) -> int:
        return self.layout.size

    @property
    def sp_rank(self) -> int:
        return self.layout.rank

    @property
    def cu_seqlens(self) -> Tensor:
        return self.layout.cu_seqlens

    @property
    def positions(self) -> Tensor:
        return self.layout.positions

    @property
    def total_tokens(self) -> int:
        """T: padded tokens over the whole switchable group."""
        return self.layout.total_tokens

    @property
    def local_tokens(self) -> int:
        return self.layout.local_tokens

    def real_mask(self) -> Tensor:
        """(T/P,) bool: True for real (non-padding) local tokens."""
        layout = self.layout
        return layout.positions < torch.tensor(
            self.seq_lens, device=layout.device
        ).repeat_interleave(
            torch.tensor([n // layout.size for n in layout.padded_lens], device=layout.device)
        )
