"""Analytic memory of one mixture-of-experts layer on one rank (DESIGN 6): the bytes its MLP half
saves for backward in closed form, and the peaks of a replay in which the attention half is the
dense layer's (`replay.Replay`) and the MLP half follows `parallel_lib.moe`: router, dispatch,
each expert's SwiGLU, combine, shared experts. Sizes per rank: N pairs of its tokens, M rows its
experts compute (`moe_costs.MoeLoads`). Pure Python."""

from __future__ import annotations

from collections.abc import Sequence

from .layer_dims import LayerDims, attention_saved
from .memory import LayerMemory
from .moe_costs import MoeLoads, check_moe, moe_dims, routing_loads
from .replay import Replay

__all__ = ["moe_mlp_saved", "moe_layer_memory", "MoeReplay"]

INDEX = 8
"""Bytes of an int64 index."""


class _Sizes:
    """The MoE tensors' bytes on one rank."""

    def __init__(self, m: LayerDims, moe, loads: MoeLoads, rank: int) -> None:
        e, H = m.e, m.H
        self.tp = m.cost.mlp_mode == "tensor_parallel"
        self.N, self.M = loads.sent(rank), sum(loads.expert_rows(rank))
        self.real = self.N / moe.top_k  # real local tokens (the router keeps top_k each)
        self.E, self.f, self.local = moe.experts, moe.expert_ffn_hidden, moe.experts // m.P
        self.probs = m.tl * moe.experts * 4  # a float32 (T/P, E) table
        self.aux, self.z = moe.aux_loss_coef > 0, moe.z_loss_coef > 0
        self.s = moe.shared_ffn_hidden // m.P if self.tp else moe.shared_ffn_hidden
        self.s_rows = m.T if self.tp else m.tl  # tokens the shared experts see
        self.shared = moe.shared_ffn_hidden > 0
        self.gathered = m.T * (H + 2 * moe.experts) * e  # tp_sp's fused gather
        self.rows, self.pairs = self.M * H * e, self.N * H * e
        self.expert_weights = self.local * 3 * self.f * H * e


def _small_saved(z: _Sizes, m: LayerDims) -> float:
    """The routing's per-token and per-pair tensors autograd keeps: top-k indices and weights,
    their renormalisation, the dispatch's orders and the combine's indices and weights."""
    saved = z.N * (INDEX + 4) + z.real * (INDEX + 4)
    if z.tp:  # index_put's token index; the gathered pairs' token, expert and weight
        return saved + z.N * INDEX + z.M * (2 * INDEX + m.e)
    saved += z.N * (2 * INDEX + m.e)  # order, token[order], the weights in the compute dtype
    return saved + (2 * z.M * INDEX if m.P > 1 else 0)  # regrouping by expert and back


def _context(z: _Sizes, m: LayerDims, recompute: str) -> int:
    """The routing context's per-token sequence index and real mask, kept by a checkpoint (its
    input) or by the balance loss (the index) and the z-loss (the mask)."""
    if recompute != "none":
        return m.tl * (INDEX + 1)
    return m.tl * ((INDEX if z.aux else 0) + (1 if z.aux or z.z else 0))


def _router_saved(z: _Sizes, m: LayerDims) -> float:
    """Probabilities, the balance term's per-token shares, the z-loss's float32 logits and
    logsumexp, the routing's small tensors."""
    saved = z.probs + (z.probs if z.aux else 0) + (z.probs + 4 * m.tl if z.z else 0)
    return saved + _small_saved(z, m)


def moe_mlp_saved(m: LayerDims, moe, loads: MoeLoads, rank: int) -> float:
    """Bytes the MoE MLP half saves for backward on `rank` without recomputation (the norm's
    and the routing context's included, as `layer_dims.mlp_saved` counts the dense one's)."""
    z = _Sizes(m, moe, loads, rank)
    kept = 4 if m.trainable else 3  # per expert row: gate/up output, silu(gate)[, product]
    saved = m.norm_saved + _router_saved(z, m) + _context(z, m, "none")
    saved += kept * z.M * z.f * m.e + (z.rows if m.trainable else 0)  # the experts' inputs
    # the combine keeps the expert outputs (its product's operand) and the weighted outputs
    # (index_add keeps its source): rows of this rank's experts (tp_sp) or of its pairs
    saved += 2 * (z.rows if z.tp else z.pairs)
    if z.shared:
        saved += kept * z.s_rows * z.s * m.e
        if z.tp and m.trainable:  # the shared gate/up keeps the gathered tokens
            saved += z.gathered
    return saved


class MoeReplay(Replay):
    """`Replay` with the MLP half of `parallel_lib.moe` (the sizes of rank `rank`)."""

    def __init__(self, m: LayerDims, moe, loads: MoeLoads, rank: int) -> None:
        super().__init__(m)
        self.z = _Sizes(m, moe, loads, rank)
        self.recompute = "none"

    def run(self, recompute: str) -> tuple[int, int]:
        self.recompute = recompute
        context = self.tape.alloc(_context(self.z, self.m, recompute))
        forward, backward = super().run(recompute)
        self.tape.free(context)
        return forward, backward

    # -------------------------------------------------------------- forward
    def _router(self) -> None:
        m, t, z = self.m, self.tape, self.z
        logits = t.alloc(m.tl * z.E * m.e)
        self.keep(_router_saved(z, m))
        t.temp(z.probs if z.aux else 0)  # the balance term's product
        t.free(logits)
        self.done()

    def _experts(self) -> float:
        """The local experts on their M rows (live; they die with the caller unless the gate/up
        matmuls keep them); returns the bytes of their concatenated (M, H) outputs, left live."""
        m, t, z = self.m, self.tape, self.z
        act = z.M * z.f * m.e
        self.keep(2 * act, act)  # gate/up output, silu(gate)
        product = (self.keep if m.trainable else t.alloc)(act)  # the down projection's input
        outputs = t.alloc(z.rows)
        t.free(0 if m.trainable else product)
        y = t.alloc(z.rows)  # concatenated
        t.free(outputs)
        self.done()
        return y

    def _shared(self, keep: bool, recomputing: bool) -> float:
        """The shared experts (the dense MLP of width F_s, its tp_sp form on the gathered
        tokens); returns their output's bytes, live (0 when a recomputation stops there)."""
        m, t, z = self.m, self.tape, self.z
        act = z.s_rows * z.s * m.e
        # tp_sp: plain matmuls of the gathered tokens with the stored shards
        y = t.alloc(2 * act) if z.tp else self.linear_forward("gate_up", m.H, 2 * z.s, keep)
        self.keep(act)  # silu(gate)
        product = t.alloc(act)
        self.done()
        out = 0
        if recomputing and not z.tp:  # the last op that saves a tensor
            m.cost.replay_last_recomputed(t, m, z.s, m.H)
        elif not recomputing and z.tp:
            out = t.alloc(z.s_rows * m.H * m.e)
        elif not recomputing:
            out = self.linear_forward("down", z.s, m.H, keep)
        if not (self.saving and m.trainable):  # the down projection's input
            t.free(product)
        if not self.saving:  # the gate/up output (silu(gate) went with the op)
            t.free(y)
        return out

    def _expert_parallel(self) -> float:
        """Dispatch, experts, return and combine; returns the (T/P, H) output's bytes."""
        m, t, z = self.m, self.tape, self.z
        rows = t.alloc(z.pairs)  # the pairs' rows
        if m.P > 1:  # received, then regrouped by expert
            t.alloc(z.rows)
            t.free(rows)
            rows = t.alloc(z.rows)
            t.free(z.rows)
        y = self._experts()
        if m.P > 1:  # back in source order, then to the tokens' ranks
            back = t.alloc(z.rows)
            t.alloc(z.pairs)
            t.free(back, y)
            y = z.pairs
        if not (self.saving and m.trainable):
            t.free(rows)
        zeros = t.alloc(self.unit)
        self.keep(z.pairs)  # the weighted outputs (index_add's source)
        self.pending += [] if self.saving else [y]  # the outputs (the weights' gradient)
        out = t.alloc(self.unit)
        t.free(zeros)
        self.done()
        return out

    def _tensor_parallel(self, keep: bool, recomputing: bool) -> tuple[float, float]:
        """Gather, experts, combine, shared experts; returns the partial sums' bytes (T, H) and
        the gathered tokens' (live while a local of the layer's MLP)."""
        m, t, z = self.m, self.tape, self.z
        inputs = t.alloc(m.tl * (m.H + 2 * z.E) * m.e + m.tl * z.E * (4 + m.e))
        gathered = t.alloc(z.gathered)
        t.free(inputs)
        rows = t.alloc(z.rows)
        y = self._experts()
        if not (self.saving and m.trainable):
            t.free(rows)
        zeros = t.alloc(m.T * m.H * m.e)
        self.keep(z.rows)  # the weighted outputs
        self.pending += [] if self.saving else [y]
        partial = t.alloc(m.T * m.H * m.e)
        t.free(zeros)
        self.done()
        if z.shared:
            shared = self._shared(keep, recomputing)
            if not recomputing:
                t.alloc(m.T * m.H * m.e)
                t.free(partial, shared)
        return partial, gathered

    def mlp_block(self, keep: bool, recomputing: bool = False) -> None:
        """h -> h + moe(norm(h)) (left live); a recomputation stops at the last saved tensor."""
        m, t, z = self.m, self.tape, self.z
        hn = self.norm_forward()
        self._router()
        if z.tp:
            partial, gathered = self._tensor_parallel(keep, recomputing)
            keeps_gathered = z.shared and m.trainable and self.saving
            if recomputing:
                t.free(partial, 0 if keeps_gathered else gathered)
                self.release(hn)
                return
            out = t.alloc(self.unit)  # reduce-scattered
            t.temp(partial if m.rs_copy else 0)
            t.free(partial, 0 if keeps_gathered else gathered)
        else:
            out = self._expert_parallel()
            shared = self._shared(keep, recomputing) if z.shared else 0
            if recomputing:
                t.free(out, shared)
                self.release(hn)
                return
            if z.shared:
                t.alloc(self.unit)
                t.free(out, shared)
                out = self.unit
        self.release(hn)
        t.alloc(self.unit)  # the residual sum
        t.free(out)

    # -------------------------------------------------------------- backward
    def _experts_backward(self, grad: float) -> float:
        """From the (M, H) outputs' gradient (`grad`, live) to the rows' (left live, returned),
        one expert after another (M/(E/P) rows each); frees what the experts saved."""
        m, t, z = self.m, self.tape, self.z
        act, rows, e = z.M * z.f * m.e / z.local, z.rows / z.local, m.e
        buffers = t.alloc(z.expert_weights if m.trainable else 0)  # the weights' gradients
        for _ in range(z.local):
            t.alloc(act)  # the product's gradient
            t.temp(z.local * z.f * m.H * e if m.trainable else 0)  # a slice's, whole
            t.free(act if m.trainable else 0)  # the saved product
            t.temp(2 * act)  # SwiGLU's backward products
            t.alloc(2 * act)  # the gate/up output's gradient
            t.free(act, act, 2 * act)  # the product's gradient, silu(gate), the gate/up output
            t.alloc(rows)  # the rows' gradient
            t.temp(z.local * 2 * z.f * m.H * e if m.trainable else 0)
            t.free(2 * act, rows if m.trainable else 0)  # the gate/up gradient, saved rows
        t.free(grad, buffers)
        t.alloc(z.rows)  # concatenated
        t.free(z.rows)
        return z.rows

    def _shared_backward(self, kept: dict[str, float]) -> float:
        """From the shared experts' output gradient (outside) to their input's (left live;
        tp_sp: the gathered tokens', (T, H)); returns its bytes."""
        m, t, z = self.m, self.tape, self.z
        act, e = z.s_rows * z.s * m.e, m.e
        if z.tp:
            t.alloc(act)
            t.temp(z.s * m.H * e if m.trainable else 0)
        else:
            self.linear_backward("down", z.s, m.H, kept.get("down", 0), free_grad=False)
        t.free(act if m.trainable else 0)
        t.temp(2 * act)
        t.alloc(2 * act)
        t.free(act, act, 2 * act)
        if not z.tp:
            self.linear_backward("gate_up", m.H, 2 * z.s, kept.get("gate_up", 0))
            return self.unit
        grad = t.alloc(z.s_rows * m.H * e)
        t.temp(2 * z.s * m.H * e if m.trainable else 0)
        t.free(2 * act, z.gathered if m.trainable else 0)
        return grad

    def _combine_backward(self, pairs: float) -> float:
        """From the combine's output gradient to the expert outputs' (left live, returned);
        frees the saved outputs and weighted outputs (`pairs` bytes each)."""
        t = self.tape
        at_pairs = t.alloc(pairs)  # index_add's backward
        t.free(pairs)  # its saved source
        grad = t.alloc(pairs)
        t.temp(pairs)  # the weights' gradient products
        t.free(at_pairs, pairs)  # and the saved outputs
        return grad

    def mlp_block_backward(self, kept: dict[str, int]) -> None:
        m, t, z = self.m, self.tape, self.z
        unit, H = self.unit, m.H
        shared_kept = {}
        if self.recompute != "none":
            shared_kept = {"gate_up": self.kept_operand("gate_up", H, 2 * z.s),
                           "down": self.kept_operand("down", z.s, H)}  # fmt: skip
        if z.tp:
            grad = t.alloc(m.T * H * m.e)  # the reduce-scatter's backward gathers it
            shared = self._shared_backward(shared_kept) if z.shared else 0
            rows = self._experts_backward(self._combine_backward(z.rows))
            t.free(grad)
            at_tokens = t.alloc(m.T * H * m.e)
            t.free(rows, shared)  # summed into one
            whole = t.alloc(m.T * (H + 2 * z.E) * m.e)  # the gathered tensor's gradient
            t.free(at_tokens)
            local = t.alloc(m.tl * (H + 2 * z.E) * m.e)  # reduce-scattered
            t.temp(whole if m.rs_copy else 0)
            t.free(whole)
            t.alloc(unit)
            t.free(local)
        else:
            shared = self._shared_backward(shared_kept) if z.shared else 0
            grad = self._combine_backward(z.pairs)
            if m.P > 1:  # back to the experts' ranks, regrouped by expert
                t.alloc(z.rows)
                t.free(grad)
                grad = t.alloc(z.rows)
                t.free(z.rows)
            rows = self._experts_backward(grad)
            if m.P > 1:  # to source order, then back to the tokens' ranks
                t.alloc(z.rows)
                t.free(rows)
                rows = t.alloc(z.pairs)
                t.free(z.rows)
            t.alloc(unit)  # scattered onto the tokens
            t.free(rows, shared)
        # the router: the probabilities' and logits' gradients, the input's, the weight's
        t.temp(2 * z.probs)
        logits = t.alloc(m.tl * z.E * m.e)
        t.temp(z.E * H * m.e if m.trainable else 0)
        t.alloc(unit)
        t.free(logits, _router_saved(z, m), unit)  # summed into the input's gradient
        self.norm_backward()
        t.alloc(unit)  # gradient of h: dy + the MLP branch's
        t.free(unit, unit)


def moe_layer_memory(
    shape, moe, strategy: str, seq_lens: Sequence[int], P: int, *, dtype="float32",
    recompute: str = "none", inner: int | None = None, reduce_scatter_copy: bool = False,
    trainable: bool = True, loads: MoeLoads | None = None, rank: int | None = None,
) -> LayerMemory:  # fmt: skip
    """Saved, forward-peak and backward-peak bytes of one MoE layer on one rank (as
    `memory.layer_memory`); `loads` None: the planning expectation; `rank` None: the rank
    computing the most expert rows."""
    check_moe(shape, moe, strategy, P, recompute, inner)
    loads = routing_loads(loads, seq_lens, P, moe)
    rank = loads.busiest_rank() if rank is None else rank
    m = moe_dims(shape, strategy, seq_lens, P, dtype, inner, trainable, reduce_scatter_copy)
    replayed = m
    if P == 1:
        replayed = moe_dims(shape, "local", seq_lens, 1, dtype, None, trainable)
    forward_peak, backward_peak = MoeReplay(replayed, moe, loads, rank).run(recompute)
    x = m.tl * m.H * m.e
    if recompute == "full":
        saved = x
    elif recompute == "selective":
        saved = attention_saved(m) + x
    else:
        saved = attention_saved(m) + moe_mlp_saved(m, moe, loads, rank)
    if recompute != "none":  # the checkpoint keeps the routing context
        saved += _context(_Sizes(m, moe, loads, rank), m, recompute)
    return LayerMemory(saved=int(saved), forward_peak=int(forward_peak),
                       backward_peak=int(backward_peak), input_bytes=x)  # fmt: skip
