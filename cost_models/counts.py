"""Analytic counts for one decoder layer on one rank: FLOPs, matmul and attention kernel calls,
bytes and messages of every collective kind (DESIGN 6).

The layer is the one `parallel_lib.decoder_layer_step` runs: RMSNorm, fused QKV projection, RoPE,
causal GQA attention, output projection, RMSNorm, SwiGLU MLP. `shape` is any object with `hidden`,
`heads`, `kv_heads`, `head_dim` and `ffn_hidden` (such as `parallel_lib.LayerShape`). Pure Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .layer_dims import LayerDims, dims_for_tokens
from .strategy_costs import STRATEGY_COSTS, Traffic, strategy_cost
from .units import accumulator_itemsize, dtype_name, itemsize, pad_length

__all__ = [
    "STRATEGIES",
    "RECOMPUTE_MODES",
    "PROJECTIONS",
    "PRICED_RECOMPUTES",
    "LayerCounts",
    "Kernel",
    "layer_counts",
    "layer_flops",
    "attention_flops",
    "comm_bytes",
    "factorisation",
    "check_config",
    "itemsize",
    "accumulator_itemsize",
    "dtype_name",
    "pad_length",
]

STRATEGIES: tuple[str, ...] = tuple(STRATEGY_COSTS)
RECOMPUTE_MODES = ("none", "selective", "full")
"""The recompute modes the engine runs (`parallel_lib.RECOMPUTE_MODES`)."""
PROJECTIONS = "projections"
"""METP's own backward as the ParaDySe paper's code runs it: the forward keeps each block's
norm, the attention output and its softmax normalisers; the backward recomputes the QKV and
gate/up projections block by block as the weight shards stream round again. Priced for comparison
with the paper only (metp's; the engine does not run it)."""
PRICED_RECOMPUTES = (*RECOMPUTE_MODES, PROJECTIONS)
"""The recompute modes the cost model prices."""
RECOMPUTED_ELEMENTWISE = {"none": 0.0, "selective": 0.4, "full": 1.0}
"""Share of the forward's memory-bound traffic a recompute mode runs again in the backward (the
MLP half holds about 0.4 of it: a norm, SwiGLU, a residual add); the backward's own is ~2x.
`PROJECTIONS` reruns exactly RoPE and SwiGLU (`recomputed_elementwise`)."""
COLUMN_SHARDED = ("qkv", "gate_up")
"""Projections whose stored shards split the output features (the others split the input)."""
MLP_PROJECTIONS = ("gate_up", "down")
"""The MLP half's projections: what selective recompute runs again."""


def factorisation(strategy: str, P: int, inner: int | None = None) -> tuple[int, int]:
    """(u, c): the all-to-all degree and the ring degree a strategy runs with on P ranks (the
    same choice as `parallel_lib`'s strategies; usp takes the largest u in [2, P/2])."""
    return strategy_cost(strategy).factorisation(P, inner)


def check_config(shape, strategy: str, P: int, recompute: str = "none", inner=None) -> None:
    """Raise ValueError, one line saying what to change, for a configuration the strategy
    library would refuse (the counts assume every split is exact)."""
    cost = strategy_cost(strategy)
    if recompute not in PRICED_RECOMPUTES:
        raise ValueError(f"unknown recompute {recompute!r}; choose from {RECOMPUTE_MODES}")
    if recompute == PROJECTIONS and cost.name != "metp":
        raise ValueError(f"recompute {PROJECTIONS!r} is METP's own backward: metp only")
    if P < 1:
        raise ValueError(f"group size must be positive, got P={P}")
    cost.check(shape, P, inner)


@dataclass(frozen=True)
class Kernel:
    """`count` identical calls of one kernel: a matmul (m, k, n) or an attention block."""

    kind: str
    """'matmul' or 'attention'."""
    flops: float
    """FLOPs of one call (attention: algorithmic, causal pairs counted exactly)."""
    count: int
    shape: tuple = ()
    """matmul: (m, k, n); attention: (query rows, key rows, query heads, causal)."""


@dataclass
class LayerCounts:
    """Everything one rank does for one layer, split into forward and backward (the backward
    includes the recomputation)."""

    strategy: str
    P: int
    tokens: int
    """T: padded tokens of the micro-batch over the group."""
    sequences: int
    flops_forward: dict[str, float] = field(default_factory=dict)
    flops_backward: dict[str, float] = field(default_factory=dict)
    """Backward FLOPs, the recomputed forward included."""
    kernels_forward: list[Kernel] = field(default_factory=list)
    kernels_backward: list[Kernel] = field(default_factory=list)
    kernels_recomputed: list[Kernel] = field(default_factory=list)
    """Forward kernels run again in the backward by activation recomputation."""
    bytes_forward: dict[str, int] = field(default_factory=dict)
    """Bytes this rank sends, by collective kind (the convention of `parallel_lib.CommCounter`)."""
    bytes_backward: dict[str, int] = field(default_factory=dict)
    messages_forward: dict[str, int] = field(default_factory=dict)
    """Collective calls (p2p: ring exchange steps), by kind."""
    messages_backward: dict[str, int] = field(default_factory=dict)
    elementwise_forward: float = 0.0
    """Bytes read and written by memory-bound ops (norms, RoPE, SwiGLU, adds, copies)."""
    elementwise_backward: float = 0.0
    group_bytes_forward: dict[str, int] = field(default_factory=dict)
    """Of `bytes_forward`, the collectives that run over the whole group of P whatever the
    strategy's factorisation (a mixture of experts' dispatch and balance loss)."""
    group_bytes_backward: dict[str, int] = field(default_factory=dict)
    group_messages_forward: dict[str, int] = field(default_factory=dict)
    group_messages_backward: dict[str, int] = field(default_factory=dict)

    @property
    def flops(self) -> float:
        return sum(self.flops_forward.values()) + sum(self.flops_backward.values())


def _add(table: dict, key: str, value) -> None:
    if value:
        table[key] = table.get(key, 0) + value


def attention_flops(
    seq_lens: Sequence[int], heads: int, head_dim: int, *, causal: bool = True
) -> float:
    """Forward FLOPs of attention over whole sequences: QK^T and PV, 2 FLOPs per multiply-add.
    causal: the L(L+1)/2 query-key pairs each sequence really has; else L^2 (a dense masked
    implementation)."""
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in seq_lens)
    return 4.0 * heads * head_dim * pairs


def _projections(shape) -> dict[str, tuple[int, int]]:
    """(in, out) features of the whole layer's four weights."""
    H, d = shape.hidden, shape.head_dim
    q, kv = shape.heads * d, shape.kv_heads * d
    return {
        "qkv": (H, q + 2 * kv),
        "out": (q, H),
        "gate_up": (H, 2 * shape.ffn_hidden),
        "down": (shape.ffn_hidden, H),
    }


def layer_flops(
    shape, seq_lens: Sequence[int], *, causal: bool = True
) -> tuple[dict[str, float], dict[str, float]]:
    """(forward, backward) FLOPs per op of the whole layer on one device, weights trainable and
    the input requiring grad: each matmul's backward is two matmuls (input and weight
    gradients); attention's backward is counted as 2x its forward (dQ, dK from dS; dP, dV),
    the algorithmic count (flash kernels recompute the scores; the profiled rate absorbs it)."""
    T = sum(seq_lens)
    fwd = {op: 2.0 * T * i * o for op, (i, o) in _projections(shape).items()}
    fwd["attention"] = attention_flops(seq_lens, shape.heads, shape.head_dim, causal=causal)
    return fwd, {op: 2 * f for op, f in fwd.items()}


def _kernel_flops(q: int, k: int, heads: int, causal: bool, head_dim: int) -> float:
    pairs = q * (q + 1) // 2 if causal else q * k
    return 4.0 * heads * head_dim * pairs


def backward_kernels(kernel: Kernel, trainable: bool = True) -> list[Kernel]:
    """The backward of one forward kernel: a matmul's input gradient (m, n, k), then its weight
    gradient (k, m, n) (the one a frozen weight skips); attention's, counted as 2x its forward."""
    if kernel.kind != "matmul":
        return [Kernel("attention", 2 * kernel.flops, kernel.count, kernel.shape)]
    m, k, n = kernel.shape
    grads = [Kernel("matmul", kernel.flops, kernel.count, (m, n, k))]
    if trainable:
        grads.append(Kernel("matmul", kernel.flops, kernel.count, (k, m, n)))
    return grads


def layer_traffic(m: LayerDims, recompute: str) -> tuple[dict, dict, dict, dict]:
    """(bytes forward, bytes backward, messages forward, messages backward) of the dense layer
    on one rank (P = 1: none)."""
    forward, backward = Traffic(), Traffic()
    if m.P > 1:  # one rank sends nothing
        m.cost.forward_traffic(forward, m)
        m.cost.backward_traffic(backward, m)
        m.cost.recompute_traffic(backward, m, recompute)
    return forward.bytes, backward.bytes, forward.messages, backward.messages


def comm_bytes(
    shape, strategy: str, T: int, P: int, dtype="float32", recompute: str = "none", inner=None,
    trainable: bool = True,
) -> tuple[dict[str, int], dict[str, int], dict[str, int], dict[str, int]]:  # fmt: skip
    """(bytes forward, bytes backward, messages forward, messages backward) by collective kind
    for one rank. T: padded tokens over the group. Norm-weight gradient reduction (once per
    step, by the engine) excluded. trainable False: a frozen layer (no weight gradients). The
    formulas are in each strategy's cost description."""
    itemsize(dtype)  # an unknown dtype is refused whatever P
    if P == 1:
        return {}, {}, {}, {}
    cost = strategy_cost(strategy)
    m = dims_for_tokens(shape, cost, T, P, dtype, inner, trainable=trainable)
    return layer_traffic(m, recompute)


def elementwise_bytes(m: LayerDims) -> float:
    """Forward bytes moved by memory-bound ops (a coarse count: each op reads and writes its
    tensors once): two norms, two residual adds, RoPE of Q and K, SwiGLU, and the strategy's
    own (layout copies, all-to-all staging, ring merges)."""
    norms_adds = 2 * 6 * m.tl * m.H + 2 * 3 * m.tl * m.H  # norms (x^2, mean, scale, weight), adds
    return float(norms_adds * m.e + _rope_swiglu_bytes(m) + m.cost.elementwise_bytes(m))


def _rope_swiglu_bytes(m: LayerDims) -> int:
    """RoPE of Q and K (2 products and a sum per half) and SwiGLU (silu, product)."""
    return (8 * m.tl * (m.Q + m.K) + 5 * m.tl * m.F) * m.e


def recomputed_elementwise(m: LayerDims, recompute: str, forward: float) -> float:
    """Bytes of memory-bound traffic the backward runs again: a share of the forward's
    (`RECOMPUTED_ELEMENTWISE`), or for `PROJECTIONS` exactly its RoPE and SwiGLU."""
    if recompute == PROJECTIONS:
        return float(_rope_swiglu_bytes(m))
    return RECOMPUTED_ELEMENTWISE[recompute] * forward


def op_kernels(shape, m: LayerDims, padded: Sequence[int]) -> dict[str, list[Kernel]]:
    """Forward kernels of the dense layer on one rank, by op: qkv, out, gate_up, down (as the
    strategy runs them) and attention (one call per sequence per ring step)."""
    kernels: dict[str, list[Kernel]] = {}
    for op, (i, o) in _projections(shape).items():
        (rows, k, n), calls = m.cost.matmul(m, i, o, op in COLUMN_SHARDED)
        kernels[op] = [Kernel("matmul", 2.0 * rows * k * n, calls, (rows, k, n))]
    kernels["attention"] = [
        Kernel(
            "attention", _kernel_flops(q, k, h, causal, shape.head_dim), count, (q, k, h, causal)
        )
        for (q, k, h, causal), count in m.cost.attention_kernels(m, padded)
    ]
    return kernels


def add_kernels(
    counts: LayerCounts, kernels: dict[str, list[Kernel]], recomputed, trainable: bool
) -> None:
    """Add forward kernels by op to `counts`, with their backward (a frozen weight's: the input
    gradient only) and, for the ops in `recomputed`, their rerun in the backward."""
    for op, ops in kernels.items():
        for kern in ops:
            counts.kernels_forward.append(kern)
            _add(counts.flops_forward, op, kern.flops * kern.count)
            for back in backward_kernels(kern, trainable):
                counts.kernels_backward.append(back)
                _add(counts.flops_backward, op, back.flops * back.count)
            if op in recomputed:
                counts.kernels_recomputed.append(kern)
                _add(counts.flops_backward, op, kern.flops * kern.count)


def layer_counts(
    shape,
    strategy: str,
    seq_lens: Sequence[int],
    P: int,
    *,
    dtype="float32",
    recompute: str = "none",
    inner: int | None = None,
    trainable: bool = True,
) -> LayerCounts:
    """Counts for one layer's forward and backward on one rank of a group of P.

    seq_lens are the unpadded lengths of the micro-batch; each is padded to a multiple of 2P as
    the unified layout does. trainable False: a frozen layer, whose weights get no gradient (no
    weight-gradient matmuls or collectives)."""
    check_config(shape, strategy, P, recompute, inner)
    padded = [pad_length(n, P) for n in seq_lens]
    T = sum(padded)
    m = dims_for_tokens(shape, strategy_cost(strategy), T, P, dtype, inner,
                        max(padded, default=0), trainable=trainable)  # fmt: skip
    counts = LayerCounts(strategy, P, T, len(padded))
    fwd_kernels = op_kernels(shape, m, padded)
    recomputed = {"none": (), "selective": MLP_PROJECTIONS, "full": tuple(fwd_kernels),
                  PROJECTIONS: COLUMN_SHARDED}  # fmt: skip
    add_kernels(counts, fwd_kernels, recomputed[recompute], trainable)
    bf, bb, mf, mb = layer_traffic(m, recompute)
    counts.bytes_forward, counts.bytes_backward = bf, bb
    counts.messages_forward, counts.messages_backward = mf, mb
    elementwise = elementwise_bytes(m)
    counts.elementwise_forward = elementwise
    again = recomputed_elementwise(m, recompute, elementwise)
    counts.elementwise_backward = 2 * elementwise + again
    return counts
