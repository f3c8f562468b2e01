"""Host memory that behaves like CUDA's caching allocator: freed blocks are kept for reuse."""

from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_host_memory"]

# glibc mallopt(3) parameters, and the largest mmap threshold it accepts on 64-bit systems
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20
_INT_MAX = (1 << 31) - 1


def keep_freed_host_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system, as
    CUDA's caching allocator does on the device; True when applied (Linux with glibc).

    By default glibc serves a block above its mmap threshold with a fresh mapping and gives the
    top of its heap back once more than the trim threshold is free. A training step frees and
    re-allocates the same large activations every micro-batch, so each step then faults all
    their pages in again (measured slowdown: docs/python_api.md). Blocks of up to 32 MiB
    (glibc's largest threshold) now come from the heap, which is never trimmed; the process's
    resident memory stays near its highest peak (the budget bounds the tensors, not the heap's
    fragmentation)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # absent from musl and other C libraries
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    kept = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    return bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX) and kept)
