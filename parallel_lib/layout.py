"""Index maps of the unified zigzag token layout.

Every sequence is padded to a multiple of 2P and cut into 2P equal chunks; rank r holds chunks r and
2P-1-r of every sequence (this balances causal attention work), concatenated in sequence order.
Three token orders appear:
- natural: sequences one after another, tokens in order (what single-process code sees);
- local: one rank's tokens, (T/P,) in the order above, which is also sorted by natural index;
- gathered: the concatenation of the local tokens of ranks 0..P-1 (what an all-gather yields).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch
from torch import Tensor

from .ops import rotary_tables

__all__ = ["ZigzagLayout", "zigzag_natural_index", "pad_length"]


def pad_length(length: int, P: int) -> int:
    """Length rounded up to a multiple of 2P (at least 2P)."""
    if length <= 0:
        raise ValueError(f"sequence lengths must be positive, got {length}")
    return -(-length // (2 * P)) * (2 * P)


def concat_ranges(starts: Tensor, lengths: Tensor) -> Tensor:
    """cat([arange(s, s + n) for s, n in zip(starts, lengths)]) without a Python loop."""
    offsets = torch.cumsum(lengths, 0) - lengths
    return torch.repeat_interleave(starts - offsets, lengths) + torch.arange(int(lengths.sum()))


def zigzag_natural_index(padded_lens: Sequence[int], P: int, rank: int) -> Tensor:
    """Natural-order index of each of `rank`'s local tokens: (T/P,) int64, increasing."""
    lens = torch.tensor(padded_lens, dtype=torch.int64)
    seq_starts = torch.cumsum(lens, 0) - lens
    chunk = lens // (2 * P)
    # per sequence: chunk `rank`, then chunk 2P-1-rank  # (n, 2) -> (2n,)
    starts = torch.stack([seq_starts + rank * chunk, seq_starts + (2 * P - 1 - rank) * chunk], 1)
    return concat_ranges(starts.reshape(-1), chunk.repeat_interleave(2))


class ZigzagLayout:
    """Where every token of a packed micro-batch lives on a group of P ranks (see module doc)."""

    def __init__(
        self, padded_lens: Sequence[int], P: int, rank: int, device: torch.device | str = "cpu"
    ) -> None:
        if not padded_lens:
            raise ValueError("a micro-batch needs at least one sequence")
        bad = [n for n in padded_lens if n <= 0 or n % (2 * P)]
        if bad:
            raise ValueError(f"padded lengths must be positive multiples of 2P={2 * P}, got {bad}")
        if not 0 <= rank < P:
            raise ValueError(f"rank {rank} outside a group of {P}")
        self.padded_lens = tuple(int(n) for n in padded_lens)
        self.size = P
        self.rank = rank
        self.device = torch.device(device)
        bounds = [0]
        for n in self.padded_lens:
            bounds.append(bounds[-1] + n)
        self.bounds: list[int] = bounds
        """Global cumulative sequence lengths, natural order (Python ints)."""
        self.local_bounds: list[int] = [b // P for b in bounds]
        """Cumulative lengths of each sequence's local segment (two equal halves)."""
        self.total_tokens = bounds[-1]
        self.local_tokens = self.total_tokens // P

    # ------------------------------------------------------------------ local tokens
    def _dev(self, t: Tensor) -> Tensor:
        return t.to(self.device)

    @cached_property
    def cu_seqlens(self) -> Tensor:
        """(n+1,) int32 global cumulative lengths on the device (for varlen kernels)."""
        return self._dev(torch.tensor(self.bounds, dtype=torch.int32))

    @cached_property
    def local_natural_index(self) -> Tensor:
        """(T/P,) natural index of each local token."""
        return self._dev(self.members_natural_index([self.rank]))

    @property
    def positions(self) -> Tensor:
        """(T/P,) position of each local token inside its sequence (for rotary embeddings)."""
        return self.gathered([self.rank])[0]

    def _positions_of(self, natural: Tensor) -> Tensor:
        starts = torch.tensor(self.bounds[:-1], dtype=torch.int64)
        seq = torch.searchsorted(torch.tensor(self.bounds[1:]), natural, right=True)
        return self._dev(natural - starts[seq])

    # ------------------------------------------------------------------ groups of ranks
    def members_natural_index(self, members: Sequence[int]) -> Tensor:
        """Natural index of the tokens of `members` concatenated in that order (CPU int64)."""
        return torch.cat([zigzag_natural_index(self.padded_lens, self.size, m) for m in members])

    def gathered(self, members: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        """For the tokens of `members` concatenated (an all-gather or all-to-all over them):
        (positions, to_sorted, from_sorted) with x_sorted = x[to_sorted], x = x_sorted[from_sorted].

        Sorted by natural index is the natural order when members are all P ranks, and the zigzag
        layout of the outer ring when members are one inner group of a 2-D factorisation."""
        key = tuple(members)
        cache = self.__dict__.setdefault("_gathered_cache", {})
        if key not in cache:
            natural = self.members_natural_index(members)
            to_sorted = torch.argsort(natural)
            from_sorted = torch.empty_like(to_sorted)
            from_sorted[to_sorted] = torch.arange(len(to_sorted))
            cache[key] = (
                self._positions_of(natural),
                self._dev(to_sorted),
                self._dev(from_sorted),
            )
        return cache[key]

    def rotary(
        self, members: Sequence[int], d: int, theta: float, scaling=None, dtype=torch.float32
    ) -> tuple[Tensor, Tensor]:
        """The rotary (cos, sin) tables (`parallel_lib.ops.rotary_tables`) at the positions of
        `gathered(members)`, made once per micro-batch and shared by every layer's q and k."""
        key = (tuple(members), d, theta, scaling, dtype)
        cache = self.__dict__.setdefault("_rotary_cache", {})
        if key not in cache:
            cache[key] = rotary_tables(self.gathered(members)[0], d, theta, scaling, dtype)
        return cache[key]

    def shard(self, natural: Tensor) -> Tensor:
        """This rank's rows (T/P, ...) of a natural-order tensor (T, ...)."""
        if natural.shape[0] != self.total_tokens:
            raise ValueError(f"expected {self.total_tokens} rows, got {natural.shape[0]}")
        return natural.index_select(0, self.local_natural_index.to(natural.device))
