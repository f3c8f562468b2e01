"""What every strategy's cost description provides, and the defaults most strategies share.

A description owns everything the cost model knows about one `parallel_lib` strategy: how it
factorises the group, its matmuls and attention kernel calls, its collectives, its memory-bound
traffic, which compute hides its point-to-point traffic, and its pieces of the memory replay. The
generic code (the layer's op sequence, FLOPs bookkeeping, the tape, pricing) asks it and never
names a strategy. Methods take `m`, the `LayerDims` of one rank (sizes in elements and bytes).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from ..layer_dims import LayerDims
    from ..replay import Tape

__all__ = ["StrategyCost", "Traffic"]


class Traffic:
    """Bytes this rank sends (the convention of `parallel_lib.CommCounter`) and collective calls
    (p2p: ring exchange steps), by kind, for one direction of one layer. Kinds keep the order
    they were first added in: pricing sums them in that order."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}
        self.messages: dict[str, int] = {}

    def add(self, kind: str, nbytes: int, messages: int) -> None:
        for table, value in ((self.bytes, nbytes), (self.messages, messages)):
            if value:
                table[kind] = table.get(kind, 0) + value


class StrategyCost(ABC):
    """One strategy's costs. Subclasses set `name` (the `parallel_lib` registry name) and the
    flags, and implement the abstract methods; the rest are defaults they may override."""

    name: ClassVar[str]
    mlp_mode: ClassVar[str]
    """How the strategy runs the MLP half (`parallel_lib.mlp.MLP_MODES`): what a mixture of
    experts' costs follow (`cost_models.moe_costs`)."""
    has_token_gather: ClassVar[bool] = False
    """Attention runs on tokens gathered from several ranks, copied from gathered to natural order
    and back (counted as memory-bound traffic)."""
    has_all_to_all: ClassVar[bool] = False
    """The algorithm trades tokens for heads by all-to-all, staged through copies (counted as
    memory-bound traffic whatever the degree)."""
    has_ring: ClassVar[bool] = False
    """Attention runs as ring attention: K/V chunks travel round c ranks, partial results merge
    by their log-sum-exp."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # ------------------------------------------------------------------ configuration
    @abstractmethod
    def factorisation(self, P: int, inner: int | None = None) -> tuple[int, int]:
        """(u, c): the all-to-all degree and the ring degree on P ranks, the choice
        `parallel_lib` makes (`inner` fixes u where the strategy takes it, else it is ignored)."""

    def check(self, shape, P: int, inner: int | None = None) -> None:
        """ValueError, one line saying what to change, where `parallel_lib` refuses the strategy
        on P ranks (P >= 1 is checked before): heads, kv_heads and the MLP split exactly."""
        for name, value in (("heads", shape.heads), ("kv_heads", shape.kv_heads),
                            ("ffn_hidden", shape.ffn_hidden)):  # fmt: skip
            if value % P:
                raise ValueError(f"{self.name}: {name} ({value}) is not divisible by P={P}")
        self.factorisation(P, inner)

    # ------------------------------------------------------------------ compute
    @abstractmethod
    def matmul(
        self, m: LayerDims, i: int, o: int, column: bool
    ) -> tuple[tuple[int, int, int], int]:
        """((m, k, n), calls) of one projection's forward matmuls on this rank. i, o: the whole
        weight's in and out features; column: the stored shard splits the output features (else
        the input features)."""

    @abstractmethod
    def attention_layout(self, m: LayerDims) -> tuple[int, int, int]:
        """(query heads per kernel call, ring degree c, head groups attended one after another)."""

    def attention_kernels(self, m: LayerDims, padded) -> list:
        """Forward attention kernel calls: ((query rows, key rows, heads, causal), count). The
        CPU and varlen kernels run one call per sequence per ring step."""
        heads, c, groups = self.attention_layout(m)
        calls = []
        for n in padded:
            half = n // (2 * c)  # zigzag super-chunk of this sequence on the ring (c = 1: all)
            calls.append(((2 * half, 2 * half, heads, True), groups))
            if c > 1:  # each later step: both halves x one half, or one half x both halves
                calls.append(((2 * half, half, heads, False), groups * (c - 1)))
        return calls

    def elementwise_bytes(self, m: LayerDims) -> int:
        """Forward bytes of the strategy's own memory-bound ops (a coarse count: each op reads
        and writes its tensors once), beyond the layer's norms, adds, RoPE and SwiGLU."""
        n_qkv = m.tl * (m.Q + 2 * m.K)  # QKV elements per rank
        n_o = m.tl * m.Q
        total = 0
        if self.has_token_gather:
            total += 2 * (n_qkv + n_o) * m.e  # gathered <-> natural order copies
        if self.has_all_to_all:
            total += 6 * (n_qkv + n_o) * m.e  # all-to-all staging: stack, receive, concatenate
        if self.has_ring:
            total += 8 * m.c * n_o * m.a  # LSE merges of the float32 sums at every ring step
        return total

    # ------------------------------------------------------------------ collectives (P > 1)
    def forward_traffic(self, t: Traffic, m: LayerDims) -> None:
        """Add the forward's collectives to `t` (default: none)."""
        return  # none by default

    def backward_traffic(self, t: Traffic, m: LayerDims) -> None:
        """Add the backward's collectives to `t`, the weight gradients' (`weight_grad_traffic`,
        a trainable layer's only) in their place among them; recomputation excluded."""
        if m.trainable:
            self.weight_grad_traffic(t, m)

    def weight_grad_traffic(self, t: Traffic, m: LayerDims) -> None:
        """Add the collectives only weight gradients need (a frozen layer would skip them)."""
        return  # none by default

    def recompute_traffic(self, t: Traffic, m: LayerDims, recompute: str) -> None:
        """Add what a recompute mode changes in the backward's collectives (`m.trainable` says
        whether the weight gradients' collectives, which a recomputation may serve, run)."""
        return  # none by default

    # ------------------------------------------------------------------ pricing
    def group_sizes(self, P: int, inner: int | None) -> dict[str, int]:
        """Ranks in the group of each collective kind (the profile's fit is chosen by it)."""
        u, c = self.factorisation(P, inner)
        return {"all_gather": P, "reduce_scatter": P, "all_to_all": u, "p2p": c}

    def p2p_hidden_under(self, matmul: float, attention: float) -> float:
        """Seconds of compute the point-to-point traffic runs under (0: none overlaps)."""
        return 0.0

    # ------------------------------------------------------------------ replay: attention facts
    def tokens_attended(self, m: LayerDims) -> int:
        """N: tokens whose attention this rank computes (its heads' share)."""
        return m.T

    def sorts(self, m: LayerDims) -> bool:
        """Q/K/V gathered from several ranks are reordered by index_select copies."""
        return False

    def reorders_output(self, m: LayerDims) -> bool:
        """The attention output becomes a new tensor before the out projection (reordered, or
        head groups concatenated); else the out projection saves the attention output itself."""
        return self.sorts(m)

    def shard_blocks(self, m: LayerDims) -> int:
        """Rank shards of heads side by side in the projection output attention reads."""
        return 1

    def qkv_copied(self, m: LayerDims) -> bool:
        """Q, K and V are tensors of their own (reordered, or V reshaped across shard blocks);
        else V is a view that keeps the whole projection output alive."""
        return self.sorts(m) or (self.shard_blocks(m) > 1 and m.K // m.d // m.P > 1)

    def runs_all_to_all(self, m: LayerDims) -> bool:
        """Q/K/V and the attention output cross an all-to-all in this configuration."""
        return False

    def head_groups(self, m: LayerDims) -> int:
        """Head groups whose ring attention runs one after another (their buffers are 1/groups)."""
        return 1

    # ------------------------------------------------------------------ replay: linears
    def linear_output(self, m: LayerDims, column: bool, o: int) -> int:
        """Bytes of one projection's output on this rank (= its output gradient)."""
        return m.tl * o * m.e

    @abstractmethod
    def replay_linear_forward(
        self, tape: Tape, m: LayerDims, column: bool, i: int, o: int, keep: bool
    ) -> float:
        """Allocate the output on the tape (left live) with the temporaries that come and go;
        return the output's bytes. keep: a recomputation keeps its gathered operand."""

    @abstractmethod
    def replay_linear_backward(
        self, tape: Tape, m: LayerDims, column: bool, i: int, o: int, kept: int
    ) -> None:
        """With the output gradient live: allocate the input gradient (left live) and the
        weight gradient's buffers; `kept` (what a recomputation kept) is freed by the caller."""

    def output_grad_before_recompute(self, m: LayerDims, o: int) -> int:
        """Bytes the backward of the layer's last (row-sharded) projection allocates before it
        reads a saved tensor, so a recomputation runs with them live. Default: none (its first
        step reads the saved tensors)."""
        return 0

    def kept_operand(self, m: LayerDims, column: bool, i: int, o: int) -> int:
        """Bytes a recomputed linear keeps gathered for its backward beyond its saved input."""
        return 0

    def replay_last_recomputed(self, tape: Tape, m: LayerDims, i: int, o: int) -> None:
        """A recomputation's last (row-sharded) linear: its operands saved for the backward, its
        output never used. Default: the product is computed before its operands are saved."""
        tape.temp(m.tl * o * m.e)
