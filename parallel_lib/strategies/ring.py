"""`ring`: ring (context-parallel) attention, zigzag balanced, with ZeRO-3 weights."""

from __future__ import annotations

from .zero3 import _VOLUME_DOC, Zero3Strategy


class RingAttention(Zero3Strategy):
    __doc__ = (
        """Whole weights are gathered one layer at a time (ZeRO-3); every rank keeps its
    T/P tokens and all heads, and K/V chunks travel round the ring with the next chunk in flight
    while the current one is attended. u = 1, c = P in:"""
        + _VOLUME_DOC
        + "    so with u = 1 there is no all-to-all.\n"
    )

    name = "ring"
    holds_whole_sequences = False

    def inner_degree(self, P: int) -> int:
        return 1
