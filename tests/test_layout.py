"""The unified zigzag layout (`parallel_lib.layout`) and packed batches (`paradyse.PackedBatch`),
checked against index lists built by hand with Python loops."""

from __future__ import annotations

import pytest
import torch

from paradyse import IGNORE_INDEX, PackedBatch
from parallel_lib import ZigzagLayout, pad_length, zigzag_natural_index

# P -> (lengths, padded lengths written out by hand): one shorter than 2P, one not a multiple of
# 2P, one odd length, one exact multiple of 2P (which must not grow).
CASES = {
    1: ([1, 7, 37, 16], [2, 8, 38, 16]),
    2: ([3, 11, 37, 32], [4, 12, 40, 32]),
    4: ([7, 19, 37, 64], [8, 24, 40, 64]),
}
PS = sorted(CASES)


def hand_local_index(padded: list[int], P: int, rank: int) -> list[int]:
    """Natural index of rank's tokens: chunks r and 2P-1-r of every sequence, in sequence order."""
    out, start = [], 0
    for n in padded:
        c = n // (2 * P)
        for chunk in (rank, 2 * P - 1 - rank):
            for j in range(c):
                out.append(start + chunk * c + j)
        start += n
    return out


def hand_positions(padded: list[int], natural: list[int]) -> list[int]:
    """Position inside its own sequence of every natural index."""
    pos_of = []
    for n in padded:
        pos_of.extend(range(n))
    return [pos_of[i] for i in natural]


def random_sequences(lens: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 1000, (n,), generator=g).tolist() for n in lens]


# ---------------------------------------------------------------------------- pad_length


@pytest.mark.parametrize("P", PS)
def test_pad_length(P: int) -> None:
    lens, padded = CASES[P]
    assert [pad_length(n, P) for n in lens] == padded
    assert pad_length(1, P) == 2 * P
    assert pad_length(2 * P, P) == 2 * P
    assert pad_length(2 * P + 1, P) == 4 * P


@pytest.mark.parametrize("bad", [0, -3])
def test_pad_length_rejects_nonpositive(bad: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        pad_length(bad, 2)


# ---------------------------------------------------------------------------- local tokens


@pytest.mark.parametrize("P", PS)
def test_each_rank_holds_chunks_r_and_mirror(P: int) -> None:
    _, padded = CASES[P]
    T = sum(padded)
    seen = []
    for r in range(P):
        expected = hand_local_index(padded, P, r)
        got = zigzag_natural_index(padded, P, r)
        assert got.dtype == torch.int64
        assert got.tolist() == expected
        layout = ZigzagLayout(padded, P, r)
        assert layout.local_natural_index.tolist() == expected
        assert layout.local_tokens == len(expected) == T // P
        assert layout.total_tokens == T
        seen.extend(expected)
    assert sorted(seen) == list(range(T)), "the ranks together must hold every token once"


@pytest.mark.parametrize("P", PS)
def test_bounds_and_positions(P: int) -> None:
    _, padded = CASES[P]
    cum = [0]
    for n in padded:
        cum.append(cum[-1] + n)
    for r in range(P):
        layout = ZigzagLayout(padded, P, r)
        assert layout.bounds == cum
        assert layout.cu_seqlens.dtype == torch.int32
        assert layout.cu_seqlens.tolist() == cum
        assert layout.local_bounds == [c // P for c in cum]
        natural = hand_local_index(padded, P, r)
        assert layout.positions.tolist() == hand_positions(padded, natural)
        # each local segment is exactly the tokens of one sequence, as two equal halves
        lb = layout.local_bounds
        for i, n in enumerate(padded):
            seg = natural[lb[i] : lb[i + 1]]
            assert all(cum[i] <= t < cum[i + 1] for t in seg)
            assert len(seg) == n // P


def test_p1_is_plain_packing() -> None:
    lens, padded = CASES[1]
    layout = ZigzagLayout(padded, 1, 0)
    T = sum(padded)
    assert layout.local_natural_index.tolist() == list(range(T))
    positions, to_sorted, from_sorted = layout.gathered([0])
    assert to_sorted.tolist() == list(range(T))
    assert from_sorted.tolist() == list(range(T))
    assert positions.tolist() == hand_positions(padded, list(range(T)))
    seqs = random_sequences(lens, seed=5)
    batch = PackedBatch.pack(seqs, 1, 0, pad_id=0)
    flat = []
    for seq, n in zip(seqs, padded, strict=True):
        flat.extend(seq + [0] * (n - len(seq)))
    assert batch.input_ids.tolist() == flat


# ---------------------------------------------------------------------------- gathered order


@pytest.mark.parametrize("P", PS)
def test_gathered_all_ranks_sorts_to_natural(P: int) -> None:
    _, padded = CASES[P]
    T = sum(padded)
    members = list(range(P))
    natural = [t for m in members for t in hand_local_index(padded, P, m)]
    g = torch.Generator().manual_seed(P)
    values = torch.randn(T, 3, generator=g, dtype=torch.float64)  # a natural-order tensor
    gathered_x = values[torch.tensor(natural)]  # what an all-gather of the local rows yields
    for r in range(P):  # every rank computes the same maps
        layout = ZigzagLayout(padded, P, r)
        positions, to_sorted, from_sorted = layout.gathered(members)
        assert layout.members_natural_index(members).tolist() == natural
        assert positions.tolist() == hand_positions(padded, natural)
        assert torch.equal(gathered_x[to_sorted], values), "sorted gathered != natural order"
        assert torch.equal(gathered_x[to_sorted][from_sorted], gathered_x)
        assert to_sorted[from_sorted].tolist() == list(range(T))
        assert from_sorted[to_sorted].tolist() == list(range(T))


@pytest.mark.parametrize("members", [[1, 0], [3, 1, 2, 0]])
def test_gathered_any_member_order(members: list[int]) -> None:
    """The maps follow the members' order, whatever it is."""
    _, padded = CASES[4]
    layout = ZigzagLayout(padded, 4, 0)
    natural = torch.tensor([t for m in members for t in hand_local_index(padded, 4, m)])
    positions, to_sorted, from_sorted = layout.gathered(members)
    assert positions.tolist() == hand_positions(padded, natural.tolist())
    assert natural[to_sorted].tolist() == sorted(natural.tolist())
    assert natural[to_sorted][from_sorted].tolist() == natural.tolist()


def test_gathered_inner_group_gives_outer_zigzag() -> None:
    """P = 4 as inner 2 x outer 2: inner group o = ranks {2o, 2o+1}. Its tokens, sorted, are per
    sequence super-chunks o and 2c-1-o (c = 2 outer ranks, super-chunk = a quarter sequence)."""
    P, u, c = 4, 2, 2
    _, padded = CASES[P]
    starts = [sum(padded[:i]) for i in range(len(padded))]
    for o in range(c):
        members = [o * u + j for j in range(u)]
        expected = []
        for start, n in zip(starts, padded, strict=True):
            size = n // (2 * c)
            for sc in (o, 2 * c - 1 - o):
                expected.extend(range(start + sc * size, start + (sc + 1) * size))
        natural = torch.tensor([t for m in members for t in hand_local_index(padded, P, m)])
        for r in range(P):
            layout = ZigzagLayout(padded, P, r)
            positions, to_sorted, from_sorted = layout.gathered(members)
            assert natural[to_sorted].tolist() == expected, f"inner group {o} seen from rank {r}"
            assert to_sorted[from_sorted].tolist() == list(range(len(expected)))
            assert positions.tolist() == hand_positions(padded, natural.tolist())
        # and that sorted order is the zigzag layout of a ring of c over the same padded lengths
        assert expected == hand_local_index(padded, c, o)


@pytest.mark.parametrize("P", PS)
def test_shard_of_natural_tensor(P: int) -> None:
    _, padded = CASES[P]
    T = sum(padded)
    g = torch.Generator().manual_seed(100 + P)
    natural = torch.randn(T, 5, generator=g)
    for r in range(P):
        layout = ZigzagLayout(padded, P, r)
        expected = torch.stack([natural[i] for i in hand_local_index(padded, P, r)])
        assert torch.equal(layout.shard(natural), expected)
    with pytest.raises(ValueError, match=f"expected {T} rows"):
        ZigzagLayout(padded, P, 0).shard(natural[:-1])


# ---------------------------------------------------------------------------- PackedBatch


def hand_labels(seqs: list[list[int]], padded: list[int]) -> tuple[list[int], list[int]]:
    """Natural-order token ids (padding 0) and next-token labels."""
    ids, labels = [], []
    for seq, n in zip(seqs, padded, strict=True):
        for j in range(n):
            ids.append(seq[j] if j < len(seq) else 0)
            labels.append(seq[j + 1] if j + 1 < len(seq) else IGNORE_INDEX)
    return ids, labels


@pytest.mark.parametrize("P", PS)
def test_packed_batch_tokens_labels_and_masks(P: int) -> None:
    lens, padded = CASES[P]
    seqs = random_sequences(lens, seed=P)
    ids, labels = hand_labels(seqs, padded)
    real = [j < n for n, pn in zip(lens, padded, strict=True) for j in range(pn)]
    total_loss = 0
    for r in range(P):
        batch = PackedBatch.pack(seqs, P, r)
        idx = hand_local_index(padded, P, r)
        assert batch.sp_size == P and batch.sp_rank == r
        assert batch.seq_lens == tuple(lens)
        assert batch.total_tokens == sum(padded)
        assert batch.local_tokens == len(idx)
        assert batch.input_ids.dtype == torch.int64
        assert batch.input_ids.tolist() == [ids[i] for i in idx]
        assert batch.labels.tolist() == [labels[i] for i in idx]
        assert batch.loss_mask.dtype == torch.bool
        assert batch.loss_mask.tolist() == [labels[i] != IGNORE_INDEX for i in idx]
        assert batch.real_mask().tolist() == [real[i] for i in idx]
        assert batch.positions.tolist() == hand_positions(padded, idx)
        assert batch.cu_seqlens.tolist() == [sum(padded[:i]) for i in range(len(padded) + 1)]
        total_loss += int(batch.loss_mask.sum())
        assert batch.num_loss_tokens == sum(n - 1 for n in lens)
    assert total_loss == sum(n - 1 for n in lens)


def test_labels_never_cross_sequences() -> None:
    """The last token of a sequence has no label even when the next sequence starts right after
    it (no padding between them)."""
    seqs = [[11, 12, 13, 14], [21, 22, 23, 24]]  # both already multiples of 2P = 4
    batch = PackedBatch.pack(seqs, 2, 0)
    # rank 0 of P=2 holds chunks 0 and 3: tokens (11, 14) and (21, 24)
    assert batch.input_ids.tolist() == [11, 14, 21, 24]
    assert batch.labels.tolist() == [12, IGNORE_INDEX, 22, IGNORE_INDEX]
    assert batch.loss_mask.tolist() == [True, False, True, False]
    assert batch.real_mask().tolist() == [True] * 4
    batch1 = PackedBatch.pack(seqs, 2, 1)
    assert batch1.input_ids.tolist() == [12, 13, 22, 23]
    assert batch1.labels.tolist() == [13, 14, 23, 24]


def test_pad_id_and_padding_labels() -> None:
    seqs = [[5, 6, 7]]
    batch = PackedBatch.pack(seqs, 1, 0, pad_id=99)
    assert batch.input_ids.tolist() == [5, 6, 7, 99]
    assert batch.labels.tolist() == [6, 7, IGNORE_INDEX, IGNORE_INDEX]
    assert batch.real_mask().tolist() == [True, True, True, False]
    single = PackedBatch.pack([[42]], 2, 1)  # one token: no loss anywhere
    assert single.num_loss_tokens == 0
    assert not single.loss_mask.any()


# ---------------------------------------------------------------------------- bad input


def test_empty_batch_raises() -> None:
    with pytest.raises(ValueError, match="at least one sequence"):
        PackedBatch.pack([], 2, 0)
    with pytest.raises(ValueError, match="at least one sequence"):
        ZigzagLayout([], 2, 0)


def test_empty_sequence_raises() -> None:
    with pytest.raises(ValueError, match="at least one token"):
        PackedBatch.pack([[1, 2, 3], []], 2, 0)


@pytest.mark.parametrize("padded", [[6], [8, 10], [0], [-4]])
def test_bad_padded_length_raises(padded: list[int]) -> None:
    with pytest.raises(ValueError, match=r"multiples of 2P=4"):
        ZigzagLayout(padded, 2, 0)


@pytest.mark.parametrize("rank", [-1, 2])
def test_rank_outside_group_raises(rank: int) -> None:
    with pytest.raises(ValueError, match="outside a group of 2"):
        ZigzagLayout([4, 8], 2, rank)
