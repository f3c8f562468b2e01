"""Batching: `GlobalBatches` turns a source into the global batch of every step, fixed by the
seed and independent of the world size; `assign_to_dp` balances a batch's sequences over dp
groups by predicted cost and `micro_batches` packs one group's share into micro-batches by a
token budget per rank."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from cost_models.group_size import assign_sequences

from .errors import DataError, check_int
from .instruct import target_count
from .sources import Source, open_source


@dataclass(frozen=True, eq=False)
class Batch:
    """The global batch of one step: documents and pieces of documents, in stream order."""

    sequences: list[np.ndarray]
    """int64 token arrays, each at least 2 tokens (1 only where max_len is 2); a masked token
    (no next-token target, e.g. a prompt's) is stored as `~id` (see `paradyse.PackedBatch`)."""
    split: int = 0
    """Documents cut into several pieces whose first piece is in this batch."""
    longest_document: int = 0
    """The longest of those documents in tokens; 0 if none."""

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.sequences]

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def targets(self) -> int:
        """Tokens carrying loss (next-token targets, masked ones left out): what normalises the
        step's loss."""
        return sum(target_count(s) for s in self.sequences)


@dataclass(frozen=True)
class StreamPosition:
    """Where the stream of `GlobalBatches` stands between two batches: at document `index` of
    epoch `epoch`; if that document is entered (cut > 0), its rest from token `start` is cut
    into pieces of at most `cut` tokens and `piece` of them are taken."""

    epoch: int = 0
    """The epoch, which seeds the order of its documents."""
    index: int = 0
    """The next document's place in the epoch's order; len(source) reads as the next epoch."""
    start: int = 0
    """The token where the entered document's current cut begins; 0 if none is entered."""
    piece: int = 0
    """The pieces of the current cut already taken; 0 if none is entered."""
    cut: int = 0
    """The cut length of the entered document's rest; 0: no document entered."""
    step: int = 0
    """Batches taken so far."""


STATE_KEYS = ("epoch", "index", "start", "piece", "cut", "step", "seed", "documents")
"""The keys of `GlobalBatches.state_dict()`: the position's fields, then what it must match."""


class GlobalBatches:
    """The global batch of every step, fixed by the source and the seed alone (not by the world
    size).

    An endless stream: epoch e visits the documents in the order
    `np.random.default_rng([seed, e]).permutation(len(source))`, skipping those under 2 tokens
    (they hold no next-token target). A document of n tokens is entered with the cut length L
    of the call that takes its first piece and cut into ceil(n / L) consecutive near-equal pieces
    (sizes differ by at most one, shorter first); nothing is dropped. If a later call lowers
    max_len below the pieces still to come, the rest of that document is cut afresh at the new
    length. A step takes consecutive pieces while their total stays <= tokens_per_step, so a
    document's pieces may spread over consecutive steps."""

    def __init__(
        self, source: Source, *, tokens_per_step: int, max_seq_len: int, seed: int = 0
    ) -> None:
        check_int("data.tokens_per_step", tokens_per_step, 2)
        check_int("data.max_seq_len", max_seq_len, 2)
        check_int("train.seed", seed, 0)
        if max_seq_len > tokens_per_step:
            raise DataError(
                f"data.max_seq_len {max_seq_len} exceeds data.tokens_per_step "
                f"{tokens_per_step}: lower max_seq_len or raise tokens_per_step"
            )
        if len(source) == 0:
            raise DataError(f"data source {source.name!r} has no documents: choose another")
        self.source = source
        self.tokens_per_step = int(tokens_per_step)
        self.max_seq_len = int(max_seq_len)
        self.seed = int(seed)
        self._position = StreamPosition()
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._doc_cache: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _document(self, doc: int) -> np.ndarray:
        if self._doc_cache is None or self._doc_cache[0] != doc:
            self._doc_cache = (doc, np.asarray(self.source.tokens(doc), dtype=np.int64))
        return self._doc_cache[1]

    def next_batch(self, max_len: int | None = None) -> Batch:
        """The next step's batch; `max_len` (<= max_seq_len, default max_seq_len) is the cut
        length of the documents entered from now on."""
        cut_len = self.max_seq_len if max_len is None else max_len
        if not isinstance(cut_len, (int, np.integer)) or not 2 <= cut_len <= self.max_seq_len:
            raise DataError(f"max_len {cut_len!r} must be an integer in [2, {self.max_seq_len}]")
        cut_len = int(cut_len)  # a numpy integer would reach the JSON state
        count = len(self.source)
        p = self._position
        epoch, index, start, piece, cut = p.epoch, p.index, p.start, p.piece, p.cut
        sequences: list[np.ndarray] = []
        total = split = longest = skipped = 0
        while True:
            if index == count:
                epoch, index = epoch + 1, 0
            doc = int(self._order(epoch)[index])
            n = self.source.length(doc)
            entering = cut == 0
            if entering:
                if n < 2:
                    index, skipped = index + 1, skipped + 1
                    if skipped > count:
                        raise DataError(
                            f"no document of {self.source.name!r} has 2 or more tokens: "
                            "choose another data source"
                        )
                    continue
                next_start, next_piece, next_cut = 0, 0, cut_len
            else:
                next_start, next_piece, next_cut = start, piece, cut
                rest = n - start
                pieces = -(-rest // cut)
                if -(-rest // pieces) > cut_len:  # the pieces to come no longer fit: recut
                    next_start, next_piece, next_cut = start + piece * rest // pieces, 0, cut_len
            rest = n - next_start
            pieces = -(-rest // next_cut)
            a = next_start + next_piece * rest // pieces
            b = next_start + (next_piece + 1) * rest // pieces
            if sequences and total + (b - a) > self.tokens_per_step:
                break
            sequences.append(self._document(doc)[a:b].copy())
            total += b - a
            skipped = 0
            if entering and pieces > 1:
                split, longest = split + 1, max(longest, n)
            if next_piece + 1 == pieces:
                index, start, piece, cut = index + 1, 0, 0, 0
            else:
                start, piece, cut = next_start, next_piece + 1, next_cut
        self._position = StreamPosition(epoch, index, start, piece, cut, step=p.step + 1)
        return Batch(sequences, split, longest)

    @property
    def step(self) -> int:
        """Batches taken so far."""
        return self._position.step

    def state_dict(self) -> dict[str, int]:
        """The stream position as plain ints (JSON-serialisable)."""
        return {**asdict(self._position), "seed": self.seed, "documents": len(self.source)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the stream exactly where `state_dict()` was taken."""
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise DataError(f"data state lacks {missing}: resume from a checkpoint of this trainer")
        values = {key: int(state[key]) for key in STATE_KEYS}
        if values["seed"] != self.seed or values["documents"] != len(self.source):
            raise DataError(
                f"data state is of seed {values['seed']} over {values['documents']} documents, "
                f"this stream of seed {self.seed} over {len(self.source)}: resume with the "
                "checkpoint's data settings"
            )
        if min(values.values()) < 0 or values["index"] > len(self.source):
            raise DataError(f"data state {state} is out of range: resume from a valid checkpoint")
        self._position = StreamPosition(**{f.name: values[f.name] for f in fields(StreamPosition)})


def run_stream(data, vocab: int, seed: int) -> GlobalBatches:
    """The stream of global batches of a run's `[data]` config (`paradyse.DataConfig`), with
    the model's vocabulary and the run's seed: what the trainer trains on, and what a later
    reader of a checkpoint replays to know which text the model saw (`stream.source`)."""
    source = open_source(
        data.source, path=data.path, tokenizer=data.tokenizer, vocab=vocab, field=data.field,
        distribution=data.distribution, count=data.documents, seed=seed,
    )  # fmt: skip
    return GlobalBatches(source, tokens_per_step=data.tokens_per_step,
                         max_seq_len=data.max_seq_len, seed=seed)  # fmt: skip


def assign_to_dp(lengths: Sequence[int], dp: int, cost: Callable[[int], float]) -> list[list[int]]:
    """Indices of the sequences for each of `dp` groups, balanced by `cost(length)`
    (`cost_models.group_size.assign_sequences`: longest-processing-time greedy, the largest
    load within 4/3 of the optimum). Each group's indices are sorted; a group is empty when
    there are fewer sequences than groups."""
    check_int("dp", dp, 1)
    return assign_sequences([float(cost(int(n))) for n in lengths], dp)


def micro_batches(
    lengths: Sequence[int], indices: Sequence[int], *, tokens_per_rank: int, sp: int
) -> list[list[int]]:
    """Micro-batches of the sequences `indices` (into `lengths`) whose padded tokens per rank,
    sum(pad_length(n, sp)) // sp, stay <= tokens_per_rank; a sequence over that alone.

    First-fit decreasing by padded length (ties by index); indices sorted within a micro-batch,
    micro-batches ordered by their first index."""
    from parallel_lib import pad_length

    check_int("tokens_per_rank", tokens_per_rank, 1)
    check_int("sp", sp, 1)
    # pad_length is a multiple of 2 sp, so per-rank shares add up exactly.
    share = {i: pad_length(int(lengths[i]), sp) // sp for i in indices}
    if len(share) != len(indices):
        raise ValueError(f"indices must be distinct, got {list(indices)}")
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(share, key=lambda i: (-share[i], i)):
        for b, load in enumerate(loads):
            if load + share[i] <= tokens_per_rank:
                bins[b].append(i)
                loads[b] += share[i]
                break
        else:  # an oversize share opens its own bin and, over budget, never admits another
            bins.append([i])
            loads.append(share[i])
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])
