"""The micro-batch mix of `benchmarks/adaptive_vs_static.py` (and the windows `peers.py` trains
on): lengths spaced geometrically, as many sequences per micro-batch as a token budget holds,
windows of default-corpus documents chosen by a seed (the same on every rank)."""

from __future__ import annotations

import numpy as np

from paradyse.data import StdlibCorpus

__all__ = ["corpus_windows", "micro_batch_lengths", "micro_batches_of", "sequences_per_batch"]


def micro_batch_lengths(
    count: int, shortest: int, longest: int, seed: int, repeat_short: bool = True
) -> list[int]:
    """`count` lengths spaced geometrically from shortest to longest (both included), each
    repeated ceil(sqrt(longest / length)) times when `repeat_short`, shuffled."""
    if count < 1 or shortest < 2 or longest < shortest:
        raise ValueError(
            f"need --batches >= 1 and 2 <= --min-tokens <= --max-tokens, got {count}, "
            f"{shortest}, {longest}"
        )
    lengths = sorted({int(round(x)) for x in np.geomspace(shortest, longest, count)})
    while len(lengths) < count:  # rounding merged some: repeat the longest
        lengths.append(longest)
    if repeat_short:
        lengths = [n for n in lengths for _ in range(int(np.ceil(np.sqrt(longest / n))))]
    order = np.random.default_rng(seed).permutation(len(lengths))
    return [lengths[i] for i in order]


def micro_batches_of(lengths: list[int], counts: list[int], seed: int) -> list[list[list[int]]]:
    """Per length n and count k, k windows of n tokens (`corpus_windows`)."""
    windows = corpus_windows([n for n, k in zip(lengths, counts, strict=True)
                              for _ in range(k)], seed)  # fmt: skip
    batches, start = [], 0
    for k in counts:
        batches.append(windows[start : start + k])
        start += k
    return batches


def sequences_per_batch(lengths: list[int], wanted: int, sp: int, max_tokens: int) -> list[int]:
    """Per length, `wanted` sequences, or (wanted 0) as many as fit in `max_tokens` tokens, at
    most sp and at least one: a micro-batch filled to a token budget, as training forms them."""
    if wanted:
        return [wanted] * len(lengths)
    return [max(1, min(sp, max_tokens // n)) for n in lengths]


def corpus_windows(lengths: list[int], seed: int) -> list[list[int]]:
    """Per length, a window of that many tokens of a default-corpus document at least as long,
    chosen by the seed (the corpus is sorted by path, so the same on every rank)."""
    corpus = StdlibCorpus()
    sizes = np.array([corpus.length(i) for i in range(len(corpus))])
    rng = np.random.default_rng(seed + 1)
    windows = []
    for n in lengths:
        long_enough = np.flatnonzero(sizes >= n)
        if len(long_enough) == 0:
            raise ValueError(
                f"no document of the default corpus has {n} tokens: lower --max-tokens"
            )
        doc = int(long_enough[rng.integers(len(long_enough))])
        start = int(rng.integers(sizes[doc] - n + 1))
        windows.append(corpus.tokens(doc)[start : start + n].tolist())
    return windows
