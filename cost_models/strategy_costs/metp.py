"""`metp`: memory-efficient tensor parallelism: no rank holds a whole weight or sequence."""

from __future__ import annotations

from .base import StrategyCost


class MetpCost(StrategyCost):
    """Weight shards stream round the ring (`parallel_lib.streamed_linear`): P blocks of each
    projection on the local T/P tokens; attention is ring attention once per head group of
    heads/P heads (u = 1, c = P, P head groups).

    Its communication (all point-to-point) is the formula of
    `parallel_lib.strategies.metp.MemoryEfficientTP`'s docstring, computed here. Calls: P-1 per
    streamed linear (P more with its travelling weight-gradient sum), P-1 per head group's K/V
    ring (P more with its K/V-gradient sums).
    """

    name = "metp"
    mlp_mode = "streamed"
    has_ring = True

    def factorisation(self, P, inner=None):
        return 1, P

    def matmul(self, m, i, o, column):
        tl = m.T // m.P  # P streamed blocks of the local tokens
        return ((tl, i, o // m.P) if column else (tl, i // m.P, o)), m.P

    def attention_layout(self, m):
        return m.Q // m.d // m.P, m.P, m.P

    # ------------------------------------------------------------------ collectives
    @staticmethod
    def _forward(m) -> tuple[int, int]:
        """(bytes, calls) of the forward: 4 streamed linears, a K/V ring per head group."""
        P = m.P
        nbytes = (P - 1) * (m.attention_shard + m.mlp_shard) * m.e + (P - 1) * 2 * m.tl * m.K * m.e
        return nbytes, 4 * (P - 1) + P * (P - 1)

    def forward_traffic(self, t, m):
        t.add("p2p", *self._forward(m))

    def backward_traffic(self, t, m):
        P, (nbytes, _) = m.P, self._forward(m)
        t.add("p2p", nbytes + P * 2 * m.tl * m.K * m.a, 4 * (P - 1) + P * (2 * P - 1))
        if m.trainable:
            self.weight_grad_traffic(t, m)

    def weight_grad_traffic(self, t, m):
        t.add("p2p", m.P * (m.attention_shard + m.mlp_shard) * m.e, 4 * m.P)

    def recompute_traffic(self, t, m, recompute):
        if recompute == "selective":  # the MLP's shards stream again
            t.add("p2p", (m.P - 1) * m.mlp_shard * m.e, 2 * (m.P - 1))
        elif recompute == "full":
            t.add("p2p", *self._forward(m))

    # ------------------------------------------------------------------ pricing
    def group_sizes(self, P, inner):
        return {"p2p": P}

    def p2p_hidden_under(self, matmul, attention):
        return matmul + attention  # shards and K/V travel while the blocks compute

    # ------------------------------------------------------------------ replay
    def tokens_attended(self, m):
        return m.tl

    def reorders_output(self, m):
        return True  # the head groups' outputs are concatenated

    def qkv_copied(self, m):
        return True  # sliced per head group into contiguous copies

    def shard_blocks(self, m):
        return m.P

    def head_groups(self, m):
        return m.P

    def replay_linear_forward(self, tape, m, column, i, o, keep):
        # two shard buffers in flight and one block's product; a row-sharded output sums the
        # blocks in float32 and is cast back
        e = m.e
        acc = 0 if column or m.a == e else m.tl * o * m.a
        tape.alloc(acc)
        tape.temp(2 * i * o // m.P * m.w, m.tl * (o // m.P if column else o) * e)
        out = tape.alloc(m.tl * o * e)
        tape.free(acc)
        return out

    def replay_linear_backward(self, tape, m, column, i, o, kept):
        # the input gradient; in flight: the weight shard held and the one being received, and
        # when the weight trains, this step's gradient block and the travelling sum sent and
        # received (summed in float32, then cast back)
        e = m.e
        acc = m.tl * i * m.a
        tape.alloc(acc)
        shards = 5 if m.trainable else 2
        tape.temp(shards * i * o // m.P * m.w, m.tl * (i if column else i // m.P) * e)
        if m.a != e:
            tape.alloc(m.tl * i * e)
            tape.free(acc)
