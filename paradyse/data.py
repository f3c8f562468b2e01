"""Data sources and batching of the trainer (DESIGN 8). Stdlib and numpy only.

Sources: the embedded default corpus (the running Python's standard library sources, byte
tokens), jsonl or text files, and synthetic length distributions. `GlobalBatches` turns a source
into the global batch of every step, fixed by the seed and independent of the world size;
`assign_to_dp` balances a batch's sequences over dp groups by predicted cost and
`micro_batches` packs one group's share into micro-batches by a token budget per rank.
"""

from __future__ import annotations

import heapq
import json
import os
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = [
    "Batch",
    "ByteTokenizer",
    "DataError",
    "FileCorpus",
    "GlobalBatches",
    "HFTokenizer",
    "Source",
    "StdlibCorpus",
    "SyntheticLengths",
    "Tokenizer",
    "assign_to_dp",
    "load_tokenizer",
    "micro_batches",
    "open_source",
]

SOURCES = ("stdlib", "files", "synthetic")
TEXT_SUFFIXES = (".jsonl", ".txt", ".md", ".py")
"""The files a directory corpus reads (.jsonl one document a line, the others whole)."""


class DataError(ValueError):
    """A data setting or file the user can fix; the message says what to change, in one line."""


# ---------------------------------------------------------------------------------------------
# Tokenizers


class Tokenizer(Protocol):
    vocab_size: int
    name: str

    def encode(self, text: str) -> np.ndarray: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, no download, every text encodable."""

    vocab_size = 256
    name = "bytes"

    def encode(self, text: str) -> np.ndarray:
        # Lone surrogates (legal in JSON strings) become '?' rather than failing.
        data = text.encode("utf-8", errors="replace")
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)


class HFTokenizer:
    """A local Hugging Face tokenizer behind the `encode`/`vocab_size` interface."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self._tokenizer = tokenizer
        self.name = name
        self.vocab_size = len(tokenizer)  # counts added tokens too, unlike .vocab_size

    def encode(self, text: str) -> np.ndarray:
        ids = self._tokenizer.encode(text, add_special_tokens=False)
        return np.asarray(ids, dtype=np.int64).reshape(-1)


def load_tokenizer(name: str, vocab: int) -> Tokenizer:
    """ "bytes", or the local directory of a Hugging Face tokenizer (never downloaded); its vocab
    must fit in the model's `vocab`."""
    if name == "bytes":
        tokenizer: Tokenizer = ByteTokenizer()
    else:
        if not os.path.isdir(name):
            raise DataError(
                f"tokenizer {name!r} is neither 'bytes' nor a directory: set data.tokenizer to "
                "'bytes' or to a local Hugging Face tokenizer directory"
            )
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise DataError(
                f"tokenizer {name!r} needs the transformers package ({e}): install it or set "
                "data.tokenizer = 'bytes'"
            ) from None
        try:
            loaded = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception as e:  # transformers raises OSError, ValueError and others
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(
                f"cannot load tokenizer from {name!r} ({first}): set data.tokenizer to a "
                "directory saved by save_pretrained, or to 'bytes'"
            ) from None
        tokenizer = HFTokenizer(loaded, name)
    if tokenizer.vocab_size > vocab:
        raise DataError(
            f"tokenizer {name!r} has {tokenizer.vocab_size} tokens but the model's vocab is "
            f"{vocab}: raise the model's vocab size to at least {tokenizer.vocab_size}"
        )
    return tokenizer


def _encode_bytes(tokenizer: Tokenizer, data: bytes) -> np.ndarray:
    """Tokens of a file's bytes: the bytes themselves for the byte tokenizer."""
    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    return np.asarray(tokenizer.encode(data.decode("utf-8", errors="replace")), dtype=np.int64)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------
# Sources


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
        self.files = _corpus_files(path)
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
        try:
            record = json.loads(line)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
            raise DataError(
                f"{file} line {lineno} is not JSON ({reason}): fix or remove that line"
            ) from None
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
            with open(file, "rb") as handle:
                handle.seek(offset)
                line = handle.readline()
            tokens = np.asarray(self.tokenizer.encode(self._parse(line, file, lineno)), np.int64)
        if len(tokens) != self._lengths[i]:
            raise DataError(f"{file} changed while the corpus was open: restart the run")
        return tokens


def _corpus_files(path: str) -> list[str]:
    if not os.path.isdir(path):
        return [path]
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for filename in filenames:
            if filename.endswith(TEXT_SUFFIXES):
                file = os.path.join(dirpath, filename)
                found.append((os.path.relpath(file, path).replace(os.sep, "/"), file))
    return [file for _, file in sorted(found)]


class SyntheticLengths:
    """`count` documents whose lengths follow a named distribution of `paradyse.lengths`, with
    pseudo-random tokens in [0, vocab); document i's tokens depend only on (seed, i)."""

    def __init__(self, distribution: str, count: int, seed: int, vocab: int) -> None:
        from .lengths import LENGTH_DISTRIBUTIONS, sample_lengths

        if distribution not in LENGTH_DISTRIBUTIONS:
            known = ", ".join(LENGTH_DISTRIBUTIONS)
            raise DataError(
                f"unknown length distribution {distribution!r}: set data.distribution to one "
                f"of {known}"
            )
        _check_int("data.documents", count, 1)
        _check_int("train.seed", seed, 0)
        _check_int("the model's vocab", vocab, 1)
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
    """The source named by the data config: "stdlib", "files" (needs `path`) or "synthetic"."""
    if source == "stdlib":
        return StdlibCorpus(load_tokenizer(tokenizer, vocab))
    if source == "files":
        if not path:
            raise DataError(
                "data.source = 'files' needs data.path: set it to a .jsonl or text file or a "
                "directory"
            )
        return FileCorpus(path, load_tokenizer(tokenizer, vocab), field)
    if source == "synthetic":
        return SyntheticLengths(distribution, count, seed, vocab)
    raise DataError(f"unknown data source {source!r}: set data.source to one of {SOURCES}")


def _check_int(what: str, value: int, least: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
        raise DataError(f"{what} is {value!r}: set it to an integer >= {least}")


# ---------------------------------------------------------------------------------------------
# Global batches, dp balance and micro-batches


@dataclass(frozen=True, eq=False)
class Batch:
    """The global batch of one step: documents and pieces of documents, in stream order."""

    sequences: list[np.ndarray]
    """int64 token arrays, each at least 2 tokens (1 only where max_len is 2)."""
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


STATE_KEYS = ("epoch", "index", "start", "piece", "cut", "step", "seed", "documents")


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
        _check_int("data.tokens_per_step", tokens_per_step, 2)
        _check_int("data.max_seq_len", max_seq_len, 2)
        _check_int("train.seed", seed, 0)
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
        # Stream position: document `index` of epoch `epoch`; if entered (cut > 0), its rest
        # from token `start` is cut at `cut` and `piece` pieces of that are taken.
        self._epoch = self._index = self._start = self._piece = self._cut = self._step = 0
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
        count = len(self.source)
        epoch, index, start, piece, cut = (
            self._epoch, self._index, self._start, self._piece, self._cut
        )  # fmt: skip
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
                next_start, next_piece, next_cut = 0, 0, int(cut_len)
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
        self._epoch, self._index, self._start, self._piece, self._cut = (
            epoch, index, start, piece, cut
        )  # fmt: skip
        self._step += 1
        return Batch(sequences, split, longest)

    @property
    def step(self) -> int:
        """Batches taken so far."""
        return self._step

    def state_dict(self) -> dict[str, int]:
        """The stream position as plain ints (JSON-serialisable)."""
        return {
            "epoch": self._epoch,
            "index": self._index,
            "start": self._start,
            "piece": self._piece,
            "cut": self._cut,
            "step": self._step,
            "seed": self.seed,
            "documents": len(self.source),
        }

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
        self._epoch, self._index = values["epoch"], values["index"]
        self._start, self._piece, self._cut = values["start"], values["piece"], values["cut"]
        self._step = values["step"]


def assign_to_dp(lengths: Sequence[int], dp: int, cost: Callable[[int], float]) -> list[list[int]]:
    """Indices of the sequences for each of `dp` groups, balanced by `cost(length)`:
    longest-processing-time greedy (by decreasing cost, ties by index, each to the least-loaded
    group, ties by the lowest group), so the largest load is within 4/3 of the optimum. Each
    group's indices are sorted; a group is empty when there are fewer sequences than groups."""
    _check_int("dp", dp, 1)
    costs = [float(cost(int(n))) for n in lengths]
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    heap = [(0.0, g) for g in range(dp)]  # (load, group): pops the least load, then lowest group
    groups: list[list[int]] = [[] for _ in range(dp)]
    for i in order:
        load, g = heapq.heappop(heap)
        groups[g].append(i)
        heapq.heappush(heap, (load + costs[i], g))
    return [sorted(group) for group in groups]


def micro_batches(
    lengths: Sequence[int], indices: Sequence[int], *, tokens_per_rank: int, sp: int
) -> list[list[int]]:
    """Micro-batches of the sequences `indices` (into `lengths`) whose padded tokens per rank,
    sum(pad_length(n, sp)) // sp, stay <= tokens_per_rank; a sequence over that alone.

    First-fit decreasing by padded length (ties by index); indices sorted within a micro-batch,
    micro-batches ordered by their first index."""
    from parallel_lib import pad_length

    _check_int("tokens_per_rank", tokens_per_rank, 1)
    _check_int("sp", sp, 1)
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
