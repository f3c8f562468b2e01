"""Sizes of the tensors one rank handles for one layer, and the bytes it saves for backward in
closed form (the implementation's saved tensors, counted one by one). Pure Python."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .strategy_costs import StrategyCost, strategy_cost
from .units import accumulator_itemsize, itemsize, pad_length

__all__ = [
    "LayerDims",
    "layer_dims",
    "dims_for_tokens",
    "attention_saved",
    "mlp_saved",
    "saved_bytes",
]


@dataclass(frozen=True)
class LayerDims:
    """Sizes in bytes of the tensors one rank handles; the strategy's facts come from `cost`."""

    cost: StrategyCost  # the strategy's cost description
    P: int
    u: int  # all-to-all degree
    c: int  # ring degree
    T: int
    tl: int
    H: int
    Q: int  # heads * head_dim
    K: int  # kv_heads * head_dim
    F: int
    d: int
    e: int  # bytes per element
    a: int  # bytes per accumulator element (LSE, ring sums)
    longest: int  # longest padded sequence (T where only the total is known)
    rs_copy: bool  # the backend copies a reduce-scatter's input (gloo)
    trainable: bool = True
    """False: a frozen layer (no weight gradients): a linear keeps no input, a norm no x_hat."""
    weights_free: bool = False
    """Replay the layer as if gathered or streamed weights and their gradient buffers took no
    memory: the difference is what they add to its peak (`cost_models.layer_memory`)."""

    @property
    def w(self) -> int:
        """Bytes per element of a weight or weight-gradient buffer in the replay (0 when
        `weights_free`)."""
        return 0 if self.weights_free else self.e

    @property
    def strategy(self) -> str:
        return self.cost.name

    @property
    def attention_shard(self) -> int:
        """Elements of this rank's stored attention weight shards (fused QKV and out)."""
        return (self.Q + 2 * self.K) * self.H // self.P + self.Q * self.H // self.P

    @property
    def mlp_shard(self) -> int:
        """Elements of this rank's stored MLP weight shards (gate, up, down)."""
        return 3 * (self.F // self.P) * self.H

    @property
    def norm_saved(self) -> int:
        # RMSNorm computes in float32: float32 x (the input itself in float32) and x_hat, the
        # output in the compute dtype, 1/rms per token (measured on torch 2.13). Frozen, the
        # norm weight's gradient needs no x_hat and the next linear's none of the output.
        if not self.trainable:
            return self.tl * self.H * 4 + 4 * self.tl
        per_elem = 12 if self.e == 4 else 8 + self.e
        return self.tl * self.H * per_elem + 4 * self.tl

    @property
    def tokens_attended(self) -> int:
        """N: tokens whose attention this rank computes (its heads' share)."""
        return self.cost.tokens_attended(self)

    @property
    def q_width(self) -> int:
        """Query features (heads x head_dim) per attended token (all head groups, for metp)."""
        return self.Q * self.tl // self.tokens_attended

    @property
    def kv_width(self) -> int:
        return self.K * self.tl // self.tokens_attended

    @property
    def qkv_copied(self) -> bool:
        """Q, K and V are tensors of their own (reordered, sliced per head group, or V reshaped
        across shard blocks); else V is a view that keeps the whole projection output alive."""
        return self.cost.qkv_copied(self)

    def flash_workspace(self, rows_q: int, rows_k: int, groups: int = 1) -> int:
        """float32 gradient buffers of one flash-attention backward call (per query head)."""
        return (rows_q + 2 * rows_k) * self.q_width // groups * self.a

    @property
    def sorted(self) -> bool:
        """Q/K/V gathered from several ranks are reordered by index_select copies."""
        return self.cost.sorts(self)

    @property
    def reordered(self) -> bool:
        """The attention output is copied (reordered, or head groups concatenated) before the
        out projection."""
        return self.cost.reorders_output(self)

    @property
    def all_to_all(self) -> bool:
        """Q/K/V and the attention output cross an all-to-all."""
        return self.cost.runs_all_to_all(self)

    @property
    def ring(self) -> bool:
        """Attention runs as ring attention."""
        return self.cost.has_ring

    @property
    def head_groups(self) -> int:
        """Head groups attended one after another."""
        return self.cost.head_groups(self)


def dims_for_tokens(
    shape, cost: StrategyCost, T: int, P: int, dtype, inner, longest: int = 0,
    rs_copy: bool = False, trainable: bool = True,
) -> LayerDims:  # fmt: skip
    """The dims of a micro-batch of T padded tokens over the group (longest: 0 means T)."""
    u, c = cost.factorisation(P, inner)
    d = shape.head_dim
    return LayerDims(
        cost, P, u, c, T, T // P, shape.hidden, shape.heads * d, shape.kv_heads * d,
        shape.ffn_hidden, d, itemsize(dtype), accumulator_itemsize(dtype), longest or T, rs_copy,
        trainable,
    )  # fmt: skip


def layer_dims(
    shape, strategy: str, seq_lens: Sequence[int], P: int, dtype, inner, rs_copy: bool,
    trainable: bool = True,
) -> LayerDims:  # fmt: skip
    padded = [pad_length(n, P) for n in seq_lens]
    return dims_for_tokens(
        shape,
        strategy_cost(strategy),
        sum(padded),
        P,
        dtype,
        inner,
        max(padded),
        rs_copy,
        trainable,
    )


# ---------------------------------------------------------------- saved bytes (closed form)
def attention_saved(m: LayerDims) -> int:
    N, e = m.tokens_attended, m.e
    q, kv = N * m.q_width, N * m.kv_width  # elements of Q and of K (or V)
    # RoPE's cos and sin tables are the micro-batch's, made once for every layer (the layout's
    # `rotary`): (N, d) per micro-batch, a few token-wide columns like the vectors left out
    saved = m.norm_saved
    if e != 4:  # the norm keeps a float32 copy; the input is counted too (the layer's own)
        saved += m.tl * m.H * e
    if m.qkv_copied:
        saved += (q + 2 * kv) * e  # rotated Q and K, V's own copy
    else:  # rotated Q, K, and the projection output that V is a view of
        saved += (q + kv) * e + (q + 2 * kv) * e
    saved += q * e + m.tl * m.Q // m.d * m.a  # attention output and its LSE
    if m.reordered and m.trainable:
        saved += q * e  # the reordered (or concatenated) output the out projection keeps
    return saved


def mlp_saved(m: LayerDims) -> int:
    kept = 4 if m.trainable else 3  # gate/up output, silu(gate), the product (a frozen down
    return m.norm_saved + kept * m.tl * m.F * m.e  # projection keeps no input)


def saved_bytes(m: LayerDims, recompute: str) -> int:
    x = m.tl * m.H * m.e
    if recompute == "full":
        return x
    if recompute == "projections":  # METP's own: both norms, the attention output, its LSE
        kept = 2 * m.norm_saved + m.tl * m.Q * m.e + m.tl * (m.Q // m.d) * m.a
        return kept + (x if m.e != 4 else 0)  # float32: the norm's input copy is x itself
    if recompute == "selective":
        return attention_saved(m) + x  # the MLP keeps only its input h
    return attention_saved(m) + mlp_saved(m)
