"""One decoder layer's step as a plain function over a layout: RMSNorm -> attention strategy ->
residual, RMSNorm -> MLP -> residual, with the recompute mode's activation checkpointing.

`paradyse.SwitchableDecoderLayer` wraps it around its parameters; the cost-model profiler and
validator measure through it directly, so what they time is exactly what training runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .group_size import GroupSplit, regroup_attention, regroup_mlp
from .groups import CommGroup
from .layout import ZigzagLayout
from .mlp import SWIGLU, Mlp
from .shape import AttentionWeights, LayerShape, random_shard
from .strategies import RECOMPUTE_MODES, Strategy

__all__ = ["LayerWeights", "decoder_layer_step"]


@dataclass(frozen=True)
class LayerWeights:
    """Everything one layer step reads: this rank's attention and MLP shards and the replicated
    norm weights."""

    attn_norm: Tensor
    """(H,) RMSNorm weight before attention (replicated over the group)."""
    attention: AttentionWeights
    mlp_norm: Tensor
    """(H,) RMSNorm weight before the MLP (replicated)."""
    mlp: Any
    """The MLP kind's weights (`MlpWeights` for the dense SwiGLU)."""
    norm_eps: float = 1e-5
    mlp_kind: Mlp = SWIGLU
    """Which MLP runs the MLP half."""

    @classmethod
    def random(
        cls,
        shape: LayerShape,
        P: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        seed: int = 0,
        trainable: bool = True,
        mlp_kind: Mlp = SWIGLU,
    ) -> LayerWeights:
        """One rank's shards drawn at random, as leaves (requiring grad when `trainable`): what
        the cost-model profiler and validator measure with (a frozen layer: trainable False)."""
        g = torch.Generator().manual_seed(seed)
        kw = {"dtype": dtype, "device": device}
        H = shape.hidden
        qkv = random_shard(shape.qkv_rows(P), H, g, **kw)
        out = random_shard(shape.heads // P * shape.head_dim, H, g, **kw)
        weights = cls(
            attn_norm=torch.ones(H, **kw),
            attention=AttentionWeights(qkv, out, shape),
            mlp_norm=torch.ones(H, **kw),
            mlp=mlp_kind.random_weights(shape, P, g, **kw),
            mlp_kind=mlp_kind,
        )
        for t in weights.tensors():
            t.requires_grad_(trainable)
        return weights

    def tensors(self) -> list[Tensor]:
        """Every weight tensor the step reads (norms, attention, the MLP's)."""
        mlp = [t for t in self.mlp if isinstance(t, Tensor)]
        return [self.attn_norm, self.attention.qkv, self.attention.out, self.mlp_norm, *mlp]


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _mlp_half(
    h: Tensor,
    w: LayerWeights,
    group: CommGroup,
    strategy: Strategy,
    recomputed: bool,
    split: GroupSplit | None = None,
) -> Tensor:
    x = _rms_norm(h, w.mlp_norm, w.norm_eps)
    mlp = w.mlp if split is None else regroup_mlp(w.mlp, split)
    return strategy.mlp(x, mlp, group, recomputed=recomputed, kind=w.mlp_kind)


def _layer(
    x: Tensor,
    w: LayerWeights,
    layout: ZigzagLayout,
    group: CommGroup,
    strategy: Strategy,
    recomputed: bool,
    recompute_mlp: bool,
    split: GroupSplit | None = None,
) -> Tensor:
    xn = _rms_norm(x, w.attn_norm, w.norm_eps)
    attention = w.attention if split is None else regroup_attention(w.attention, split)
    h = x + strategy.attention(xn, attention, layout, group, recomputed=recomputed)
    del xn, attention  # a frozen layer's linears keep no input: do not hold it through the MLP
    if recompute_mlp:
        return h + checkpoint(_mlp_half, h, w, group, strategy, True, split,
                              use_reentrant=False)  # fmt: skip
    return h + _mlp_half(h, w, group, strategy, recomputed, split)


def decoder_layer_step(
    x: Tensor,
    weights: LayerWeights,
    layout: ZigzagLayout,
    group: CommGroup,
    strategy: Strategy,
    recompute: str = "none",
    split: GroupSplit | None = None,
) -> Tensor:
    """x (T/P, H) local tokens in `layout` -> (T/P, H): h = x + attention(norm(x)), then
    h + mlp(norm(h)), run by `strategy` on `group`.

    recompute: "none"; "selective" (the MLP half is recomputed in backward); "full" (the whole
    layer is recomputed from x), with torch's non-reentrant checkpointing. The caller checks
    that the strategy supports the layer's shape on this group (`Strategy.check`).
    `split`: the micro-batch runs on sub-groups (`parallel_lib.group_size`): `group` is this
    rank's sub-group, `layout` its sequences', and the weights (1/P shards of the whole sp group)
    are gathered into 1/g shards inside the step, so a recomputation gathers them again."""
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"unknown recompute mode {recompute!r}; choose from {RECOMPUTE_MODES}")
    if split is not None and split.gather.size == 1:
        split = None  # g = P: the shards are the sub-group's already
    if split is not None and weights.mlp_kind.name != "swiglu":
        raise ValueError(
            f"group size {split.size} < sp={split.sp} needs the dense SwiGLU MLP; a "
            f"{weights.mlp_kind.name} layer runs on the whole switchable group"
        )
    if recompute == "full":
        return checkpoint(_layer, x, weights, layout, group, strategy, True, False, split,
                          use_reentrant=False)  # fmt: skip
    return _layer(x, weights, layout, group, strategy, False, recompute == "selective", split)
