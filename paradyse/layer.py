"""The switchable decoder layer: 1/P weight shards, a strategy and a recompute mode per call."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from parallel_lib import (
    RECOMPUTE_MODES,
    AttentionWeights,
    CommGroup,
    LayerShape,
    MlpWeights,
    Strategy,
    all_reduce_,
    get_strategy,
)

from .reference import init_full_weights

__all__ = ["SwitchableDecoderLayer", "shard_full_weights", "full_from_shards"]


def shard_full_weights(
    full: dict[str, Tensor], shape: LayerShape, P: int, rank: int
) -> dict[str, Tensor]:
    """Rank `rank`'s shards (the unified layout) of whole weights in nn.Linear convention.

    attn_qkv = [W_q rows of its heads; W_k rows; W_v rows]; attn_out = its input columns of W_o,
    transposed; mlp_gate_up = [W_gate rows; W_up rows]; mlp_down = its columns of W_down,
    transposed. Norm weights are replicated. Works for gradients too."""
    d = shape.head_dim
    hq, hk, f = shape.heads // P * d, shape.kv_heads // P * d, shape.ffn_hidden // P
    q, kv, ff = (
        slice(rank * hq, (rank + 1) * hq),
        slice(rank * hk, (rank + 1) * hk),
        slice(rank * f, (rank + 1) * f),
    )
    return {
        "attn_norm": full["attn_norm"],
        "attn_qkv": torch.cat([full["wq"][q], full["wk"][kv], full["wv"][kv]]),
        "attn_out": full["wo"][:, q].t(),
        "mlp_norm": full["mlp_norm"],
        "mlp_gate_up": torch.cat([full["w_gate"][ff], full["w_up"][ff]]),
        "mlp_down": full["w_down"][:, ff].t(),
    }


def full_from_shards(shards: list[dict[str, Tensor]], shape: LayerShape) -> dict[str, Tensor]:
    """Inverse of `shard_full_weights`: whole weights from every rank's shards (rank order)."""
    P, d = len(shards), shape.head_dim
    hq, hk, f = shape.heads // P * d, shape.kv_heads // P * d, shape.ffn_hidden // P
    qkv = [s["attn_qkv"] for s in shards]
    gate_up = [s["mlp_gate_up"] for s in shards]
    return {
        "attn_norm": shards[0]["attn_norm"],
        "wq": torch.cat([t[:hq] for t in qkv]),
        "wk": torch.cat([t[hq : hq + hk] for t in qkv]),
        "wv": torch.cat([t[hq + hk :] for t in qkv]),
        "wo": torch.cat([s["attn_out"] for s in shards]).t(),
        "mlp_norm": shards[0]["mlp_norm"],
        "w_gate": torch.cat([t[:f] for t in gate_up]),
        "w_up": torch.cat([t[f:] for t in gate_up]),
        "w_down": torch.cat([s["mlp_down"] for s in shards]).t(),
    }


class SwitchableDecoderLayer(nn.Module):
    """A LLaMA decoder layer (RMSNorm, GQA attention with RoPE, SwiGLU) stored as this rank's 1/P
    shards. forward(x, batch, strategy, recompute) runs any supported strategy on any call; the
    parameters never move, so switching strategies between calls costs nothing.

    Norm weights are replicated across the group: each rank's gradient covers its own tokens only,
    so sum them with `reduce_replicated_grads` (once per step) before the optimizer.
    Weights are initialised from `seed` as whole weights and then sharded, so every group size
    starts from the same layer."""

    def __init__(
        self,
        shape: LayerShape,
        group: CommGroup,
        *,
        norm_eps: float = 1e-5,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        problem = shape.layout_problem(group.size)
        if problem:
            raise ValueError(f"cannot shard the layer over sp={group.size}: {problem}")
        P = group.size
        self.shape, self.group = shape, group
        kw = {"dtype": dtype, "device": device}
        H, d = shape.hidden, shape.head_dim
        self.attn_norm = nn.RMSNorm(H, eps=norm_eps, **kw)
        self.attn_qkv = nn.Parameter(torch.empty(shape.qkv_rows(P), H, **kw))
        self.attn_out = nn.Parameter(torch.empty(shape.heads // P * d, H, **kw))
        self.mlp_norm = nn.RMSNorm(H, eps=norm_eps, **kw)
        self.mlp_gate_up = nn.Parameter(torch.empty(2 * shape.ffn_hidden // P, H, **kw))
        self.mlp_down = nn.Parameter(torch.empty(shape.ffn_hidden // P, H, **kw))
        for p in (self.attn_qkv, self.attn_out, self.mlp_gate_up, self.mlp_down):
            p.sp_sharded = True  # a 1/P shard: its gradient is complete on this rank
        self._checked: set[tuple[str, int]] = set()
        self.strategy: str | Strategy = "local" if P == 1 else "tp_sp"
        """What forward() runs when the call names no strategy (the engine sets it per plan)."""
        self.recompute = "none"
        """The recompute mode forward() uses when the call names none."""
        self.load_full_weights(init_full_weights(shape, torch.Generator().manual_seed(seed)))

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_full_weights(self, full: dict[str, Tensor]) -> None:
        """Copy this rank's shards out of whole weights (see `shard_full_weights`)."""
        shards = shard_full_weights(full, self.shape, self.group.size, self.group.rank)
        for name, value in shards.items():
            self.get_parameter(f"{name}.weight" if name.endswith("norm") else name).copy_(value)

    def shard_tensors(self, grads: bool = False) -> dict[str, Tensor]:
        """The six stored tensors (or their gradients), keyed as in `shard_full_weights`."""
        params = {
            "attn_norm": self.attn_norm.weight,
            "attn_qkv": self.attn_qkv,
            "attn_out": self.attn_out,
            "mlp_norm": self.mlp_norm.weight,
            "mlp_gate_up": self.mlp_gate_up,
            "mlp_down": self.mlp_down,
        }
        return {k: (p.grad if grads else p) for k, p in params.items()}

    def replicated_parameters(self) -> list[nn.Parameter]:
        return [self.attn_norm.weight, self.mlp_norm.weight]

    def reduce_replicated_grads(self) -> None:
        """Sum the replicated norm weights' gradients over the group (in place)."""
        for p in self.replicated_parameters():
            if p.grad is not None:
                all_reduce_(p.grad, self.group)

    # ------------------------------------------------------------------ forward
    def _strategy(self, strategy: str | Strategy) -> Strategy:
        strat = get_strategy(strategy) if isinstance(strategy, str) else strategy
        key = (repr(strat), self.group.size)
        if key not in self._checked:
            strat.check(self.shape, self.group.size)
            self._checked.add(key)
        return strat

    def set_option(self, strategy: str | Strategy, recompute: str = "none") -> None:
        """The strategy and recompute mode of later calls that name none (checked now)."""
        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f"unknown recompute mode {recompute!r}; choose from {RECOMPUTE_MODES}")
        self._strategy(strategy)
        self.strategy, self.recompute = strategy, recompute

    def forward(
        self,
        x: Tensor,
        batch,
        strategy: str | Strategy | None = None,
        recompute: str | None = None,
    ) -> Tensor:
        """x (T/P, H) local tokens in the batch's layout -> (T/P, H).

        strategy and recompute default to the layer's own (`set_option`). recompute: "none";
        "selective" (the MLP half is recomputed in backward); "full" (the
        whole layer is recomputed from x), with torch's non-reentrant checkpointing."""
        strategy = self.strategy if strategy is None else strategy
        recompute = self.recompute if recompute is None else recompute
        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f"unknown recompute mode {recompute!r}; choose from {RECOMPUTE_MODES}")
        strat = self._strategy(strategy)
        if recompute == "full":
            return checkpoint(self._layer, x, batch, strat, True, use_reentrant=False)
        return self._layer(x, batch, strat, False, recompute == "selective")

    def _layer(self, x, batch, strat: Strategy, recomputed: bool, recompute_mlp=False) -> Tensor:
        attn = AttentionWeights(self.attn_qkv, self.attn_out, self.shape)
        h = x + strat.attention(self.attn_norm(x), attn, batch, self.group, recomputed=recomputed)
        if recompute_mlp:
            return h + checkpoint(self._mlp, h, strat, True, use_reentrant=False)
        return h + self._mlp(h, strat, recomputed)

    def _mlp(self, h: Tensor, strat: Strategy, recomputed: bool) -> Tensor:
        weights = MlpWeights(self.mlp_gate_up, self.mlp_down, self.shape)
        return strat.mlp(self.mlp_norm(h), weights, self.group, recomputed=recomputed)
