"""Tokenizers: UTF-8 bytes (the default, nothing to download) or a local Hugging Face one."""

from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np

from .errors import DataError


class Tokenizer(Protocol):
    """What the sources need of a tokenizer: a name, its vocab size, and text to int64 tokens."""

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
