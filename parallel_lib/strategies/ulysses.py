"""`ulysses`: DeepSpeed-Ulysses all-to-all sequence parallelism with ZeRO-3 weights."""

from __future__ import annotations

from .zero3 import _VOLUME_DOC, Zero3Strategy


class Ulysses(Zero3Strategy):
    __doc__ = (
        """Whole weights are gathered one layer at a time (ZeRO-3); an all-to-all turns
    (T/P tokens, all heads) into (T tokens, heads/P) for exact causal attention over whole
    sequences, and back. u = P, c = 1 in:"""
        + _VOLUME_DOC
        + "    so with c = 1 there is no p2p.\n"
    )

    name = "ulysses"
    holds_whole_sequences = True

    def inner_degree(self, P: int) -> int:
        return P
