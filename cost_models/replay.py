"""A replay of the tensors one layer allocates and frees on one rank, forward then backward (with
any recomputation), following `parallel_lib.layer_step` and each strategy's implementation: its
peaks are the layer's peak memory. Everything that scales with tokens or weights is replayed;
temporaries of a few token-wide vectors are ignored. Pure Python."""

from __future__ import annotations

from .counts import COLUMN_SHARDED
from .layer_dims import LayerDims
from .replay_streamed import streamed_peaks

__all__ = ["Replay", "Tape"]


class Tape:
    """Live bytes over a replay of allocations and frees, with the peak."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def alloc(self, *sizes: float) -> float:
        self.live += sum(sizes)
        self.peak = max(self.peak, self.live)
        return sum(sizes)

    def free(self, *sizes: float) -> None:
        self.live -= sum(sizes)

    def temp(self, *sizes: float) -> None:
        self.alloc(*sizes)
        self.free(*sizes)


class Replay:
    """One layer's forward and backward on a tape, following the strategy's implementation.

    `saving` False replays a forward inside an activation checkpoint: tensors autograd would
    save die as soon as the forward is done with them."""

    def __init__(self, m: LayerDims) -> None:
        self.m, self.tape = m, Tape()
        self.saving, self.pending = True, []
        self.unit = m.tl * m.H * m.e  # one (T/P, H) activation

    def keep(self, *sizes: float) -> float:
        """Allocate tensors only autograd keeps (dropped at the end of the op when not saving)."""
        size = self.tape.alloc(*sizes)
        if not self.saving:
            self.pending.append(size)
        return size

    def done(self, consumed: float = 0) -> None:
        """End of an op: without saving, drop what only autograd kept and the consumed input."""
        if not self.saving:
            self.tape.free(sum(self.pending), consumed)
            self.pending.clear()

    # -------------------------------------------------------------- linears
    def linear_forward(self, op: str, i: int, o: int, keep: bool) -> float:
        """Allocates the output; temporaries come and go; returns the output's bytes.
        op: qkv, out, gate_up, down; i, o: whole-weight in/out features. Its input is a local
        of the function that calls it (see `release`)."""
        m = self.m
        out = m.cost.replay_linear_forward(self.tape, m, op in COLUMN_SHARDED, i, o, keep)
        self.done()
        return out

    def release(self, *inputs: float, shared: float = 0) -> None:
        """When the function holding them returns: the linears' inputs die where nothing keeps
        them for the backward, inside a checkpoint or in a frozen layer (only the weight
        gradient reads them). `shared` is kept by another op too (the attention output)."""
        if not self.saving:
            self.tape.free(*inputs, shared)
        elif not self.m.trainable:
            self.tape.free(*inputs)

    def kept_operand(self, op: str, i: int, o: int) -> int:
        """Bytes a recomputed linear keeps gathered for its backward beyond its saved input."""
        return self.m.cost.kept_operand(self.m, op in COLUMN_SHARDED, i, o)

    def linear_backward(self, op: str, i: int, o: int, kept: int, free_grad: bool = True) -> None:
        """The output gradient is live; allocates the input gradient (left live), frees the saved
        input, what a recomputation kept (`kept`) and the output gradient (if free_grad)."""
        m, column = self.m, op in COLUMN_SHARDED
        grad_out = m.cost.linear_output(m, column, o)
        m.cost.replay_linear_backward(self.tape, m, column, i, o, kept)
        self.tape.free(grad_out if free_grad else 0, kept)

    # -------------------------------------------------------------- norm
    def norm_forward(self) -> float:
        """x_hat and 1/rms are kept (float32 also keeps the input); the output flows on (the
        next linear keeps it). Frozen: x_hat comes and goes, the output is not counted here."""
        m = self.m
        if not m.trainable:
            self.tape.temp(m.tl * m.H * 4)  # x_hat, float32
        self.keep(self._norm_kept())
        out = self.tape.alloc(self.unit)
        self.done()
        return out

    def norm_backward(self) -> None:
        m, t = self.m, self.tape
        t.temp(3 * m.tl * m.H * 4)  # float32 products of the gradient formula
        t.alloc(self.unit)  # the input gradient
        t.free(self._norm_kept())  # x_hat, 1/rms
        t.free(self.unit if m.trainable else 0, self.unit)  # the output, and its gradient

    def _norm_kept(self) -> int:
        """What the norm itself keeps beyond its input and its output (x_hat, 1/rms)."""
        output = self.unit if self.m.trainable else 0  # frozen: not in norm_saved
        return self.m.norm_saved - self._norm_input() - output

    def _norm_input(self) -> int:
        """Bytes of the saved float32 input that are the layer's own tensor (float32 only)."""
        return self.m.tl * self.m.H * 4 if self.m.e == 4 else 0

    # -------------------------------------------------------------- attention core
    def attention_forward(self, y: float) -> float:
        """From the projection output y (live) to the out projection's input (live, returned).
        Sets self.attn_kept: what the backward frees beyond that input and y."""
        m, t, e = self.m, self.tape, self.m.e
        N = m.tokens_attended
        q, kv = N * m.q_width * e, N * m.kv_width * e
        lse = N * m.q_width // m.d * m.a
        if m.all_to_all:  # all-to-all: stacked send, receive, concatenate
            t.temp(2 * y)
            t.alloc(y)
            t.free(y)
        reordered = m.reordered  # (RoPE's tables are the micro-batch's: `attention_saved`)
        rotated = t.alloc(q + kv)
        t.temp(q)  # RoPE's products
        # the projection output y is a local of the strategy's attention: it lives until the out
        # projection has run (`attention_block` frees it) unless autograd keeps it (V a view)
        if reordered:
            self.keep(q + 2 * kv)
            t.free(rotated)
            kept = q + 2 * kv
        elif m.qkv_copied:  # V copied out of the projection output
            self.keep(kv)
            if not self.saving:
                self.pending.append(rotated)
            kept = rotated + kv
        else:
            if not self.saving:
                self.pending.append(rotated + y)
            kept = rotated + y
        if m.ring:  # ring: sums, K/V stack and receive buffer
            groups = m.head_groups
            acc = q * m.a // e // groups
            t.temp(acc, 2 * 2 * kv // groups, 3 * acc)
        else:
            t.temp(q * m.longest // max(N, 1))  # one sequence's output before concatenation
        self.keep(lse)
        if reordered:
            self.keep(q)  # the attention output
            out = t.alloc(q)  # reordered (or the head groups concatenated)
            if m.all_to_all:  # all-to-all back
                t.temp(2 * q)
                t.free(q)
                out = t.alloc(m.tl * m.Q * e)
        else:
            out = t.alloc(q)
        self.attn_local = y if reordered or m.qkv_copied else 0
        self.attn_kept = kept + lse + (q if reordered else 0)
        self.output_shared = not reordered  # the out projection saved the attention output
        self.done()
        return out

    def attention_backward(self) -> None:
        """From the out projection's input gradient (live) to the gradient of the projection
        output y (live); frees what the forward kept."""
        m, t, e = self.m, self.tape, self.m.e
        N = m.tokens_attended
        q, kv = N * m.q_width * e, N * m.kv_width * e
        grad = m.tl * m.Q * e
        if m.all_to_all:
            t.temp(2 * grad)
            t.alloc(q)
            t.free(grad)
            grad = q
        if m.sorted:
            t.alloc(q)
            t.free(grad)
            grad = q
        if m.ring:
            dqkv = self.ring_backward(q, kv)
        else:
            dqkv = t.alloc(q + 2 * kv)
            t.temp(m.flash_workspace(m.longest, m.longest))
        t.free(grad)
        if m.sorted:  # back to natural order
            t.alloc(q + 2 * kv)
            t.free(dqkv)
            dqkv = q + 2 * kv
        t.temp(2 * q)  # RoPE's backward products
        y = m.tl * (m.Q + 2 * m.K) * e
        t.alloc(y)  # gradient of the fused projection output
        t.free(dqkv, self.attn_kept)
        if m.all_to_all:
            t.temp(2 * y)

    def ring_backward(self, q: int, kv: int) -> int:
        """Ring attention's backward (once per head group for metp); returns the bytes of
        dQ, dK, dV left live. Per group: a float32 dQ sum, the K/V stack and its receive buffer,
        dK/dV sums in flight both ways, and one ring step's row copies and block gradients
        (worst case: half the queries against all keys)."""
        groups = self.m.head_groups
        left = sum(self.ring_group_backward(q // groups, kv // groups) for _ in range(groups))
        if groups > 1:  # each group's gradients widened to all heads and summed
            self.tape.temp(q + 2 * kv)
        return int(left)

    def ring_group_backward(self, qg: int, kvg: int) -> float:
        """One head group's ring backward (Q of qg bytes, K and V of kvg each); returns the bytes
        of its dQ, dK, dV, left live."""
        m, t = self.m, self.tape
        groups, acc = m.head_groups, m.a / m.e
        chunk = m.longest // m.c  # the longest sequence's rows on this rank
        dq = t.alloc(qg * acc)
        buffers = t.alloc(2 * kvg, 2 * kvg)
        step = 3 * qg // 2 + qg // 2 + 2 * kvg  # dout, q, out halves; block gradients
        t.temp(2 * 2 * kvg * acc, step, m.flash_workspace(chunk // 2, chunk, groups))
        t.free(buffers)
        dkv = t.alloc(2 * kvg * acc)
        if acc == 1:
            return dq + dkv
        t.alloc(qg + 2 * kvg)  # cast back to the compute dtype
        t.free(dq, dkv)
        return qg + 2 * kvg

    # -------------------------------------------------------------- the layer
    def attention_block(self, keep: bool) -> None:
        """x -> h = x + attention(norm(x)); h stays live."""
        m, t = self.m, self.tape
        xn = self.norm_forward()
        y = self.linear_forward("qkv", m.H, m.Q + 2 * m.K, keep)
        o = self.attention_forward(y)
        out = self.linear_forward("out", m.Q, m.H, keep)
        t.free(self.attn_local)  # the projection output, a local of the attention
        if self.output_shared:  # the attention's locals
            self.release(xn, shared=o)
        else:
            self.release(xn, o)
        t.alloc(self.unit)  # h
        t.free(out)

    def mlp_block(self, keep: bool, recomputing: bool = False) -> None:
        """h -> output = h + mlp(norm(h)) (left live). A recomputation stops once the down
        projection has saved its operands: its output is dropped, nothing after it runs."""
        m, t = self.m, self.tape
        hn = self.norm_forward()
        y = self.linear_forward("gate_up", m.H, 2 * m.F, keep)
        self.keep(m.tl * m.F * m.e)  # silu(gate)
        prod = t.alloc(m.tl * m.F * m.e)  # silu(gate) * up
        self.done()  # the gate/up output lives on (a local variable) until the MLP returns
        if recomputing:
            m.cost.replay_last_recomputed(t, m, m.F, m.H)
            self.release(hn, prod)
            return
        out = self.linear_forward("down", m.F, m.H, keep)
        self.release(hn, prod)  # the MLP's locals
        self.done(consumed=y)
        t.alloc(self.unit)
        t.free(out)

    def mlp_block_backward(self, kept: dict[str, int]) -> None:
        """From the output's gradient dy (outside) to the gradient of h (left live); frees what
        the MLP half saved. kept: bytes each recomputed linear kept gathered."""
        m, t = self.m, self.tape
        H, F, e, unit = m.H, m.F, m.e, self.unit
        self.linear_backward("down", F, H, kept["down"], free_grad=False)  # dy is outside
        t.free(m.tl * F * e if m.trainable else 0)  # the down projection's saved input
        t.temp(2 * m.tl * F * e)  # SwiGLU backward products
        t.alloc(m.tl * 2 * F * e)  # gradient of the gate/up output
        t.free(2 * m.tl * F * e + m.tl * 2 * F * e)  # input gradient, silu, gate/up output
        self.linear_backward("gate_up", H, 2 * F, kept["gate_up"])
        self.norm_backward()
        t.alloc(unit)  # gradient of h: dy + the MLP branch's
        t.free(unit, unit)  # the MLP branch's gradient, h

    def attention_block_backward(self, kept: dict[str, int]) -> None:
        """From the gradient of h (live) to dx (left live); frees what the attention half saved."""
        m, t = self.m, self.tape
        self.linear_backward("out", m.Q, m.H, kept["out"], free_grad=False)
        out_input = m.tl * m.Q * m.e  # the out projection's saved input
        t.free(0 if self.output_shared or not m.trainable else out_input)
        self.attention_backward()
        t.free(out_input if self.output_shared else 0)  # also saved by the attention
        self.linear_backward("qkv", m.H, m.Q + 2 * m.K, kept["qkv"])
        self.norm_backward()
        t.alloc(self.unit)  # dx = gradient of h + the attention branch's

    def run(self, recompute: str) -> tuple[int, int]:
        """(forward peak, backward peak)."""
        if recompute == "projections":
            return streamed_peaks(self)
        m, t = self.m, self.tape
        H, F, unit = m.H, m.F, self.unit
        self.saving = recompute != "full"
        self.attention_block(keep=False)
        self.saving = recompute == "none"
        self.mlp_block(keep=False)
        forward_peak = t.peak
        if recompute == "full":  # only the output stays (x is outside)
            t.free(t.live - unit)
        self.saving, t.peak = True, t.live
        early = m.cost.output_grad_before_recompute(m, H) if recompute != "none" else 0
        t.alloc(early)  # live while the forward is recomputed
        if recompute == "full":
            self.attention_block(keep=True)
        if recompute != "none":
            self.mlp_block(keep=True, recomputing=True)
        kept = {
            op: self.kept_operand(op, i, o) if recompute != "none" else 0
            for op, i, o in (
                ("qkv", H, m.Q + 2 * m.K), ("out", m.Q, H), ("gate_up", H, 2 * F), ("down", F, H)
            )
        }  # fmt: skip
        t.free(early)  # the down projection's backward allocates it (again)
        self.mlp_block_backward(kept)
        self.attention_block_backward(kept)
        return forward_peak, t.peak
