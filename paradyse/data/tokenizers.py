"""Tokenizers: UTF-8 bytes (the default, nothing to download) or a local Hugging Face one (a
folder, or a GGUF file through `integrations.hf.tokenizer`)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
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
    eos_id: int | None = None
    """No end-of-sequence token."""
    chat_template: str | None = None
    """No chat template."""

    def encode(self, text: str) -> np.ndarray:
        # Lone surrogates (legal in JSON strings) become '?' rather than failing.
        data = text.encode("utf-8", errors="replace")
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)


class HFTokenizer:
    """A local Hugging Face tokenizer behind the `encode`/`vocab_size` interface, with what
    instruction data needs: its end-of-sequence id and its chat template."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self._tokenizer = tokenizer
        self.name = name
        self.vocab_size = len(tokenizer)  # counts added tokens too, unlike .vocab_size

    def encode(self, text: str) -> np.ndarray:
        ids = self._tokenizer.encode(text, add_special_tokens=False)
        return np.asarray(ids, dtype=np.int64).reshape(-1)

    @property
    def eos_id(self) -> int | None:
        """The end-of-sequence token's id; None if the tokenizer has none."""
        return self._tokenizer.eos_token_id

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template the tokenizer carries; None if it has none."""
        template = getattr(self._tokenizer, "chat_template", None)
        return template or None

    def render_chat(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
    ) -> np.ndarray:
        """The tokens of `messages` rendered by the chat template (special tokens only where the
        template writes them); a jinja error propagates (the caller names the record)."""
        ids = self._tokenizer.apply_chat_template(
            list(messages), tokenize=True, add_generation_prompt=add_generation_prompt
        )
        if isinstance(ids, dict):  # a BatchEncoding, from versions that return one
            ids = ids["input_ids"]
        return np.asarray(ids, dtype=np.int64).reshape(-1)


def load_tokenizer(name: str, vocab: int) -> Tokenizer:
    """ "bytes", the local directory of a Hugging Face tokenizer, or a `.gguf` file (never
    downloaded); its vocab must fit in the model's `vocab`."""
    if name == "bytes":
        tokenizer: Tokenizer = ByteTokenizer()
    elif name.endswith(".gguf"):
        tokenizer = HFTokenizer(_load_gguf(name), name)
    else:
        if not os.path.isdir(name):
            raise DataError(
                f"tokenizer {name!r} is neither 'bytes' nor a directory nor a .gguf file: set "
                "data.tokenizer to 'bytes', a local Hugging Face tokenizer folder or a .gguf file"
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
            f"{vocab}: set data.tokenizer to the model's own tokenizer (or, for a model drawn "
            f"from a seed, model.vocab to at least {tokenizer.vocab_size})"
        )
    return tokenizer


def _load_gguf(path: str) -> Any:
    """The tokenizer of a GGUF file, special tokens fixed from its metadata; the integration is
    imported through importlib, as configuration turns it on (DESIGN 2)."""
    try:
        module = importlib.import_module("integrations.hf.tokenizer")
    except ImportError as e:
        raise DataError(
            f"tokenizer {path!r} needs the integrations package of ParaDySe ({e}): install "
            "ParaDySe with its integrations or set data.tokenizer to a tokenizer directory"
        ) from None
    try:
        return module.load_hf_tokenizer(path)
    except ValueError as e:
        raise DataError(f"data.tokenizer: {e}") from None
