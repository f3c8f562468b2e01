"""The switchable decoder layer: 1/P weight shards, a strategy and a recompute mode per call.

It owns the parameters and wraps `parallel_lib.decoder_layer_step`, the plain function every
strategy runs; its MLP half is a pluggable module (`paradyse.mlp`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from parallel_lib import (
    RECOMPUTE_MODES,
    AttentionWeights,
    CommGroup,
    LayerShape,
    LayerWeights,
    Strategy,
    all_reduce_,
    decoder_layer_step,
    get_strategy,
)

from .mlp import DenseMLP, LogicalPart
from .moe import MoeMLP, moe_full_weights
from .reference import DENSE_MLP_NAMES, init_full_weights
from .sharding import mark_sharded

__all__ = ["SwitchableDecoderLayer", "shard_full_weights", "full_from_shards"]


_OWN = ("attn_norm", "attn_qkv", "attn_out", "mlp_norm")
"""The layer's own shard keys; the others are its MLP module's, as `mlp_NAME`."""


def _head_rows(shape: LayerShape, P: int) -> tuple[int, int]:
    """Rows of one rank's query and key (or value) heads: heads/P x d, kv_heads/P x d."""
    return shape.heads // P * shape.head_dim, shape.kv_heads // P * shape.head_dim


def shard_full_weights(
    full: dict[str, Tensor], shape: LayerShape, P: int, rank: int, mlp=DenseMLP
) -> dict[str, Tensor]:
    """Rank `rank`'s shards (the unified layout) of whole weights in nn.Linear convention.

    attn_qkv = [W_q rows of its heads; W_k rows; W_v rows]; attn_out = its input columns of W_o,
    transposed; the MLP module's shards as `mlp_NAME` (the dense one's: mlp_gate_up = [W_gate
    rows; W_up rows], mlp_down = its columns of W_down, transposed). Norm weights are
    replicated. Works for gradients too."""
    hq, hk = _head_rows(shape, P)
    q, kv = slice(rank * hq, (rank + 1) * hq), slice(rank * hk, (rank + 1) * hk)
    mlp = mlp.shards_of(full, shape, P, rank)  # the MLP module (or its class, if static)
    return {
        "attn_norm": full["attn_norm"],
        "attn_qkv": torch.cat([full["wq"][q], full["wk"][kv], full["wv"][kv]]),
        "attn_out": full["wo"][:, q].t(),
        "mlp_norm": full["mlp_norm"],
        **{f"mlp_{name}": value for name, value in mlp.items()},
    }


def full_from_shards(
    shards: list[dict[str, Tensor]], shape: LayerShape, mlp=DenseMLP
) -> dict[str, Tensor]:
    """Inverse of `shard_full_weights`: whole weights from every rank's shards (rank order)."""
    hq, hk = _head_rows(shape, len(shards))
    qkv = [s["attn_qkv"] for s in shards]
    mlps = [{k.removeprefix("mlp_"): v for k, v in s.items() if k not in _OWN} for s in shards]
    return {
        "attn_norm": shards[0]["attn_norm"],
        "wq": torch.cat([t[:hq] for t in qkv]),
        "wk": torch.cat([t[hq : hq + hk] for t in qkv]),
        "wv": torch.cat([t[hq + hk :] for t in qkv]),
        "wo": torch.cat([s["attn_out"] for s in shards]).t(),
        "mlp_norm": shards[0]["mlp_norm"],
        **mlp.whole_from(mlps, shape),
    }


class SwitchableDecoderLayer(nn.Module):
    """A LLaMA decoder layer (RMSNorm, GQA attention with RoPE, an MLP) stored as this rank's
    1/P shards. forward(x, batch, strategy, recompute) runs any supported strategy on any call;
    the parameters never move, so switching strategies between calls costs nothing.

    Parameters: attn_norm.weight, attn_qkv, attn_out, mlp_norm.weight and the MLP module's
    (`mlp.gate_up`, `mlp.down` for the dense SwiGLU). Norm weights are replicated across the
    group: each rank's gradient covers its own tokens only, so sum them with
    `reduce_replicated_grads` (once per step) before the optimizer. Weights are initialised from
    `seed` as whole weights and then sharded, so every group size starts from the same layer
    (or left uninitialised with `random_init=False`, for a loader to fill).
    `moe` (a `parallel_lib.moe.MoeShape`) makes the MLP half a mixture of experts
    (`paradyse.moe.MoeMLP`); None keeps the dense SwiGLU. `index` is the layer's position."""

    def __init__(
        self,
        shape: LayerShape,
        group: CommGroup,
        *,
        norm_eps: float = 1e-5,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int = 0,
        moe=None,
        index: int = 0,
        random_init: bool = True,
    ) -> None:
        super().__init__()
        problem = shape.layout_problem(group.size)
        if problem:
            raise ValueError(f"cannot shard the layer over sp={group.size}: {problem}")
        P = group.size
        self.shape, self.group, self.norm_eps = shape, group, norm_eps
        kw = {"dtype": dtype, "device": device}
        H, d = shape.hidden, shape.head_dim
        self.attn_norm = nn.RMSNorm(H, eps=norm_eps, **kw)
        self.attn_qkv = mark_sharded(nn.Parameter(torch.empty(shape.qkv_rows(P), H, **kw)))
        self.attn_out = mark_sharded(nn.Parameter(torch.empty(shape.heads // P * d, H, **kw)))
        self.mlp_norm = nn.RMSNorm(H, eps=norm_eps, **kw)
        self.index = index
        """The layer's position in the model (what router hooks and metrics name it by)."""
        if moe is None:
            self.mlp = DenseMLP(shape, P, **kw)
        else:
            self.mlp = MoeMLP(shape, P, moe, layer=index, **kw)
        self._checked: set[tuple[str, int]] = set()
        self.strategy: str | Strategy = "local" if P == 1 else "tp_sp"
        """What forward() runs when the call names no strategy (the engine sets it per plan)."""
        self.recompute = "none"
        """The recompute mode forward() uses when the call names none."""
        if random_init:
            generator = torch.Generator().manual_seed(seed)
            full = init_full_weights(shape, generator)
            if moe is not None:
                full = {k: v for k, v in full.items() if k not in DENSE_MLP_NAMES}
                full |= moe_full_weights(shape, moe, generator)
            self.load_full_weights(full)

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_full_weights(self, full: dict[str, Tensor]) -> None:
        """Copy this rank's shards out of whole weights (see `shard_full_weights`)."""
        shards = shard_full_weights(full, self.shape, self.group.size, self.group.rank,
                                    self.mlp)  # fmt: skip
        for name, value in self.shard_tensors().items():
            value.copy_(shards[name])

    def shard_tensors(self, grads: bool = False) -> dict[str, Tensor]:
        """The stored tensors (or their gradients), keyed as in `shard_full_weights`."""
        params = {
            "attn_norm": self.attn_norm.weight,
            "attn_qkv": self.attn_qkv,
            "attn_out": self.attn_out,
            "mlp_norm": self.mlp_norm.weight,
            **{f"mlp_{name}": p for name, p in self.mlp.named_parameters()},
        }
        return {k: (p.grad if grads else p) for k, p in params.items()}

    def replicated_parameters(self) -> list[nn.Parameter]:
        return [self.attn_norm.weight, self.mlp_norm.weight, *self.mlp.replicated_parameters()]

    def reduce_replicated_grads(self) -> None:
        """Sum the replicated norm weights' gradients over the group (in place)."""
        for p in self.replicated_parameters():
            if p.grad is not None:
                all_reduce_(p.grad, self.group)

    def logical_parts(self, prefix: str = "") -> dict[str, list[LogicalPart]]:
        """Per sharded parameter name: the logical whole tensors its rows belong to (the fused
        Q/K/V shard is Q, K and V rows; see `paradyse.mlp.LogicalPart`)."""
        shape = self.shape
        hq, hk = _head_rows(shape, self.group.size)
        q_rows, kv_rows = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        parts = {
            "attn_qkv": [(f"{prefix}wq", 0, hq, q_rows), (f"{prefix}wk", hq, hq + hk, kv_rows),
                         (f"{prefix}wv", hq + hk, hq + 2 * hk, kv_rows)],
            "attn_out": [(f"{prefix}wo_t", 0, hq, q_rows)],
        }  # fmt: skip
        for name, rows in self.mlp.logical_parts(prefix).items():
            parts[f"mlp.{name}"] = rows
        return parts

    def weights(self, batch=None) -> LayerWeights:
        """What the layer step reads (views of the parameters, nothing copied); an MoE layer's
        also carry the micro-batch's routing context when `batch` is given."""
        return LayerWeights(
            attn_norm=self.attn_norm.weight,
            attention=AttentionWeights(self.attn_qkv, self.attn_out, self.shape),
            mlp_norm=self.mlp_norm.weight,
            mlp=self.mlp.weights(batch),
            norm_eps=self.norm_eps,
            mlp_kind=self.mlp.kind,
        )

    # ------------------------------------------------------------------ forward
    def _strategy(self, strategy: str | Strategy, P: int | None = None) -> Strategy:
        """The strategy, checked once for this layer on a group of P (default: the layer's)."""
        strat = get_strategy(strategy) if isinstance(strategy, str) else strategy
        key = (repr(strat), P or self.group.size)
        if key not in self._checked:
            strat.check(self.shape, key[1])
            self._checked.add(key)
        return strat

    def set_option(
        self, strategy: str | Strategy, recompute: str = "none", group_size: int | None = None
    ) -> None:
        """The strategy and recompute mode of later calls that name none (checked now, on a
        sub-group of `group_size` ranks when given: see `parallel_lib.group_size`)."""
        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f"unknown recompute mode {recompute!r}; choose from {RECOMPUTE_MODES}")
        self._strategy(strategy, group_size)
        self.strategy, self.recompute = strategy, recompute

    def forward(
        self,
        x: Tensor,
        batch,
        strategy: str | Strategy | None = None,
        recompute: str | None = None,
    ) -> Tensor:
        """x (T/P, H) local tokens in the batch's layout -> (T/P, H).

        strategy and recompute default to the layer's own (`set_option`); see
        `parallel_lib.decoder_layer_step` for the recompute modes. A batch packed for a
        sub-group (`batch.split`) runs the strategy on that sub-group, with the weights gathered
        from the whole group's shards for the step."""
        strategy = self.strategy if strategy is None else strategy
        recompute = self.recompute if recompute is None else recompute
        split = getattr(batch, "split", None)
        if split is not None and split.size == self.group.size:
            split = None
        group = self.group if split is None else split.compute
        strat = self._strategy(strategy, group.size)
        return decoder_layer_step(
            x, self.weights(batch), batch.layout, group, strat, recompute, split
        )
