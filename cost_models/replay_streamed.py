"""The memory replay of METP's own backward (recompute mode `projections`), as the ParaDySe
paper's code runs it: the forward keeps each block's norm, the attention output and its softmax
normalisers (LSE), nothing else; the backward recomputes the QKV projection one head group at a
time and the gate/up projection one block of F/P columns at a time, as the weight shards stream
round again. Our layer (RMSNorm, RoPE, SwiGLU) in that loop structure. Pure Python."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .replay import Replay

__all__ = ["streamed_peaks"]


def streamed_peaks(r: Replay) -> tuple[int, int]:
    """(forward peak, backward peak) of a metp layer in recompute mode `projections`, with the
    conventions of `Replay.run`: the layer input and the output's gradient outside, the output
    inside."""
    m, t, e, unit = r.m, r.tape, r.m.e, r.unit
    if not m.trainable:  # a frozen layer would have to keep the norms' outputs too
        raise ValueError("recompute 'projections' is priced for trainable layers only")
    groups = m.head_groups
    q, lse = m.tl * m.Q * e, m.tl * (m.Q // m.d) * m.a  # the attention output and its LSE
    qg, kvg = q // groups, m.tl * m.K * e // groups  # one head group's Q, and K (or V)
    acc = m.tl * m.H * m.a  # a float32 sum of the blocks' (T/P, H) products
    f = m.tl * (m.F // m.P) * e  # one block of the SwiGLU's F/P columns
    h_kept = unit if e == 4 else 0  # float32: the MLP norm's input copy is h itself

    def cast(summed: int) -> None:
        if m.a != e:  # the float32 sum cast to the compute dtype
            t.alloc(unit)
            t.free(summed)

    # forward, attention half: the norm's kept tensors (its output is the projections' input)
    t.alloc(m.norm_saved - r._norm_input())
    shards = t.alloc(2 * m.attention_shard * m.w)  # the shard held and the one arriving
    summed = t.alloc(acc)  # the out projection's sum over the head groups
    block = t.alloc(qg + 2 * kvg)  # one head group's Q/K/V (every group peaks alike)
    rotated = t.alloc(qg + kvg)
    t.temp(qg)  # RoPE's products
    t.temp(qg * m.a // e, 2 * 2 * kvg, 3 * qg * m.a // e)  # ring: sums, K/V stack and receive
    t.alloc(q + lse)  # every group's output and LSE, kept
    t.temp(unit)  # the group's out-projection product, added to the sum
    t.free(block, rotated, shards)
    cast(summed)
    t.alloc(unit)  # h = x + attention
    t.free(unit)
    # forward, MLP half
    t.alloc(m.norm_saved - r._norm_input())
    shards = t.alloc(2 * m.mlp_shard * m.w)
    summed = t.alloc(acc)
    t.temp(2 * f, f, f, unit)  # one block: gate/up, silu(gate), the product, its down product
    t.free(shards)
    cast(summed)
    t.alloc(unit)  # the output = h + MLP
    t.free(unit, unit - h_kept)  # the MLP's output, h (float32: kept as the norm's input)
    forward_peak = t.peak

    # backward, MLP half: one block at a time, its forward recomputed
    t.peak = t.live
    streaming = 5 if m.trainable else 2  # + the gradient block and the travelling sum, both ways
    shards = t.alloc(streaming * m.mlp_shard * m.w)
    summed = t.alloc(acc)  # the input gradient's sum over the blocks
    t.temp(2 * f, f, f, f, 2 * f)  # gate/up, silu, product recomputed; their gradients
    t.free(shards)
    cast(summed)
    r.norm_backward()
    t.alloc(unit)  # the gradient of h: dy + the MLP branch's
    t.free(unit + h_kept)  # the branch's, and h
    # backward, attention half: one head group at a time, its Q/K/V recomputed
    shards = t.alloc(streaming * m.attention_shard * m.w)
    summed = t.alloc(acc)
    block = t.alloc(qg + 2 * kvg, qg)  # the group's rotated Q/K/V, its output's gradient
    left = r.ring_group_backward(qg, kvg)
    t.temp(2 * qg)  # RoPE's backward products
    t.free(left, block, shards, q + lse)
    cast(summed)
    r.norm_backward()
    t.alloc(unit)  # dx = the gradient of h + the attention branch's
    return int(forward_peak), int(t.peak)
