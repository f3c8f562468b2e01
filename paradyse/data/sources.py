"""Sources: documents by index, from the running Python's standard library, from jsonl or text
files, or with synthetic lengths; `open_source` opens the one the data config names."""

from __future__ import annotations

import os
import sysconfig
from typing import Protocol

import numpy as np

from .errors import DataError, check_int
from .files import corpus_files, parse_json_line, read_line
from .instruct import InstructCorpus
from .tokenizers import ByteTokenizer, Tokenizer, load_tokenizer

SOURCES = ("stdlib", "files", "instruct", "synthetic")


class Source(Protocol):
    """Documents by index: `length(i)` is cheap, `tokens(i)` gives int64 arrays of that length."""

    name: str

    def __len__(self) -> int: ...

    def length(self, i: int) -> int: ...

    def tokens(self, i: int) -> np.ndarray: ...


class StdlibCorpus:
    """Every non-empty `*.py` file of the running Python's standard library (site-packages,
    dist-packages and __pycache__ left out), sorted by relative path; one document a file.

    With the byte tokenizer lengths are the file sizes, so opening is fast; files are read
    lazily. Other tokenizers tokenize a file the first time its length is asked for."""

    name = "stdlib"

    def __init__(self, tokenizer: Tokenizer | None = None) -> None:
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.root = sysconfig.get_paths()["stdlib"]
        found: list[tuple[str, int]] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            skip = ("site-packages", "dist-packages", "__pycache__")
            dirnames[:] = [d for d in dirnames if d not in skip]
            for filename in filenames:
                if not filename.endswith(".py"):
                    continue
                path = os.path.join(dirpath, filename)
                try:
                    size = os.stat(path).st_size
                except OSError:  # a broken link
                    continue
                if size > 0:
                    found.append((os.path.relpath(path, self.root).replace(os.sep, "/"), size))
        if not found:
            raise DataError(
                f"no Python sources under {self.root!r}: set data.source = 'files' and data.path"
            )
        found.sort()
        self.paths = [rel for rel, _ in found]
        self._bytes = isinstance(self.tokenizer, ByteTokenizer)
        # -1: not tokenized yet (only other tokenizers)
        sizes = [size for _, size in found]
        self._lengths = np.array(sizes if self._bytes else [-1] * len(sizes), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def length(self, i: int) -> int:
        if self._lengths[i] < 0:
            self._lengths[i] = len(self.tokens(i))
        return int(self._lengths[i])

    def tokens(self, i: int) -> np.ndarray:
        path = os.path.join(self.root, self.paths[i])
        tokens = _encode_bytes(self.tokenizer, _read(path))
        if self._bytes and len(tokens) != self._lengths[i]:
            raise DataError(f"{path} changed while the corpus was open: restart the run")
        return tokens


class FileCorpus:
    """Documents from a `.jsonl` file (one a line, text under `field`), any other file (the whole
    file is one document) or a directory (its *.jsonl, *.txt, *.md and *.py files, recursively,
    sorted by relative path). Every file is checked and tokenized once on opening; documents
    with no tokens are left out."""

    def __init__(self, path: str, tokenizer: Tokenizer | None = None, field: str = "text") -> None:
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.name = path
        self.field = field
        if not os.path.exists(path):
            raise DataError(
                f"data path {path!r} does not exist: set data.path to a .jsonl or text file "
                "or a directory"
            )
        self.files = corpus_files(path)
        self._docs: list[tuple[int, int, int]] = []  # (file index, line's offset or -1, line)
        lengths: list[int] = []
        for f, file in enumerate(self.files):
            if file.endswith(".jsonl"):
                for offset, lineno, n in self._scan_jsonl(file):
                    self._docs.append((f, offset, lineno))
                    lengths.append(n)
            else:
                n = self._text_length(file)
                if n > 0:
                    self._docs.append((f, -1, 0))
                    lengths.append(n)
        if not self._docs:
            raise DataError(
                f"no documents in {path!r}: add non-empty .jsonl, .txt, .md or .py files or set "
                "data.path elsewhere"
            )
        self._lengths = np.array(lengths, dtype=np.int64)

    def _text_length(self, file: str) -> int:
        if isinstance(self.tokenizer, ByteTokenizer):
            return os.stat(file).st_size
        return len(_encode_bytes(self.tokenizer, _read(file)))

    def _scan_jsonl(self, file: str) -> list[tuple[int, int, int]]:
        docs = []
        offset = 0
        with open(file, "rb") as handle:
            for lineno, line in enumerate(handle, 1):
                start, offset = offset, offset + len(line)
                if line.strip():
                    n = len(self.tokenizer.encode(self._parse(line, file, lineno)))
                    if n > 0:
                        docs.append((start, lineno, n))
        return docs

    def _parse(self, line: bytes, file: str, lineno: int) -> str:
        record = parse_json_line(line, f"{file} line {lineno}")
        if not isinstance(record, dict) or self.field not in record:
            raise DataError(
                f"{file} line {lineno} has no {self.field!r} field: set data.field to the key "
                "that holds the text"
            )
        text = record[self.field]
        if not isinstance(text, str):
            raise DataError(
                f"{file} line {lineno}: field {self.field!r} is a {type(text).__name__}, not a "
                "string: set data.field to the key that holds the text"
            )
        return text

    def __len__(self) -> int:
        return len(self._docs)

    def length(self, i: int) -> int:
        return int(self._lengths[i])

    def tokens(self, i: int) -> np.ndarray:
        f, offset, lineno = self._docs[i]
        file = self.files[f]
        if offset < 0:
            tokens = _encode_bytes(self.tokenizer, _read(file))
        else:
            line = read_line(file, offset)
            tokens = np.asarray(self.tokenizer.encode(self._parse(line, file, lineno)), np.int64)
        if len(tokens) != self._lengths[i]:
            raise DataError(f"{file} changed while the corpus was open: restart the run")
        return tokens


def _encode_bytes(tokenizer: Tokenizer, data: bytes) -> np.ndarray:
    """Tokens of a file's bytes: the bytes themselves for the byte tokenizer."""
    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    return np.asarray(tokenizer.encode(data.decode("utf-8", errors="replace")), dtype=np.int64)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class SyntheticLengths:
    """`count` documents whose lengths follow a named distribution of `paradyse.lengths`, with
    pseudo-random tokens in [0, vocab); document i's tokens depend only on (seed, i)."""

    def __init__(self, distribution: str, count: int, seed: int, vocab: int) -> None:
        from ..lengths import LENGTH_DISTRIBUTIONS, sample_lengths

        if distribution not in LENGTH_DISTRIBUTIONS:
            known = ", ".join(LENGTH_DISTRIBUTIONS)
            raise DataError(
                f"unknown length distribution {distribution!r}: set data.distribution to one "
                f"of {known}"
            )
        check_int("data.documents", count, 1)
        check_int("train.seed", seed, 0)
        check_int("the model's vocab", vocab, 1)
        self.name = f"synthetic:{distribution}"
        self.seed = seed
        self.vocab = vocab
        self._lengths = np.asarray(sample_lengths(distribution, count, seed), dtype=np.int64)

    def __len__(self) -> int:
        return len(self._lengths)

    def length(self, i: int) -> int:
        return int(self._lengths[i])

    def tokens(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, i])
        return rng.integers(0, self.vocab, int(self._lengths[i]), dtype=np.int64)


def open_source(
    source: str,
    *,
    path: str = "",
    tokenizer: str = "bytes",
    vocab: int = 256,
    field: str = "text",
    distribution: str = "githubcode",
    count: int = 10000,
    seed: int = 0,
) -> Source:
    """The source named by the data config: "stdlib", "files" or "instruct" (both need `path`)
    or "synthetic"."""
    if source == "stdlib":
        return StdlibCorpus(load_tokenizer(tokenizer, vocab))
    if source == "files":
        if not path:
            raise DataError(
                "data.source = 'files' needs data.path: set it to a .jsonl or text file or a "
                "directory"
            )
        return FileCorpus(path, load_tokenizer(tokenizer, vocab), field)
    if source == "instruct":
        if not path:
            raise DataError(
                "data.source = 'instruct' needs data.path: set it to a .jsonl file of "
                "prompt/response or messages records"
            )
        return InstructCorpus(path, load_tokenizer(tokenizer, vocab))
    if source == "synthetic":
        return SyntheticLengths(distribution, count, seed, vocab)
    raise DataError(f"unknown data source {source!r}: set data.source to one of {SOURCES}")
