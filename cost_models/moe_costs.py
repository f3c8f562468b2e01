"""Analytic counts of a mixture-of-experts layer on one rank (DESIGN 6): FLOPs, kernel calls and
the bytes of every collective, as `parallel_lib.moe.MixtureOfExperts` runs its MLP half.

The attention half is the dense layer's. The MLP half: a router (E, H) on the local tokens, the
routed experts (SwiGLU of width F_e) on the (token, expert) pairs of the rank's E/P experts, and
the shared experts (a dense SwiGLU of width F_s). By the strategy's `mlp_mode`:
- `local`, `zero3`, `streamed` (expert parallelism): each pair's row goes to the rank holding its
  expert and back (uneven all-to-all, after an all-to-all of the counts); the shared experts run
  as the dense MLP of that mode with F = F_s.
- `tensor_parallel` (tp_sp): one all-gather of (T/P, H + 2E) [tokens, combine weights, kept
  mask], the local experts on every token routed to them, one reduce-scatter of (T, H) partial
  sums (the shared experts ride in them).
With `aux_loss_coef > 0` each forward all-reduces a float32 (sequences, E) count matrix. A
recomputation reruns the MLP half's forward collectives up to its last saved tensor: all but
tp_sp's reduce-scatter.

Routing is a `MoeLoads`: measured (exact bytes, uneven loads) or the planning expectation (every
real token keeps top_k experts, spread uniformly over experts and so over ranks). `moe` is any
object with experts, top_k, expert_ffn_hidden, shared_ffn_hidden and aux_loss_coef (a
`parallel_lib.moe.MoeShape`, a `paradyse.moe.MoeConfig`; the memory model also reads
z_loss_coef). Pure Python.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .counts import (
    MLP_PROJECTIONS,
    RECOMPUTE_MODES,
    RECOMPUTED_ELEMENTWISE,
    Kernel,
    LayerCounts,
    add_kernels,
    check_config,
    elementwise_bytes,
    layer_traffic,
    op_kernels,
)
from .layer_dims import LayerDims, dims_for_tokens
from .strategy_costs import Traffic, strategy_cost
from .units import pad_length

__all__ = [
    "MOE_OPS", "MoeLoads", "check_moe", "moe_comm_bytes", "moe_dims", "moe_kernels",
    "moe_layer_counts", "routing_loads",
]  # fmt: skip

MOE_OPS = ("router", "experts_gate_up", "experts_down", "shared_gate_up", "shared_down")
"""The MLP half's matmul ops: what selective recompute runs again."""
COUNT_BYTES = 8
"""The dispatch's counts are int64."""


def _whole(x: float) -> float | int:
    """An integral count as an int (measured loads give exact integer bytes)."""
    return int(x) if float(x).is_integer() else x


@dataclass(frozen=True)
class MoeLoads:
    """A micro-batch's routing of one MoE layer: `pairs[i][e]` (token, expert) pairs of rank i's
    local tokens on expert e, a P x E matrix (floats for an expectation). Rank r holds experts
    [r E/P, (r+1) E/P)."""

    pairs: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        rows = tuple(tuple(row) for row in self.pairs)
        object.__setattr__(self, "pairs", rows)
        if not rows or not rows[0] or any(len(r) != len(rows[0]) for r in rows):
            raise ValueError("MoeLoads needs a non-empty P x E matrix of pairs")
        if len(rows[0]) % len(rows):
            raise ValueError(f"{len(rows[0])} experts do not split over {len(rows)} ranks")
        if any(v < 0 for r in rows for v in r):
            raise ValueError("MoeLoads: pair counts must be >= 0")

    @classmethod
    def expected(cls, seq_lens: Sequence[int], P: int, moe) -> MoeLoads:
        """The planning assumption: the N real tokens keep top_k experts each, spread uniformly
        over the E experts and the P ranks: N k / (P E) pairs per entry."""
        n = _whole(sum(seq_lens) * moe.top_k / (P * moe.experts))
        return cls(tuple((n,) * moe.experts for _ in range(P)))

    @classmethod
    def from_rank_pairs(cls, sent: Sequence[Sequence[float]], experts: int) -> MoeLoads:
        """From a P x P matrix, `sent[i][j]` pairs of rank i's tokens on rank j's experts, split
        evenly over rank j's E/P experts (exact for bytes; for kernels, an even split)."""
        P = len(sent)
        if experts % P:
            raise ValueError(f"{experts} experts do not split over {P} ranks")
        local = experts // P
        return cls(
            tuple(tuple(_whole(row[e // local] / local) for e in range(experts)) for row in sent)
        )

    @property
    def P(self) -> int:
        return len(self.pairs)

    @property
    def experts(self) -> int:
        return len(self.pairs[0])

    def _local(self, rank: int) -> range:
        e = self.experts // self.P
        return range(rank * e, (rank + 1) * e)

    def sent(self, rank: int) -> float:
        """Pairs of rank's tokens (rows it dispatches, its own experts' included)."""
        return _whole(sum(self.pairs[rank]))

    def sent_remote(self, rank: int) -> float:
        """Pairs of rank's tokens on other ranks' experts: rows it sends."""
        mine = self._local(rank)
        return _whole(sum(v for e, v in enumerate(self.pairs[rank]) if e not in mine))

    def received_remote(self, rank: int) -> float:
        """Pairs of other ranks' tokens on rank's experts: rows it receives."""
        mine = self._local(rank)
        return _whole(sum(self.pairs[i][e] for i in range(self.P) if i != rank for e in mine))

    def expert_rows(self, rank: int) -> list[float]:
        """Per expert of `rank`, the pairs of every rank's tokens it computes."""
        return [_whole(sum(row[e] for row in self.pairs)) for e in self._local(rank)]

    def busiest_rank(self) -> int:
        """The rank computing the most expert rows (the first among equals)."""
        rows = [sum(self.expert_rows(r)) for r in range(self.P)]
        return rows.index(max(rows))


def check_moe(shape, moe, strategy: str, P: int, recompute: str = "none", inner=None) -> None:
    """ValueError, one line, for a MoE layer the strategy library cannot run on P ranks."""
    check_config(shape, strategy, P, recompute, inner)
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute {recompute!r}: a MoE layer has {RECOMPUTE_MODES} only")
    if moe.experts % P:
        raise ValueError(f"{strategy}: experts ({moe.experts}) is not divisible by P={P}")
    if moe.shared_ffn_hidden % P:
        raise ValueError(
            f"{strategy}: shared_ffn_hidden ({moe.shared_ffn_hidden}) is not divisible by P={P}"
        )


def moe_dims(shape, strategy: str, seq_lens: Sequence[int], P: int, dtype="float32",
             inner=None, trainable: bool = True, rs_copy: bool = False) -> LayerDims:  # fmt: skip
    """The dense layer's dims for the micro-batch (its attention half is the MoE layer's)."""
    padded = [pad_length(n, P) for n in seq_lens]
    return dims_for_tokens(shape, strategy_cost(strategy), sum(padded), P, dtype, inner,
                           max(padded), rs_copy, trainable)  # fmt: skip


# ---------------------------------------------------------------- collectives
def _swiglu_traffic(mode: str, m: LayerDims, F: int, recompute: str) -> tuple[Traffic, Traffic]:
    """(forward, backward) collectives of a dense SwiGLU of width F in `mode` on P > 1 ranks,
    as `parallel_lib.mlp.SwiGLU` runs it; the backward includes the recomputation's."""
    fwd, bwd, P, e = Traffic(), Traffic(), m.P, m.e
    if mode == "tensor_parallel":
        v = (P - 1) * m.tl * m.H * e
        fwd.add("all_gather", v, 1)
        fwd.add("reduce_scatter", v, 1)
        bwd.add("all_gather", v, 1)  # the reduce-scatter's backward
        if m.trainable:  # the weight gradient gathers the input again (a recomputation keeps it)
            bwd.add("all_gather", v, 1)
        bwd.add("reduce_scatter", v, 1)  # the input gradient
        if recompute != "none" and not m.trainable:
            bwd.add("all_gather", v, 1)
    elif mode in ("zero3", "streamed"):
        shard = 3 * (F // P) * m.H * e
        kind, calls = ("all_gather", 2) if mode == "zero3" else ("p2p", 2 * (P - 1))
        fwd.add(kind, (P - 1) * shard, calls)
        bwd.add(kind, (P - 1) * shard, calls)  # whole weights again for the input gradient
        if m.trainable and mode == "zero3":
            bwd.add("reduce_scatter", (P - 1) * shard, 2)
        elif m.trainable:  # the gradient sums travel a whole round
            bwd.add("p2p", P * shard, 2 * P)
        if recompute != "none" and mode == "streamed":  # zero3's recomputation keeps its gathers
            bwd.add("p2p", (P - 1) * shard, calls)
    return fwd, bwd


def _dispatch(moe, m: LayerDims, n_seq: int, loads: MoeLoads, rank: int) -> tuple[Traffic, ...]:
    """(forward, backward, recomputed) collectives of the router, dispatch and combine over the
    whole group (P > 1)."""
    P, e = m.P, m.e
    fwd, bwd, again = Traffic(), Traffic(), Traffic()
    if moe.aux_loss_coef > 0:  # the balance loss's float32 (sequences, E) counts
        for t in (fwd, again):
            t.add("all_reduce", 2 * (P - 1) * n_seq * moe.experts * 4 // P, 1)
    if m.cost.mlp_mode == "tensor_parallel":
        gathered = (P - 1) * m.tl * (m.H + 2 * moe.experts) * e  # tokens, weights, kept mask
        partial = (P - 1) * m.tl * m.H * e
        for t in (fwd, again):  # a recomputation stops before the reduce-scatter
            t.add("all_gather", gathered, 1)
        fwd.add("reduce_scatter", partial, 1)
        bwd.add("all_gather", partial, 1)
        bwd.add("reduce_scatter", gathered, 1)
    else:  # the counts, then each remote pair's row there and its output back
        rows = _whole((loads.sent_remote(rank) + loads.received_remote(rank)) * m.H * e)
        for t in (fwd, again):
            t.add("all_to_all", (P - 1) * (moe.experts // P) * COUNT_BYTES, 1)
            t.add("all_to_all", rows, 2)
        bwd.add("all_to_all", rows, 2)
    return fwd, bwd, again


def _sum(*tables: dict) -> dict:
    out: dict = {}
    for table in tables:
        for kind, value in table.items():
            out[kind] = out.get(kind, 0) + value
    return {k: _whole(v) for k, v in out.items() if v}


def _less(table: dict, part: dict) -> dict:
    """table - part by kind (part must be contained in table)."""
    out = {k: v - part.get(k, 0) for k, v in table.items()}
    if any(v < 0 for v in out.values()) or set(part) - set(table):
        raise AssertionError(f"{part} is not part of {table}")
    return {k: v for k, v in out.items() if v}


def _traffic(moe, m: LayerDims, n_seq: int, loads: MoeLoads, rank: int, recompute: str):
    """((bytes fwd, bytes bwd, messages fwd, messages bwd) of the whole layer, the same four of
    the collectives over the whole group: the dispatch's and the balance loss's)."""
    if m.P == 1:
        return ({}, {}, {}, {}), ({}, {}, {}, {})
    dense = layer_traffic(m, recompute)  # the attention half: the dense layer less its MLP
    mlp = _swiglu_traffic(m.cost.mlp_mode, m, m.F, recompute)
    attention = (_less(dense[0], mlp[0].bytes), _less(dense[1], mlp[1].bytes),
                 _less(dense[2], mlp[0].messages), _less(dense[3], mlp[1].messages))  # fmt: skip
    shared = (Traffic(), Traffic())
    if moe.shared_ffn_hidden and m.cost.mlp_mode != "tensor_parallel":
        shared = _swiglu_traffic(m.cost.mlp_mode, m, moe.shared_ffn_hidden, recompute)
    fwd, bwd, again = _dispatch(moe, m, n_seq, loads, rank)
    if recompute != "none":  # the MLP half's forward runs again
        for kind in again.bytes:
            bwd.add(kind, again.bytes[kind], again.messages.get(kind, 0))
    total = (
        _sum(attention[0], shared[0].bytes, fwd.bytes),
        _sum(attention[1], shared[1].bytes, bwd.bytes),
        _sum(attention[2], shared[0].messages, fwd.messages),
        _sum(attention[3], shared[1].messages, bwd.messages),
    )
    return total, (_sum(fwd.bytes), _sum(bwd.bytes), _sum(fwd.messages), _sum(bwd.messages))


def routing_loads(loads: MoeLoads | None, seq_lens: Sequence[int], P: int, moe) -> MoeLoads:
    """`loads`, checked against the layer (P x E), or the planning expectation when None."""
    loads = loads or MoeLoads.expected(seq_lens, P, moe)
    if loads.P != P or loads.experts != moe.experts:
        raise ValueError(f"loads are {loads.P} x {loads.experts}, the layer {P} x {moe.experts}")
    return loads


def moe_comm_bytes(
    shape, moe, strategy: str, seq_lens: Sequence[int], P: int, *, loads: MoeLoads | None = None,
    rank: int = 0, dtype="float32", recompute: str = "none", inner=None, trainable: bool = True,
) -> tuple[dict, dict, dict, dict]:  # fmt: skip
    """(bytes forward, bytes backward, messages forward, messages backward) by collective kind
    that rank `rank` sends for one MoE layer (attention half included), in the convention of
    `parallel_lib.count_bytes`. seq_lens: the micro-batch's unpadded lengths. `loads`: the
    measured routing (exact, whatever the balance), or None for the planning expectation."""
    check_moe(shape, moe, strategy, P, recompute, inner)
    loads = routing_loads(loads, seq_lens, P, moe)
    m = moe_dims(shape, strategy, seq_lens, P, dtype, inner, trainable)
    return _traffic(moe, m, len(seq_lens), loads, rank, recompute)[0]


# ---------------------------------------------------------------- compute
def _matmul(rows: float, k: int, n: int, count: int = 1) -> Kernel:
    return Kernel("matmul", 2.0 * rows * k * n, count, (rows, k, n))


def moe_kernels(moe, m: LayerDims, loads: MoeLoads, rank: int) -> dict[str, list[Kernel]]:
    """Forward kernels of the MLP half on `rank`, by op: the router on the local tokens, each
    local expert with rows (its gate/up and down matmuls), the shared experts as the strategy
    runs a dense MLP."""
    H, f, s = m.H, moe.expert_ffn_hidden, moe.shared_ffn_hidden
    kernels = {"router": [_matmul(m.tl, H, moe.experts)]}
    by_rows = Counter(n for n in loads.expert_rows(rank) if n > 0)
    kernels["experts_gate_up"] = [_matmul(n, H, 2 * f, c) for n, c in sorted(by_rows.items())]
    kernels["experts_down"] = [_matmul(n, f, H, c) for n, c in sorted(by_rows.items())]
    if s:
        for op, (i, o, column) in (("shared_gate_up", (H, 2 * s, True)),
                                   ("shared_down", (s, H, False))):  # fmt: skip
            (rows, k, n), calls = m.cost.matmul(m, i, o, column)
            kernels[op] = [_matmul(rows, k, n, calls)]
    return kernels


def _moe_elementwise(moe, m: LayerDims, loads: MoeLoads, rank: int) -> float:
    """Forward bytes of the MLP half's memory-bound ops (coarse, each op reads and writes its
    tensors once): softmax and top-k, the balance terms, the rows' gathers and regrouping,
    the experts' SwiGLU, the weighted combine, the shared experts' SwiGLU and sum."""
    tl, H, E, e, f, s = m.tl, m.H, moe.experts, m.e, moe.expert_ffn_hidden, moe.shared_ffn_hidden
    rows, pairs = sum(loads.expert_rows(rank)), loads.sent(rank)
    total = 5 * tl * E * 4 + (3 * tl * E * 4 if moe.aux_loss_coef > 0 else 0)
    total += 5 * rows * f * e  # the experts' SwiGLU
    if m.cost.mlp_mode == "tensor_parallel":
        total += 2 * tl * (m.H + 2 * E) * e + 2 * tl * E * (4 + e)  # the fused gather's input
        total += 2 * rows * H * e + (3 * rows * H + 2 * m.T * H) * e  # gather, combine
        total += 5 * m.T * (s // m.P) * e + (3 * m.T * H * e if s else 0)
    else:
        regroup = 4 * rows * H * e if m.P > 1 else 0  # by expert and back, by source rank
        total += 2 * pairs * H * e + regroup + (3 * pairs * H + 2 * tl * H) * e
        total += 5 * tl * s * e + (3 * tl * H * e if s else 0)
    return float(total)


def moe_layer_counts(
    shape, moe, strategy: str, seq_lens: Sequence[int], P: int, *, dtype="float32",
    recompute: str = "none", inner: int | None = None, trainable: bool = True,
    loads: MoeLoads | None = None, rank: int | None = None,
) -> LayerCounts:  # fmt: skip
    """Counts for one MoE layer's forward and backward on one rank of a group of P (the
    attention half as `layer_counts`'). `loads`: the measured routing, or None for the planning
    expectation; `rank`: the rank counted (None: the one computing the most expert rows).
    FLOPs: router 2 (T/P) H E; routed experts 2 H 3 F_e per pair; the shared experts as a dense
    MLP of width F_s; backward 2x forward (a frozen layer's: 1x, input gradients only)."""
    check_moe(shape, moe, strategy, P, recompute, inner)
    loads = routing_loads(loads, seq_lens, P, moe)
    rank = loads.busiest_rank() if rank is None else rank
    m = moe_dims(shape, strategy, seq_lens, P, dtype, inner, trainable)
    padded = [pad_length(n, P) for n in seq_lens]
    counts = LayerCounts(strategy, P, m.T, len(padded))
    attention = {k: v for k, v in op_kernels(shape, m, padded).items() if k not in MLP_PROJECTIONS}
    mlp = moe_kernels(moe, m, loads, rank)
    kernels = {**attention, **mlp}
    recomputed = {"none": (), "selective": MOE_OPS, "full": tuple(kernels)}[recompute]
    add_kernels(counts, kernels, recomputed, trainable)
    (bf, bb, mf, mb), group = _traffic(moe, m, len(seq_lens), loads, rank, recompute)
    counts.bytes_forward, counts.bytes_backward = bf, bb
    counts.messages_forward, counts.messages_backward = mf, mb
    counts.group_bytes_forward, counts.group_bytes_backward = group[0], group[1]
    counts.group_messages_forward, counts.group_messages_backward = group[2], group[3]
    dense = elementwise_bytes(dataclasses.replace(m, F=0))  # norms, adds, RoPE, the strategy's
    own = _moe_elementwise(moe, m, loads, rank)
    counts.elementwise_forward = dense + own
    again = {"none": 0.0, "selective": own + RECOMPUTED_ELEMENTWISE["selective"] * dense,
             "full": dense + own}[recompute]  # fmt: skip
    counts.elementwise_backward = 2 * (dense + own) + again
    return counts
