"""`usp`: 2-D sequence parallelism, Ulysses inside x ring outside (P = inner x outer)."""

from __future__ import annotations

from .zero3 import _VOLUME_DOC, Zero3Strategy


class UnifiedSequenceParallel(Zero3Strategy):
    __doc__ = (
        """Whole weights gathered one layer at a time (ZeRO-3); an all-to-all inside groups
    of u consecutive ranks trades tokens for heads, then ring attention runs across the c = P/u
    groups. `inner` fixes u; by default the largest divisor of P with 2 <= u <= P/2. In:"""
        + _VOLUME_DOC
    )

    name = "usp"
    holds_whole_sequences = False

    def __init__(self, attn_backend: str = "auto", inner: int | None = None) -> None:
        super().__init__(attn_backend)
        self.inner = inner

    def _choice(self, P: int) -> tuple[int | None, str]:
        if self.inner is not None:
            u = self.inner
            if u < 2 or P % u or P // u < 2:
                return None, (
                    f"usp inner degree {u} does not split P={P} into inner x outer with both "
                    "at least 2; choose a divisor of P between 2 and P/2"
                )
            return u, ""
        options = [u for u in range(2, P // 2 + 1) if P % u == 0]
        if not options:
            return None, (
                f"usp needs P = inner x outer with both at least 2, and P={P} has no such "
                "factorisation; use ulysses or ring, or a group size like 4 or 8"
            )
        return max(options), ""

    def supports(self, shape, P):
        ok, reason = super().supports(shape, P)
        if not ok:
            return ok, reason
        u, reason = self._choice(P)
        return (u is not None), reason

    def inner_degree(self, P: int) -> int:
        u, reason = self._choice(P)
        if u is None:
            raise ValueError(reason)
        return u

    def __repr__(self) -> str:
        return f"UnifiedSequenceParallel(inner={self.inner})"
