"""Files of a corpus folder, and a line of a file read at its offset (stdlib only)."""

from __future__ import annotations

import os

__all__ = ["TEXT_SUFFIXES", "corpus_files", "read_line"]

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
