"""paradyse.data: sources, the global batch stream, dp balance and micro-batches."""

from __future__ import annotations

import itertools
import json
import sys
import sysconfig
import types
from pathlib import Path

import numpy as np
import pytest

from paradyse.data import (
    ByteTokenizer,
    DataError,
    FileCorpus,
    GlobalBatches,
    StdlibCorpus,
    SyntheticLengths,
    assign_to_dp,
    load_tokenizer,
    micro_batches,
    open_source,
)
from paradyse.lengths import sample_lengths


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
# Sources


def test_stdlib_corpus_is_the_stdlib_sources() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    expected = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(root).parts)
        and p.exists()
        and p.stat().st_size > 0
    )
    corpus = StdlibCorpus(ByteTokenizer())
    assert len(corpus) > 500
    assert corpus.paths == expected
    lengths = np.array([corpus.length(i) for i in range(len(corpus))])
    sample = list(range(0, len(corpus), len(corpus) // 15)) + [int(lengths.argmax())]
    for i in sample:
        data = (root / corpus.paths[i]).read_bytes()
        assert corpus.length(i) == len(data)
        np.testing.assert_array_equal(corpus.tokens(i), np.frombuffer(data, np.uint8))
        assert corpus.tokens(i).dtype == np.int64
    assert lengths.max() / np.median(lengths) > 50  # long-tailed
    assert lengths.min() >= 1


def test_byte_tokenizer_and_load_tokenizer_errors(tmp_path: Path) -> None:
    text = "héllo, 世界\n"
    np.testing.assert_array_equal(ByteTokenizer().encode(text), list(text.encode("utf-8")))
    assert isinstance(load_tokenizer("bytes", 256), ByteTokenizer)
    with pytest.raises(DataError, match="has 256 tokens but the model's vocab is 100"):
        load_tokenizer("bytes", 100)
    with pytest.raises(DataError, match="neither 'bytes' nor a directory"):
        load_tokenizer(str(tmp_path / "missing"), 1000)


def test_hf_tokenizer_wrapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class FakeTokenizer:
        def __len__(self) -> int:
            return 300

        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            assert add_special_tokens is False
            return [ord(c) for c in text]

    def from_pretrained(name: str, **kwargs):
        calls.append((name, kwargs))
        return FakeTokenizer()

    auto = types.SimpleNamespace(from_pretrained=from_pretrained)
    fake = types.SimpleNamespace(AutoTokenizer=auto)
    monkeypatch.setitem(sys.modules, "transformers", fake)
    tok = load_tokenizer(str(tmp_path), 1000)
    assert calls == [(str(tmp_path), {"local_files_only": True})]
    assert tok.vocab_size == 300
    np.testing.assert_array_equal(tok.encode("aé"), [97, 233])
    assert tok.encode("aé").dtype == np.int64
    with pytest.raises(DataError, match="has 300 tokens but the model's vocab is 299"):
        load_tokenizer(str(tmp_path), 299)

    # documents tokenized by it: jsonl text and a text file read as UTF-8
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "ab€"}) + "\n", encoding="utf-8")
    corpus = FileCorpus(str(tmp_path / "a.jsonl"), tok)
    assert corpus.length(0) == 3
    np.testing.assert_array_equal(corpus.tokens(0), [97, 98, 8364])

    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    with pytest.raises(DataError, match="needs the transformers package"):
        load_tokenizer(str(tmp_path), 1000)


def test_jsonl_corpus(tmp_path: Path) -> None:
    texts = ["hello", "", "ünïcode ✓", "x" * 300]
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": t, "other": 1}) for t in texts]
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n", encoding="utf-8")
    corpus = FileCorpus(str(path), ByteTokenizer())
    kept = [t for t in texts if t]  # the empty document and the blank line are left out
    assert len(corpus) == len(kept)
    for i, text in enumerate(kept):
        assert corpus.length(i) == len(text.encode("utf-8"))
        np.testing.assert_array_equal(corpus.tokens(i), list(text.encode("utf-8")))

    with pytest.raises(DataError, match="line 1: field 'other' is a int"):
        FileCorpus(str(path), ByteTokenizer(), field="other")


def test_jsonl_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl line 3 is not JSON") as info:
        FileCorpus(str(path))
    assert "\n" not in str(info.value)

    path.write_text('{"text": "a"}\n\n{"body": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl line 3 has no 'text' field.*data\.field"):
        FileCorpus(str(path))

    path.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1: field 'text' is a int, not a string"):
        FileCorpus(str(path))

    path.write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"line 1 is not JSON \(not UTF-8\)"):
        FileCorpus(str(path))


def test_missing_and_empty_paths(tmp_path: Path) -> None:
    missing = tmp_path / "x" / "y.jsonl"
    with pytest.raises(DataError, match=r"data path '.*y\.jsonl' does not exist: set data\.path"):
        FileCorpus(str(missing))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_bytes(b"")
    (tmp_path / "empty" / "data.csv").write_text("a,b\n")  # not a corpus suffix
    with pytest.raises(DataError, match="no documents in"):
        FileCorpus(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="needs data.path"):
        open_source("files")
    with pytest.raises(DataError, match="unknown data source 'web'"):
        open_source("web")


def test_text_file_and_directory_corpus(tmp_path: Path) -> None:
    single = tmp_path / "one.txt"
    single.write_bytes("line one\nline two ✓\n".encode())
    corpus = FileCorpus(str(single))
    assert len(corpus) == 1
    assert corpus.length(0) == len(single.read_bytes())
    np.testing.assert_array_equal(corpus.tokens(0), list(single.read_bytes()))

    root = tmp_path / "tree"
    (root / "sub" / "deeper").mkdir(parents=True)
    files = {
        "b.md": b"# title\n",
        "a.py": b"print('a')\n",
        "sub/z.txt": b"zzz",
        "sub/deeper/c.jsonl": b'{"text": "first"}\n{"text": ""}\n{"text": "third"}\n',
        "sub/empty.txt": b"",
        "sub/skip.csv": b"1,2\n",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    corpus = open_source("files", path=str(root))
    expected = [b"print('a')\n", b"# title\n", b"first", b"third", b"zzz"]  # sorted by rel. path
    assert len(corpus) == len(expected)
    for i, data in enumerate(expected):
        assert corpus.length(i) == len(data)
        np.testing.assert_array_equal(corpus.tokens(i), list(data))


def test_synthetic_lengths() -> None:
    source = SyntheticLengths("githubcode", 50, seed=3, vocab=1000)
    assert [source.length(i) for i in range(50)] == sample_lengths("githubcode", 50, 3)
    later = source.tokens(7)
    first = SyntheticLengths("githubcode", 50, seed=3, vocab=1000)
    np.testing.assert_array_equal(first.tokens(7), later)  # independent of what came before
    assert not np.array_equal(first.tokens(8)[:50], first.tokens(7)[:50])
    assert len(source.tokens(7)) == source.length(7)
    assert source.tokens(7).dtype == np.int64
    tokens = np.concatenate([source.tokens(i) for i in range(10)])
    assert tokens.min() >= 0 and tokens.max() < 1000 and len(np.unique(tokens)) > 900
    other = SyntheticLengths("githubcode", 50, seed=4, vocab=1000)
    assert [other.length(i) for i in range(50)] != [source.length(i) for i in range(50)]
    opened = open_source("synthetic", distribution="grch38", count=20, seed=1, vocab=64)
    assert [opened.length(i) for i in range(20)] == sample_lengths("grch38", 20, 1)
    assert opened.tokens(0).max() < 64
    with pytest.raises(DataError, match="unknown length distribution 'nope'"):
        SyntheticLengths("nope", 10, 0, 256)
    with pytest.raises(DataError, match="data.documents is 0"):
        open_source("synthetic", count=0)


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
