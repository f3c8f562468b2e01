"""The ZeRO-3 family: whole weights gathered one layer at a time, attention over P = u x c.

`ulysses`, `ring` and `usp` are one algorithm (as in `parallel_lib.strategies.zero3`): an
all-to-all inside inner groups of u ranks trades tokens for heads, then ring attention runs
across the c inner groups. ulysses is u = P, c = 1; ring is u = 1, c = P; usp has both >= 2.
"""

from __future__ import annotations

from .base import StrategyCost


class Zero3Cost(StrategyCost):
    """Shared costs; subclasses choose the factorisation and the phases they have.

    Their communication is the formula of `parallel_lib.strategies.zero3`'s `_VOLUME_DOC`
    (in the docstrings of ulysses, ring and usp), computed here.
    """

    mlp_mode = "zero3"

    def matmul(self, m, i, o, column):
        return (m.T // m.P, i, o), 1

    def attention_layout(self, m):
        return m.Q // m.d // m.u, m.c, 1

    # ------------------------------------------------------------------ collectives
    @staticmethod
    def _weights(m) -> int:
        return (m.P - 1) * (m.attention_shard + m.mlp_shard) * m.e

    @staticmethod
    def _all_to_all(m) -> tuple[int, int]:
        """(bytes, calls) of the Q/K/V all-to-all and the output's all-to-all back."""
        return (m.u - 1) * m.tl * (2 * m.Q + 2 * m.K) * m.e // m.u, 2 if m.u > 1 else 0

    @staticmethod
    def _ring(m) -> tuple[int, int]:
        """(bytes, calls) of the forward's K/V ring messages."""
        return (m.c - 1) * 2 * m.tl * m.K * m.e, m.c - 1

    def forward_traffic(self, t, m):
        t.add("all_gather", self._weights(m), 4)
        t.add("all_to_all", *self._all_to_all(m))
        t.add("p2p", *self._ring(m))

    def backward_traffic(self, t, m):
        t.add("all_gather", self._weights(m), 4)
        if m.trainable:
            self.weight_grad_traffic(t, m)
        t.add("all_to_all", *self._all_to_all(m))
        ring, calls = self._ring(m)
        if m.c > 1:  # the K/V gradients' float32 sums travel a whole round more
            ring, calls = ring + m.c * 2 * m.tl * m.K * m.a, 2 * m.c - 1
        t.add("p2p", ring, calls)

    def weight_grad_traffic(self, t, m):
        t.add("reduce_scatter", self._weights(m), 4)

    def recompute_traffic(self, t, m, recompute):
        if recompute == "full":
            t.add("all_to_all", *self._all_to_all(m))
            t.add("p2p", *self._ring(m))

    def p2p_hidden_under(self, matmul, attention):
        return attention  # K/V travel while attention computes

    # ------------------------------------------------------------------ replay
    def tokens_attended(self, m):
        return m.u * m.tl

    def sorts(self, m):
        return m.u > 1

    def runs_all_to_all(self, m):
        return m.u > 1

    def shard_blocks(self, m):
        return m.P // m.u

    def replay_linear_forward(self, tape, m, column, i, o, keep):
        weight = tape.alloc(i * o * m.w)
        out = tape.alloc(m.tl * o * m.e)
        if not keep:
            tape.free(weight)
        return out

    def replay_linear_backward(self, tape, m, column, i, o, kept):
        e = m.e
        weight = 0 if kept else tape.alloc(i * o * m.w)
        tape.alloc(m.tl * i * e)
        if m.trainable:
            full_grad = tape.alloc(i * o * m.w)
            shard = tape.alloc(i * o // m.P * m.w)  # the weight gradient's reduce-scattered shard
            tape.temp(full_grad if m.rs_copy else 0)
            tape.free(full_grad, shard)
        tape.free(weight)

    def kept_operand(self, m, column, i, o):
        return i * o * m.w

    def replay_last_recomputed(self, tape, m, i, o):
        tape.alloc(i * o * m.w)  # the gathered weight is kept, the product never made


class UlyssesCost(Zero3Cost):
    """DeepSpeed-Ulysses: u = P, c = 1; exact causal attention over whole sequences on H/P."""

    name = "ulysses"
    has_token_gather = True
    has_all_to_all = True

    def factorisation(self, P, inner=None):
        return P, 1


class RingCost(Zero3Cost):
    """Ring (context-parallel) attention, zigzag balanced: u = 1, c = P."""

    name = "ring"
    has_ring = True

    def factorisation(self, P, inner=None):
        return 1, P


class UspCost(Zero3Cost):
    """Ulysses inside x ring outside: `inner` fixes u; by default the largest divisor of P with
    2 <= u <= P/2."""

    name = "usp"
    has_token_gather = True
    has_all_to_all = True
    has_ring = True

    def factorisation(self, P, inner=None):
        options = [u for u in range(2, P // 2 + 1) if P % u == 0]
        u = inner if inner is not None else (max(options) if options else 0)
        if u < 2 or P % u or P // u < 2:
            raise ValueError(f"usp needs P = inner x outer with both at least 2, got P={P}")
        return u, P // u
