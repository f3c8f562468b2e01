"""Files of a corpus folder, a line of a file read at its offset, and a JSON line parsed
(stdlib only)."""

from __future__ import annotations

import json
import os
from typing import Any

from .errors import DataError

__all__ = ["TEXT_SUFFIXES", "corpus_files", "parse_json_line", "read_line"]

TEXT_SUFFIXES = (".jsonl", ".txt", ".md", ".py")
"""The files a directory corpus reads (.jsonl one document a line, the others whole)."""


def corpus_files(path: str, suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> list[str]:
    """`path` itself, or the files of the directory `path` ending in `suffixes`, recursively,
    sorted by relative path."""
    if not os.path.isdir(path):
        return [path]
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for filename in filenames:
            if filename.endswith(suffixes):
                file = os.path.join(dirpath, filename)
                found.append((os.path.relpath(file, path).replace(os.sep, "/"), file))
    return [file for _, file in sorted(found)]


def read_line(file: str, offset: int) -> bytes:
    """The line of `file` that starts at byte `offset`."""
    with open(file, "rb") as handle:
        handle.seek(offset)
        return handle.readline()


def parse_json_line(line: bytes, where: str) -> Any:
    """The JSON value of one line of a .jsonl file; DataError, one line naming `where`."""
    try:
        return json.loads(line)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise DataError(f"{where} is not JSON ({reason}): fix or remove that line") from None
