"""Instruction data: jsonl conversations whose prompts carry no loss.

A line is `{"prompt": str, "response": str}` or `{"messages": [{"role": str, "content": str},
...]}`. With a tokenizer that has a chat template the conversation is rendered by it (prompt and
response become a user and an assistant message) and only the assistant messages' tokens carry
loss: the tokens a message adds after the generation prompt of the messages before it, up to and
including the last end-of-sequence token among them (the end-of-turn token, `<|im_end|>` in
ChatML; what the template writes after it belongs to no one). Without a template (the byte
tokenizer too) a line is prompt + response + the tokenizer's eos if it has one, prompt masked.

Masked tokens are stored as their bitwise complement `~id` (negative) in the int64 documents, so
cutting, micro-batching and stream positions carry the mask unchanged; `paradyse.PackedBatch`
reads it back (input `id`, no target) and `target_count` counts what carries loss.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import DataError
from .files import corpus_files, parse_json_line, read_line
from .tokenizers import Tokenizer

__all__ = ["InstructCorpus", "encode_record", "target_count"]


def target_count(seq: Sequence[int] | np.ndarray) -> int:
    """Next-token targets of one document or piece: its tokens after the first that are not
    masked (not negative)."""
    ids = np.asarray(seq, dtype=np.int64)
    return int(np.count_nonzero(ids[1:] >= 0))


def _is_prefix(head: np.ndarray, ids: np.ndarray) -> bool:
    return len(head) <= len(ids) and bool(np.array_equal(ids[: len(head)], head))


def _chat_tokens(tokenizer: Any, messages: list[dict[str, str]], where: str) -> np.ndarray:
    """The rendered conversation, every token outside the assistant spans masked."""

    def render(part: list[dict[str, str]], generation_prompt: bool = False) -> np.ndarray:
        try:
            return tokenizer.render_chat(part, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja's TemplateError, and the template's own raise_exception
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(
                f"{where}: the chat template of {tokenizer.name!r} refuses the messages "
                f"({first}): fix the messages or use prompt/response lines"
            ) from None

    full = render(messages)
    keep = np.zeros(len(full), dtype=bool)
    eos = getattr(tokenizer, "eos_id", None)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head, upto = render(messages[:i], True), render(messages[: i + 1])
        if not (_is_prefix(head, upto) and _is_prefix(upto, full)):
            raise DataError(
                f"{where}: the chat template of {tokenizer.name!r} does not render the "
                f"conversation before message {i} as a token prefix of the whole, so the "
                "assistant's tokens cannot be found: use a tokenizer whose template renders "
                "prefixes as prefixes, or prompt/response lines with no template"
            )
        span = upto[len(head) :]
        end = len(upto)
        if eos is not None and eos in span:
            end = len(head) + int(np.flatnonzero(span == eos)[-1]) + 1
        keep[len(head) : end] = True
    return np.where(keep, full, ~full)


def encode_record(tokenizer: Tokenizer, record: Any, where: str) -> np.ndarray:
    """The tokens of one jsonl record, masked tokens as `~id`; `where` ("FILE line N") names
    the record in errors."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
        ok = isinstance(messages, list) and bool(messages)
        ok = ok and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        )
        if not ok:
            raise DataError(
                f"{where}: 'messages' must be a non-empty list of "
                '{"role": str, "content": str}: fix that line'
            )
        if template is None:
            raise DataError(
                f"{where} has 'messages' but tokenizer {tokenizer.name!r} has no chat template: "
                "set data.tokenizer to one with a chat template, or write prompt/response lines"
            )
        return _chat_tokens(tokenizer, messages, where)
    if not (isinstance(record, dict) and "prompt" in record and "response" in record):
        raise DataError(
            f'{where} has neither "messages" nor "prompt" and "response": write '
            '{"prompt": ..., "response": ...} or {"messages": [...]} on every line'
        )
    for key in ("prompt", "response"):
        if not isinstance(record[key], str):
            raise DataError(
                f"{where}: field {key!r} is a {type(record[key]).__name__}, not a string: fix "
                "that line"
            )
    if template is not None:
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
        return _chat_tokens(tokenizer, messages, where)
    prompt = np.asarray(tokenizer.encode(record["prompt"]), dtype=np.int64)
    response = np.asarray(tokenizer.encode(record["response"]), dtype=np.int64)
    eos = getattr(tokenizer, "eos_id", None)
    tail = np.asarray([] if eos is None else [eos], dtype=np.int64)
    return np.concatenate([~prompt, response, tail])


class InstructCorpus:
    """Instruction records from a `.jsonl` file or a directory of them (recursively, sorted by
    relative path), one document a line. Every line is checked and tokenized on opening;
    records with no token carrying loss (an empty response) are left out."""

    def __init__(self, path: str, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.name = path
        if not os.path.exists(path):
            raise DataError(
                f"data path {path!r} does not exist: set data.path to a .jsonl file of "
                "instruction records or a directory of them"
            )
        self.files = _jsonl_files(path)
        self._docs: list[tuple[int, int, int]] = []  # (file index, line's offset, line)
        lengths: list[int] = []
        for f, file in enumerate(self.files):
            offset = 0
            with open(file, "rb") as handle:
                for lineno, line in enumerate(handle, 1):
                    start, offset = offset, offset + len(line)
                    if not line.strip():
                        continue
                    tokens = self._encode(line, file, lineno)
                    if target_count(tokens) > 0:
                        self._docs.append((f, start, lineno))
                        lengths.append(len(tokens))
        if not self._docs:
            raise DataError(
                f"no instruction records with a response in {path!r}: add jsonl lines with a "
                "non-empty response or assistant message, or set data.path elsewhere"
            )
        self._lengths = np.array(lengths, dtype=np.int64)

    def _encode(self, line: bytes, file: str, lineno: int) -> np.ndarray:
        where = f"{file} line {lineno}"
        return encode_record(self.tokenizer, parse_json_line(line, where), where)

    def __len__(self) -> int:
        return len(self._docs)

    def length(self, i: int) -> int:
        return int(self._lengths[i])

    def tokens(self, i: int) -> np.ndarray:
        f, offset, lineno = self._docs[i]
        file = self.files[f]
        tokens = self._encode(read_line(file, offset), file, lineno)
        if len(tokens) != self._lengths[i]:
            raise DataError(f"{file} changed while the corpus was open: restart the run")
        return tokens


def _jsonl_files(path: str) -> list[str]:
    files = corpus_files(path, (".jsonl",))
    if not files:
        raise DataError(f"no .jsonl files under {path!r}: set data.path to a .jsonl file")
    return files
