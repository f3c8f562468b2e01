"""Hugging Face tokenizers from a local folder or a GGUF file, never downloaded.

transformers' GGUF conversion gets a Llama-family file's special tokens wrong: it takes the BOS
token for the EOS token, prepends BOS to every encode whatever the file says, and sets no pad
token (seen on SmolLM2-135M-Instruct: eos '<|im_start|>' (1) where the file says 2 '<|im_end|>',
add_bos_token ignored). `load_hf_tokenizer` sets them from the file's own metadata, so that they
also hold after `save_pretrained` and a reload from that folder.

Errors a user can cause are a `ValueError` of one line saying what to change.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["GGUF_SPECIAL_TOKENS", "gguf_tokenizer_metadata", "load_hf_tokenizer"]

GGUF_SPECIAL_TOKENS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
"""The tokenizer's special-token attribute -> the GGUF key of its id."""
ADD_BOS = "tokenizer.ggml.add_bos_token"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ValueError(
            f"Hugging Face tokenizers need the transformers package ({e}): install it or use "
            "the byte tokenizer"
        ) from None
    return transformers


def gguf_tokenizer_metadata(path: str) -> dict[str, Any]:
    """The special-token settings a GGUF file states: add_bos_token (bool) and bos/eos/pad
    token ids, each only if the file has it."""
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ValueError(f"{path} needs the gguf package ({e}): install it") from None
    try:
        fields = GGUFReader(path).fields
    except Exception as e:  # a file that is not GGUF: ValueError, struct.error, OSError...
        raise ValueError(
            f"{path} is not a readable GGUF file ({_first_line(e)}): point to a .gguf model file "
            "or a tokenizer folder"
        ) from None
    found: dict[str, Any] = {}
    if ADD_BOS in fields:
        found["add_bos_token"] = bool(fields[ADD_BOS].contents())
    for attribute, key in GGUF_SPECIAL_TOKENS.items():
        if key in fields:
            found[attribute] = int(fields[key].contents())
    return found


def load_hf_tokenizer(path: str) -> Any:
    """A transformers fast tokenizer from a local folder (saved by `save_pretrained`) or a `.gguf`
    file, with the GGUF file's special tokens and add-BOS setting applied."""
    if not os.path.exists(path):
        raise ValueError(
            f"tokenizer path {path!r} does not exist: point to a local tokenizer folder or a "
            ".gguf file"
        )
    gguf = os.path.isfile(path)
    if gguf and not path.endswith(".gguf"):
        raise ValueError(
            f"tokenizer path {path!r} is a file but not a .gguf file: point to a local "
            "tokenizer folder or a .gguf file"
        )
    transformers = _transformers()
    metadata = gguf_tokenizer_metadata(path) if gguf else {}
    logging = transformers.utils.logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # GGUF loading warns about Llama's `legacy` default: moot here
    try:
        if gguf:
            folder, name = os.path.split(os.path.abspath(path))
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        else:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError and others
        what = "a GGUF file with tokenizer metadata" if gguf else "a save_pretrained folder"
        raise ValueError(
            f"cannot load a tokenizer from {path!r} ({_first_line(e)}): point to {what}"
        ) from None
    finally:
        logging.set_verbosity(verbosity)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{path!r} holds a slow (Python) tokenizer: save a fast one (tokenizer.json) there"
        )
    if metadata:
        _apply_gguf_metadata(tokenizer, metadata, path)
    return tokenizer


def _apply_gguf_metadata(tokenizer: Any, metadata: dict[str, Any], path: str) -> None:
    """Set the special tokens and add-BOS behaviour the GGUF file states."""
    size = len(tokenizer)
    for attribute in GGUF_SPECIAL_TOKENS:
        if attribute in metadata:
            token_id = metadata[attribute]
            if not 0 <= token_id < size:
                raise ValueError(
                    f"{path}: {GGUF_SPECIAL_TOKENS[attribute]} is {token_id}, outside the "
                    f"tokenizer's {size} tokens: fix the file's metadata"
                )
            setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(token_id))
    add_bos = metadata.get("add_bos_token")
    if add_bos is None:
        return
    if hasattr(type(tokenizer), "add_bos_token"):  # Llama's fast tokenizer rebuilds its template
        tokenizer.add_bos_token = add_bos
    elif hasattr(tokenizer, "update_post_processor"):
        tokenizer.update_post_processor()
    bos = tokenizer.bos_token_id
    if not add_bos and bos is not None and tokenizer("a").input_ids[:1] == [bos]:
        # A tokenizer class with no add_bos_token switch: drop the template's special tokens.
        from tokenizers import processors

        tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
            single="$A:0", pair="$A:0 $B:1", special_tokens=[]
        )
