"""Analytic counts for one decoder layer on one rank: FLOPs, matmul and attention kernel calls,
bytes and messages of every collective kind (DESIGN 6).

The layer is the one `paradyse.SwitchableDecoderLayer` runs: RMSNorm, fused QKV projection, RoPE,
causal GQA attention, output projection, RMSNorm, SwiGLU MLP. `shape` is any object with `hidden`,
`heads`, `kv_heads`, `head_dim` and `ffn_hidden` (such as `parallel_lib.LayerShape`). Pure Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "STRATEGIES",
    "RECOMPUTE_MODES",
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

STRATEGIES = ("local", "tp_sp", "ulysses", "ring", "usp", "metp")
RECOMPUTE_MODES = ("none", "selective", "full")
_ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
ZERO3 = ("ulysses", "ring", "usp")
RECOMPUTED_ELEMENTWISE = {"none": 0.0, "selective": 0.4, "full": 1.0}
"""Share of the forward's memory-bound traffic a recompute mode runs again in the backward (the
MLP half holds about 0.4 of it: a norm, SwiGLU, a residual add); the backward's own is ~2x."""


def dtype_name(dtype) -> str:
    """'float32' for torch.float32, 'torch.float32' or 'float32'."""
    name = str(dtype).removeprefix("torch.")
    if name not in _ITEMSIZE:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(_ITEMSIZE)}")
    return name


def itemsize(dtype) -> int:
    return _ITEMSIZE[dtype_name(dtype)]


def accumulator_itemsize(dtype) -> int:
    """Bytes of the float32 (float64 for float64) sums: LSE, ring K/V-gradient accumulators."""
    return 8 if dtype_name(dtype) == "float64" else 4


def pad_length(length: int, P: int) -> int:
    """A sequence's length in the unified layout: rounded up to a multiple of 2P."""
    if length <= 0:
        raise ValueError(f"sequence lengths must be positive, got {length}")
    return -(-length // (2 * P)) * (2 * P)


def factorisation(strategy: str, P: int, inner: int | None = None) -> tuple[int, int]:
    """(u, c): the all-to-all degree and the ring degree a strategy runs with on P ranks (the
    same choice as `parallel_lib`'s strategies; usp takes the largest u in [2, P/2])."""
    if strategy in ("local", "tp_sp", "ulysses"):
        return P, 1
    if strategy in ("ring", "metp"):
        return 1, P
    if strategy == "usp":
        options = [u for u in range(2, P // 2 + 1) if P % u == 0]
        u = inner if inner is not None else (max(options) if options else 0)
        if u < 2 or P % u or P // u < 2:
            raise ValueError(f"usp needs P = inner x outer with both at least 2, got P={P}")
        return u, P // u
    raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")


def check_config(shape, strategy: str, P: int, recompute: str = "none", inner=None) -> None:
    """Raise ValueError, one line saying what to change, for a configuration the strategy
    library would refuse (the counts assume every split is exact)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"unknown recompute {recompute!r}; choose from {RECOMPUTE_MODES}")
    if P < 1:
        raise ValueError(f"group size must be positive, got P={P}")
    if strategy == "local" and P != 1:
        raise ValueError(f"local runs on one rank only, got P={P}")
    for name, value in (("heads", shape.heads), ("kv_heads", shape.kv_heads),
                        ("ffn_hidden", shape.ffn_hidden)):  # fmt: skip
        if value % P:
            raise ValueError(f"{strategy}: {name} ({value}) is not divisible by P={P}")
    factorisation(strategy, P, inner)


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


def _matmuls(shape, strategy: str, P: int, T: int) -> dict[str, tuple[tuple[int, int, int], int]]:
    """Per projection: ((m, k, n), calls) of the forward matmuls on one rank."""
    out = {}
    for op, (i, o) in _projections(shape).items():
        column = op in ("qkv", "gate_up")  # output features are sharded (else input features)
        if strategy == "local":
            out[op] = ((T, i, o), 1)
        elif strategy == "tp_sp":
            out[op] = ((T, i, o // P) if column else (T, i // P, o), 1)
        elif strategy in ZERO3:
            out[op] = ((T // P, i, o), 1)
        else:  # metp: P streamed blocks of the local tokens
            out[op] = ((T // P, i, o // P) if column else (T // P, i // P, o), P)
    return out


def _attention_kernels(shape, strategy: str, P: int, padded: Sequence[int], inner) -> list:
    """Forward attention kernel calls on one rank: (query rows, key rows, heads, causal), count.
    The CPU and varlen kernels run one call per sequence per ring step."""
    if strategy in ("local", "tp_sp", "ulysses"):
        heads = shape.heads // (1 if strategy == "local" else P)
        return [((n, n, heads, True), 1) for n in padded]
    if strategy == "metp":
        u, c, groups = 1, P, P
    else:
        (u, c), groups = factorisation(strategy, P, inner), 1
    heads = shape.heads // u if strategy != "metp" else shape.heads // P
    calls = []
    for n in padded:
        half = n // (2 * c)  # zigzag super-chunk of this sequence on the ring
        calls.append(((2 * half, 2 * half, heads, True), groups))
        if c > 1:  # each later step: both halves x one half, or one half x both halves
            calls.append(((2 * half, half, heads, False), groups * (c - 1)))
    return calls


def _kernel_flops(q: int, k: int, heads: int, causal: bool, head_dim: int) -> float:
    pairs = q * (q + 1) // 2 if causal else q * k
    return 4.0 * heads * head_dim * pairs


def comm_bytes(
    shape, strategy: str, T: int, P: int, dtype="float32", recompute: str = "none", inner=None
) -> tuple[dict[str, int], dict[str, int], dict[str, int], dict[str, int]]:
    """(bytes forward, bytes backward, messages forward, messages backward) by collective kind
    for one rank. T: padded tokens over the group. Norm-weight gradient reduction (once per
    step, by the engine) excluded. The formulas are the ones in each strategy's docstring."""
    bf, bb, mf, mb = {}, {}, {}, {}
    b, a = itemsize(dtype), accumulator_itemsize(dtype)
    H, d, kvh = shape.hidden, shape.head_dim, shape.kv_heads
    tl = T // P
    if P == 1 or strategy == "local":
        return bf, bb, mf, mb
    attn_shard = (shape.heads + 2 * kvh) * d * H // P + shape.heads * d * H // P
    mlp_shard = 3 * (shape.ffn_hidden // P) * H
    shard = attn_shard + mlp_shard
    if strategy == "tp_sp":
        v = (P - 1) * tl * H * b
        _add(bf, "all_gather", 2 * v), _add(mf, "all_gather", 2)
        _add(bf, "reduce_scatter", 2 * v), _add(mf, "reduce_scatter", 2)
        _add(bb, "all_gather", 4 * v), _add(mb, "all_gather", 4)
        _add(bb, "reduce_scatter", 2 * v), _add(mb, "reduce_scatter", 2)
        if recompute == "full":  # the attention output's reduce-scatter runs again
            _add(bb, "reduce_scatter", v), _add(mb, "reduce_scatter", 1)
    elif strategy in ZERO3:
        u, c = factorisation(strategy, P, inner)
        weights = (P - 1) * shard * b
        a2a = (u - 1) * tl * (2 * shape.heads + 2 * kvh) * d * b // u
        kv = 2 * tl * kvh * d  # elements of one K/V ring message
        ring_fwd, ring_msgs = (c - 1) * kv * b, c - 1
        ring_bwd = ring_fwd + (c * kv * a if c > 1 else 0)
        ring_bwd_msgs = (2 * c - 1) if c > 1 else 0
        a2a_msgs = 2 if u > 1 else 0
        _add(bf, "all_gather", weights), _add(mf, "all_gather", 4)
        _add(bf, "all_to_all", a2a), _add(mf, "all_to_all", a2a_msgs)
        _add(bf, "p2p", ring_fwd), _add(mf, "p2p", ring_msgs)
        _add(bb, "all_gather", weights), _add(mb, "all_gather", 4)
        _add(bb, "reduce_scatter", weights), _add(mb, "reduce_scatter", 4)
        _add(bb, "all_to_all", a2a), _add(mb, "all_to_all", a2a_msgs)
        _add(bb, "p2p", ring_bwd), _add(mb, "p2p", ring_bwd_msgs)
        if recompute == "full":
            _add(bb, "all_to_all", a2a), _add(mb, "all_to_all", a2a_msgs)
            _add(bb, "p2p", ring_fwd), _add(mb, "p2p", ring_msgs)
    elif strategy == "metp":
        kv = 2 * tl * kvh * d
        forward = (P - 1) * shard * b + (P - 1) * kv * b
        fwd_msgs = 4 * (P - 1) + P * (P - 1)  # 4 streamed linears; a ring per head group
        _add(bf, "p2p", forward), _add(mf, "p2p", fwd_msgs)
        _add(bb, "p2p", forward + P * shard * b + P * kv * a)
        _add(mb, "p2p", 4 * (2 * P - 1) + P * (2 * P - 1))
        if recompute == "selective":
            _add(bb, "p2p", (P - 1) * mlp_shard * b), _add(mb, "p2p", 2 * (P - 1))
        elif recompute == "full":
            _add(bb, "p2p", forward), _add(mb, "p2p", fwd_msgs)
    else:
        check_config(shape, strategy, P)
    return bf, bb, mf, mb


def _elementwise_bytes(shape, strategy: str, P: int, T: int, b: int, a: int, inner) -> float:
    """Forward bytes moved by memory-bound ops (a coarse count: each op reads and writes its
    tensors once): two norms, two residual adds, RoPE of Q and K, SwiGLU, layout copies."""
    H, d, F = shape.hidden, shape.head_dim, shape.ffn_hidden
    tl = T // P
    n_qkv = tl * (shape.heads + 2 * shape.kv_heads) * d  # QKV elements per rank
    n_o = tl * shape.heads * d
    total = 2 * 6 * tl * H + 2 * 3 * tl * H  # norms (x^2, mean, scale, weight), adds
    total += 8 * tl * (shape.heads + shape.kv_heads) * d  # RoPE: 2 products and a sum per half
    total += 5 * tl * F  # silu, product
    total *= b
    if strategy in ("tp_sp", "ulysses", "usp"):
        total += 2 * (n_qkv + n_o) * b  # gathered <-> natural order copies
    if strategy in ("ulysses", "usp"):
        total += 6 * (n_qkv + n_o) * b  # all-to-all staging: stack, receive, concatenate
    if strategy in ("ring", "usp", "metp"):
        c = factorisation(strategy, P, inner)[1]
        total += 8 * c * n_o * a  # LSE merges of the float32 sums at every ring step
    return float(total)


def layer_counts(
    shape,
    strategy: str,
    seq_lens: Sequence[int],
    P: int,
    *,
    dtype="float32",
    recompute: str = "none",
    inner: int | None = None,
) -> LayerCounts:
    """Counts for one layer's forward and backward on one rank of a group of P.

    seq_lens are the unpadded lengths of the micro-batch; each is padded to a multiple of 2P as
    the unified layout does."""
    check_config(shape, strategy, P, recompute, inner)
    padded = [pad_length(n, P) for n in seq_lens]
    T, b = sum(padded), itemsize(dtype)
    counts = LayerCounts(strategy, P, T, len(padded))
    fwd_kernels: dict[str, list[Kernel]] = {}
    for op, ((m, k, n), calls) in _matmuls(shape, strategy, P, T).items():
        fwd_kernels[op] = [Kernel("matmul", 2.0 * m * k * n, calls, (m, k, n))]
    fwd_kernels["attention"] = [
        Kernel(
            "attention", _kernel_flops(q, k, h, causal, shape.head_dim), count, (q, k, h, causal)
        )
        for (q, k, h, causal), count in _attention_kernels(shape, strategy, P, padded, inner)
    ]
    recomputed = {"none": (), "selective": ("gate_up", "down"), "full": tuple(fwd_kernels)}
    for op, kernels in fwd_kernels.items():
        for kern in kernels:
            counts.kernels_forward.append(kern)
            _add(counts.flops_forward, op, kern.flops * kern.count)
            if kern.kind == "matmul":
                m, k, n = kern.shape  # input gradient (m, n, k) and weight gradient (k, m, n)
                counts.kernels_backward.append(Kernel("matmul", kern.flops, kern.count, (m, n, k)))
                counts.kernels_backward.append(Kernel("matmul", kern.flops, kern.count, (k, m, n)))
            else:
                counts.kernels_backward.append(
                    Kernel("attention", 2 * kern.flops, kern.count, kern.shape)
                )
            _add(counts.flops_backward, op, 2 * kern.flops * kern.count)
            if op in recomputed[recompute]:
                counts.kernels_recomputed.append(kern)
                _add(counts.flops_backward, op, kern.flops * kern.count)
    bf, bb, mf, mb = comm_bytes(shape, strategy, T, P, dtype, recompute, inner)
    counts.bytes_forward, counts.bytes_backward = bf, bb
    counts.messages_forward, counts.messages_backward = mf, mb
    elementwise = _elementwise_bytes(shape, strategy, P, T, b, accumulator_itemsize(dtype), inner)
    counts.elementwise_forward = elementwise
    counts.elementwise_backward = (2 + RECOMPUTED_ELEMENTWISE[recompute]) * elementwise
    return counts
