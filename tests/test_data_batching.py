"""paradyse.data: the global batch stream, dp balance and micro-batches."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from paradyse.data import (
    DataError,
    GlobalBatches,
    SyntheticLengths,
    assign_to_dp,
    micro_batches,
    open_source,
)
from paradyse.data.batching import STATE_KEYS


class ListSource:
    """Documents given as arrays (lengths 0 and 1 allowed, unlike the real sources)."""

    name = "list"

    def __init__(self, lengths: list[int], seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.docs = [rng.integers(0, 1000, n, dtype=np.int64) for n in lengths]

    def __len__(self) -> int:
        return len(self.docs)

    def length(self, i: int) -> int:
        return len(self.docs[i])

    def tokens(self, i: int) -> np.ndarray:
        return self.docs[i]


def stream_documents(source, seed: int):
    """The documents of the stream, in order, computed from the documented rule."""
    for epoch in itertools.count():
        for doc in np.random.default_rng([seed, epoch]).permutation(len(source)):
            if source.length(int(doc)) >= 2:
                yield int(doc), source.tokens(int(doc))


def check_stream(source, batches, seed: int, max_lens):
    """Walk the batches' pieces against the documents; return per batch the documents whose
    first piece it holds, each with its piece sizes (complete for the documents finished)."""
    docs = stream_documents(source, seed)
    doc, tokens = next(docs)
    offset = 0
    firsts: list[list[int]] = []
    pieces: dict[int, list[int]] = {}
    key = 0
    for batch, max_len in zip(batches, max_lens, strict=True):
        firsts.append([])
        for seq in batch.sequences:
            assert seq.dtype == np.int64
            assert 2 <= len(seq) <= max_len
            if offset == 0:
                key += 1
                firsts[-1].append(key)
                pieces[key] = [len(tokens)]
            # a piece never straddles two documents and reproduces the next tokens exactly
            np.testing.assert_array_equal(seq, tokens[offset : offset + len(seq)])
            pieces[key].append(len(seq))
            offset += len(seq)
            if offset == len(tokens):
                doc, tokens = next(docs)
                offset = 0
    return firsts, pieces


def near_equal(n: int, cut: int) -> list[int]:
    m = -(-n // cut)
    return [n // m + (1 if j >= m - n % m else 0) for j in range(m)]


# ---------------------------------------------------------------------------------------------
# The global batch stream


LENGTHS = [37, 1, 120, 0, 5, 64, 2, 300, 9, 33, 1, 77]


def test_global_batches_reproduce_the_documents_across_epochs() -> None:
    source = ListSource(LENGTHS)
    stream = GlobalBatches(source, tokens_per_step=100, max_seq_len=50, seed=5)
    batches = [stream.next_batch() for _ in range(60)]  # about 6 epochs
    firsts, pieces = check_stream(source, batches, 5, [50] * 60)
    assert stream.state_dict()["epoch"] >= 4
    for b, batch in enumerate(batches):
        assert 0 < batch.tokens <= 100
        assert batch.lengths == [len(s) for s in batch.sequences]
        assert batch.tokens == sum(batch.lengths)
        # greedy: the next batch's first piece would not have fitted
        if b + 1 < len(batches):
            assert batch.tokens + batches[b + 1].lengths[0] > 100
        split_docs = [pieces[k][0] for k in firsts[b] if pieces[k][0] > 50]
        assert batch.split == len(split_docs)
        assert batch.longest_document == max(split_docs, default=0)
    finished = [p for p in pieces.values() if sum(p[1:]) == p[0]]
    assert len(finished) > 30
    for n, *sizes in finished:  # near-equal pieces, shorter first
        assert sizes == near_equal(n, 50)
    assert sum(batch.split for batch in batches) > 5


def test_global_batches_seeded() -> None:
    source = SyntheticLengths("githubcode", 40, seed=0, vocab=500)

    def run(seed: int) -> list[list[np.ndarray]]:
        stream = GlobalBatches(source, tokens_per_step=8192, max_seq_len=2048, seed=seed)
        return [stream.next_batch().sequences for _ in range(8)]

    a, b, c = run(1), run(1), run(2)
    assert [len(s) for x in a for s in x] == [len(s) for x in b for s in x]
    for x, y in zip(itertools.chain(*a), itertools.chain(*b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert [len(s) for x in a for s in x] != [len(s) for x in c for s in x]


def test_lowering_max_len_mid_stream() -> None:
    source = ListSource([400, 30, 250, 3, 90, 61, 500, 7], seed=1)
    stream = GlobalBatches(source, tokens_per_step=256, max_seq_len=128, seed=0)
    max_lens = [128] * 3 + [40] * 6 + [17] * 10 + [128] * 4
    batches = [stream.next_batch(m) for m in max_lens]
    # every piece, including the rest of a document entered before the lowering, fits
    check_stream(source, batches, 0, max_lens)
    assert max(max(b.lengths) for b in batches[3:9]) <= 40
    assert max(max(b.lengths) for b in batches[9:19]) > 8  # not needlessly short
    with pytest.raises(DataError, match=r"max_len 129 must be an integer in \[2, 128\]"):
        stream.next_batch(129)
    with pytest.raises(DataError, match="max_len 1"):
        stream.next_batch(1)


def test_state_dict_round_trip() -> None:
    source = ListSource([400, 30, 250, 3, 90, 61, 500, 7, 1], seed=2)
    max_lens = [64, 64, 48, 48, 30, 30, 64, 20, 64, 64]

    def fresh() -> GlobalBatches:
        return GlobalBatches(source, tokens_per_step=100, max_seq_len=64, seed=9)

    whole = fresh()
    expected = [whole.next_batch(m) for m in max_lens[:8]]
    stopped = fresh()
    for m in max_lens[:3]:
        stopped.next_batch(m)
    state = stopped.state_dict()
    assert state["piece"] > 0  # stopped inside a document: the hard case
    assert all(type(v) is int for v in state.values())
    resumed = fresh()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert resumed.state_dict() == state
    for want, m in zip(expected[3:], max_lens[3:8], strict=True):
        got = resumed.next_batch(m)
        assert got.lengths == want.lengths
        assert (got.split, got.longest_document) == (want.split, want.longest_document)
        for x, y in zip(got.sequences, want.sequences, strict=True):
            np.testing.assert_array_equal(x, y)
    assert resumed.state_dict() == whole.state_dict()
    assert resumed.state_dict()["step"] == 8

    other = GlobalBatches(source, tokens_per_step=100, max_seq_len=64, seed=8)
    with pytest.raises(DataError, match="seed 9"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="lacks"):
        resumed.load_state_dict({"epoch": 0})


def test_resume_after_every_step() -> None:
    """Resuming from the state after any step continues exactly: inside a document, inside one a
    lowered max_len cut afresh (start > 0), over epochs. The state keeps its keys and order."""
    source = ListSource([400, 30, 250, 3, 90, 61, 500, 7, 1], seed=3)
    max_lens = [64, 64, 20, 48, 17, 64, 30, 30, 9, 64] * 4

    def fresh() -> GlobalBatches:
        return GlobalBatches(source, tokens_per_step=100, max_seq_len=64, seed=4)

    whole = fresh()
    states, batches = [], []
    for m in max_lens:
        states.append(whole.state_dict())
        batches.append(whole.next_batch(m))
    for state, want, m in zip(states, batches, max_lens, strict=True):
        assert list(state) == list(STATE_KEYS)
        assert all(type(v) is int for v in state.values())
        resumed = fresh()
        resumed.load_state_dict(json.loads(json.dumps(state)))
        assert resumed.state_dict() == state
        got = resumed.next_batch(m)
        assert got.lengths == want.lengths
        assert (got.split, got.longest_document) == (want.split, want.longest_document)
        for x, y in zip(got.sequences, want.sequences, strict=True):
            np.testing.assert_array_equal(x, y)
    assert any(s["piece"] > 0 and s["start"] == 0 for s in states)
    assert any(s["start"] > 0 for s in states)
    assert states[-1]["epoch"] >= 2
    with pytest.raises(DataError, match="out of range"):
        fresh().load_state_dict({**states[5], "index": len(source) + 1})
    with pytest.raises(DataError, match="out of range"):
        fresh().load_state_dict({**states[5], "piece": -1})


def test_global_batches_validation() -> None:
    source = ListSource([10, 20])
    with pytest.raises(DataError, match="data.max_seq_len 200 exceeds data.tokens_per_step 100"):
        GlobalBatches(source, tokens_per_step=100, max_seq_len=200)
    with pytest.raises(DataError, match="tokens_per_step is 1"):
        GlobalBatches(source, tokens_per_step=1, max_seq_len=1)
    with pytest.raises(DataError, match="max_seq_len is 1"):
        GlobalBatches(source, tokens_per_step=10, max_seq_len=1)
    with pytest.raises(DataError, match="train.seed is -1"):
        GlobalBatches(source, tokens_per_step=10, max_seq_len=10, seed=-1)
    tiny = GlobalBatches(ListSource([1, 0, 1]), tokens_per_step=10, max_seq_len=10)
    with pytest.raises(DataError, match="has 2 or more tokens"):
        tiny.next_batch()


def test_global_batches_stdlib_smoke() -> None:
    corpus = open_source("stdlib")
    stream = GlobalBatches(corpus, tokens_per_step=65536, max_seq_len=8192, seed=0)
    batches = [stream.next_batch() for _ in range(4)]
    firsts, pieces = check_stream(corpus, batches, 0, [8192] * 4)
    assert all(b.tokens <= 65536 for b in batches)
    assert sum(b.tokens for b in batches) > 4 * 60000  # full steps


# ---------------------------------------------------------------------------------------------
# dp balance and micro-batches


def optimum(costs: list[float], dp: int) -> float:
    best = float("inf")
    for groups in itertools.product(range(dp), repeat=len(costs)):
        loads = [0.0] * dp
        for c, g in zip(costs, groups, strict=True):
            loads[g] += c
        best = min(best, max(loads))
    return best


def test_assign_to_dp_balance() -> None:
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(60):
        n = int(rng.integers(1, 9))
        dp = int(rng.integers(2, 4))
        lengths = rng.integers(1, 5000, n).tolist()
        cost = lambda x: x + 1e-4 * x * x  # noqa: E731
        groups = assign_to_dp(lengths, dp, cost)
        assert len(groups) == dp
        assert sorted(i for g in groups for i in g) == list(range(n))
        assert all(g == sorted(g) for g in groups)
        loads = [sum(cost(lengths[i]) for i in g) for g in groups]
        best = optimum([cost(x) for x in lengths], dp)
        assert max(loads) <= 4 / 3 * best + 1e-9
        checked += max(loads) > best + 1e-9  # LPT is not always optimal: the bound matters
    assert checked > 0


def test_assign_to_dp_exact() -> None:
    # LPT by hand: 7->g0, 6->g1, 5->g1 (11), 4->g0 (11), 3 -> tie at 11 -> g0
    assert assign_to_dp([7, 6, 5, 4, 3], 2, float) == [[0, 3, 4], [1, 2]]
    # equal costs: by index, each to the lowest of the least-loaded groups
    assert assign_to_dp([5, 5, 5, 5, 5], 3, float) == [[0, 3], [1, 4], [2]]
    assert assign_to_dp([3, 9, 1], 1, float) == [[0, 1, 2]]
    assert assign_to_dp([3, 9], 4, float) == [[1], [0], [], []]
    assert assign_to_dp([], 2, float) == [[], []]
    with pytest.raises(DataError, match="dp is 0"):
        assign_to_dp([1], 0, float)


def padded_share(n: int, sp: int) -> int:
    return max(1, -(-n // (2 * sp))) * 2 * sp // sp


@pytest.mark.parametrize("sp", [1, 2, 4])
def test_micro_batches_random(sp: int) -> None:
    rng = np.random.default_rng(sp)
    for _ in range(50):
        lengths = rng.integers(1, 3000, int(rng.integers(1, 30))).tolist()
        indices = sorted(rng.choice(len(lengths), int(rng.integers(1, len(lengths) + 1)), False))
        budget = int(rng.integers(4, 4000))
        batches = micro_batches(lengths, indices, tokens_per_rank=budget, sp=sp)
        assert sorted(i for b in batches for i in b) == sorted(int(i) for i in indices)
        assert [b[0] for b in batches] == sorted(b[0] for b in batches)
        loads = []
        for b in batches:
            assert b == sorted(b)
            load = sum(padded_share(lengths[i], sp) for i in b)
            assert load <= budget or len(b) == 1
            if load <= budget:
                loads.append(load)
        for i in indices:  # an oversize sequence is alone
            if padded_share(lengths[i], sp) > budget:
                assert [i] in batches
        # first fit: no two micro-batches within budget could have been one
        for x, y in itertools.combinations(loads, 2):
            assert x + y > budget


def test_micro_batches_exact() -> None:
    # sp = 2: padded to multiples of 4 -> shares 4, 2, 4, 2, 20 (oversize for a budget of 8)
    lengths = [5, 3, 8, 1, 40]
    assert micro_batches(lengths, range(5), tokens_per_rank=8, sp=2) == [[0, 2], [1, 3], [4]]
    assert micro_batches(lengths, [3, 1], tokens_per_rank=8, sp=2) == [[1, 3]]
    assert micro_batches(lengths, [], tokens_per_rank=8, sp=2) == []
    # sp = 1: shares 6, 4, 8, 2, 40; FFD order 4, 2, 0, 1, 3 under a budget of 10
    assert micro_batches(lengths, range(5), tokens_per_rank=10, sp=1) == [[0, 1], [2, 3], [4]]
    with pytest.raises(DataError, match="tokens_per_rank is 0"):
        micro_batches(lengths, [0], tokens_per_rank=0, sp=1)
