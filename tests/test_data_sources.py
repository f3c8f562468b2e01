"""paradyse.data: the tokenizers and the sources."""

from __future__ import annotations

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
    StdlibCorpus,
    SyntheticLengths,
    load_tokenizer,
    open_source,
)
from paradyse.lengths import sample_lengths


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
