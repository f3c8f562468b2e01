"""Shared pieces for tests of the mixture-of-experts layer: whole weights, an independent float64
reference (router softmax, top-k, optional renormalisation, SwiGLU experts, shared experts, the
per-sequence balance loss and the z-loss, written from their documented formulas and not from
`parallel_lib.moe` or `parallel_lib.routing`), and this rank's expected shards of its gradients.

Whole MoE weights use the names of `paradyse.moe.moe_full_weights` (nn.Linear convention):
router (E, H), expert_gate and expert_up (E F_e, H, expert-major rows), expert_down (H, E F_e),
shared_gate, shared_up (F_s, H), shared_down (H, F_s).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from paradyse import PackedBatch, ReferenceDecoderLayer, init_full_weights
from paradyse.reference import DENSE_MLP_NAMES
from parallel_lib import LayerShape, pad_length
from parallel_lib.moe import MoeShape

SHAPE = LayerShape(hidden=32, heads=8, kv_heads=4, head_dim=8, ffn_hidden=64)
"""Attention shape of the MoE layers (ffn_hidden: the unused dense width; P = 1, 2, 4 divide it)."""

ATTENTION_NAMES = ("attn_norm", "wq", "wk", "wv", "wo")

KeepRule = Callable[[Tensor, Tensor], Tensor]
"""(seq_index (N,), position (N,)) -> (N,) int64: how many of its top-k experts a token keeps."""


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def swiglu_expert(x: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """x (N, H) -> down(silu(gate x) * up x): gate, up (F, H), down (H, F)."""
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def moe_weights(
    moe: MoeShape, g: torch.Generator, H: int = SHAPE.hidden, skew: Tensor | None = None
) -> dict[str, Tensor]:
    """Whole float64 MoE weights drawn from `g`. `skew` (H,): router row 0 is made large along
    that direction, so that every token whose input shares it picks expert 0 first."""
    E, f, s = moe.experts, moe.expert_ffn_hidden, moe.shared_ffn_hidden

    def normal(rows: int, cols: int) -> Tensor:
        return torch.randn(rows, cols, generator=g, dtype=torch.float64) / math.sqrt(cols)

    out = {
        "router": normal(E, H),
        "expert_gate": normal(E * f, H),
        "expert_up": normal(E * f, H),
        "expert_down": normal(H, E * f),
    }
    if skew is not None:
        out["router"][0] = 1.2 * skew / skew.norm()
    if s:
        out |= {"shared_gate": normal(s, H), "shared_up": normal(s, H), "shared_down": normal(H, s)}
    return out


class ReferenceMoe(nn.Module):
    """The MoE MLP on whole float64 weights, dense over experts: token t's output is
    sum_e w_te * SwiGLU_e(x_t) + SwiGLU_shared(x_t), with w_te = softmax(router x_t)_e on the kept
    experts (its top-k, fewer under a keep rule, never a banned expert), renormalised over the
    kept ones when the shape says so, 0 elsewhere."""

    def __init__(self, moe: MoeShape, full: dict[str, Tensor]) -> None:
        super().__init__()
        self.moe = moe
        names = [k for k in full if k.startswith(("router", "expert_", "shared_"))]
        self.weights = nn.ParameterDict({k: nn.Parameter(full[k].clone()) for k in names})

    def _expert(self, e: int) -> tuple[Tensor, Tensor, Tensor]:
        f = self.moe.expert_ffn_hidden
        w = self.weights
        rows = slice(e * f, (e + 1) * f)
        return w["expert_gate"][rows], w["expert_up"][rows], w["expert_down"][:, rows]

    def kept(self, probs: Tensor, keep: Tensor | None, banned: int | None) -> Tensor:
        """(N, E) bool: each token's top-k experts by probability (ties to the lower index), the
        first keep[t] of them if given, without `banned`."""
        n, E = probs.shape
        k = self.moe.top_k
        order = torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(E).expand(n, E))  # rank[t, e]: e's place for t
        limit = torch.full((n,), k) if keep is None else keep.clamp(max=k)
        mask = rank < limit[:, None]
        if banned is not None:
            mask[:, banned] = False
        return mask

    def forward(
        self, x: Tensor, keep: Tensor | None = None, banned: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One sequence's real tokens x (n, H) -> (y (n, H), aux term, z term, kept (n, E)).

        aux term = aux_coef * n * E/k * sum_e f_e P_e, f_e = pairs on e / n, P_e = mean router
        probability of e (the per-sequence Switch/GShard loss weighted by the sequence's tokens);
        z term = z_coef * sum_t logsumexp(logits_t)^2."""
        m, w = self.moe, self.weights
        n, E = x.shape[0], m.experts
        logits = x @ w["router"].T  # (n, E)
        probs = torch.softmax(logits, -1)
        mask = self.kept(probs, keep, banned)
        gates = probs * mask
        if m.renormalize:
            total = gates.sum(-1, keepdim=True)
            gates = gates / torch.where(total > 0, total, torch.ones_like(total))
        y = x.new_zeros(x.shape)
        for e in range(E):
            y = y + gates[:, e : e + 1] * swiglu_expert(x, *self._expert(e))
        if m.shared_ffn_hidden:
            y = y + swiglu_expert(x, w["shared_gate"], w["shared_up"], w["shared_down"])
        f = mask.to(x.dtype).sum(0) / n  # no gradient: pair counts
        aux = m.aux_loss_coef * n * E / m.top_k * (f * probs.mean(0)).sum()
        z = m.z_loss_coef * torch.logsumexp(logits, -1).square().sum()
        return y, aux, z, mask

    def grads(self) -> dict[str, Tensor]:
        return {k: p.grad for k, p in self.weights.items()}


class ReferenceMoeLayer(nn.Module):
    """x + attn(norm(x)) = h; h + moe(norm(h)), each sequence separately. The attention half is
    `paradyse.ReferenceDecoderLayer` with a zero dense MLP (which adds exactly 0)."""

    def __init__(self, moe: MoeShape, full: dict[str, Tensor], shape: LayerShape = SHAPE) -> None:
        super().__init__()
        H, F_ = shape.hidden, shape.ffn_hidden
        zero = {
            "w_gate": torch.zeros(F_, H),
            "w_up": torch.zeros(F_, H),
            "w_down": torch.zeros(H, F_),
        }
        zero = {k: v.to(full["wq"].dtype) for k, v in zero.items()}
        attn = {k: full[k] for k in ATTENTION_NAMES} | {"mlp_norm": full["mlp_norm"]} | zero
        self.attention = ReferenceDecoderLayer(shape, attn)
        self.mlp_norm = nn.Parameter(full["mlp_norm"].clone())
        self.moe = ReferenceMoe(moe, full)

    def forward(self, xs: list[Tensor], keeps=None, banned=None):
        """-> (outputs, summed aux terms, summed z terms, per-sequence kept masks)."""
        hs = self.attention(xs)
        outs, aux, z, masks = [], 0.0, 0.0, []
        for i, h in enumerate(hs):
            y, a, zz, mask = self.moe(rms_norm(h, self.mlp_norm), keeps and keeps[i], banned)
            outs.append(h + y)
            aux, z = aux + a, z + zz
            masks.append(mask)
        return outs, aux, z, masks

    def grads(self) -> dict[str, Tensor]:
        attn = self.attention.grads()
        return (
            {k: attn[k] for k in ATTENTION_NAMES}
            | {"mlp_norm": self.mlp_norm.grad}
            | (self.moe.grads())
        )


def expected_shards(
    whole: dict[str, Tensor], moe: MoeShape, P: int, rank: int
) -> dict[str, Tensor]:
    """Rank `rank`'s stored tensors (keys of `SwitchableDecoderLayer.shard_tensors`) of whole
    weights or gradients, cut by hand from the documented layout: experts [rE/P, (r+1)E/P) whole,
    experts_gate_up per local expert [gate rows; up rows], experts_down per local expert W_down
    transposed, shared experts and attention as the dense column/row shards."""
    E, f, s = moe.experts, moe.expert_ffn_hidden, moe.shared_ffn_hidden
    out = {}
    if "wq" in whole:
        d = SHAPE.head_dim
        hq, hk = SHAPE.heads // P * d, SHAPE.kv_heads // P * d
        q, kv = slice(rank * hq, (rank + 1) * hq), slice(rank * hk, (rank + 1) * hk)
        out["attn_norm"] = whole["attn_norm"]
        out["attn_qkv"] = torch.cat([whole["wq"][q], whole["wk"][kv], whole["wv"][kv]])
        out["attn_out"] = whole["wo"][:, q].T
        out["mlp_norm"] = whole["mlp_norm"]
    gate_up, down = [], []
    for e in range(rank * E // P, (rank + 1) * E // P):
        rows = slice(e * f, (e + 1) * f)
        gate_up += [whole["expert_gate"][rows], whole["expert_up"][rows]]
        down.append(whole["expert_down"][:, rows].T)
    out["mlp_router"] = whole["router"]
    out["mlp_experts_gate_up"] = torch.cat(gate_up)
    out["mlp_experts_down"] = torch.cat(down)
    if s:
        rows = slice(rank * s // P, (rank + 1) * s // P)
        out["mlp_shared_gate_up"] = torch.cat(
            [whole["shared_gate"][rows], whole["shared_up"][rows]]
        )
        out["mlp_shared_down"] = whole["shared_down"][:, rows].T
    return out


class MoeCase:
    """One random problem: per layer whole float64 weights (attention from `init_full_weights`,
    MoE from `moe_weights`), per-sequence inputs and output gradients. `skew`: every input shares
    one direction and router row 0 points along it, so with top_k = 1 expert 0 gets every token."""

    def __init__(
        self, moe: MoeShape, lens: list[int], seed: int = 0, layers: int = 1, skew: bool = False
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.moe, self.lens, H = moe, lens, SHAPE.hidden
        direction = torch.randn(H, generator=g, dtype=torch.float64).abs() + 0.5 if skew else None
        self.full = []
        for _ in range(layers):
            attn = init_full_weights(SHAPE, g, torch.float64)
            attn = {k: v for k, v in attn.items() if k not in DENSE_MLP_NAMES}
            self.full.append(attn | moe_weights(moe, g, H, direction))
        self.tokens = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lens]
        self.xs = [torch.randn(n, H, generator=g, dtype=torch.float64) for n in lens]
        if skew:
            self.xs = [0.3 * x + 3.0 * direction / direction.norm() * math.sqrt(H) for x in self.xs]
        self.dys = [torch.randn(n, H, generator=g, dtype=torch.float64) for n in lens]

    def batch(self, P: int, rank: int) -> PackedBatch:
        return PackedBatch.pack(self.tokens, P, rank)

    def reference(self, keeps=None, banned=None):
        """The reference stack's outputs, input gradients, per-layer weight gradients, summed
        aux and z terms and per-layer kept masks, from loss = sum(y * dy) + aux + z."""
        layers = [ReferenceMoeLayer(self.moe, full) for full in self.full]
        xs = [x.clone().requires_grad_() for x in self.xs]
        h, aux, z, masks = xs, 0.0, 0.0, []
        for layer in layers:
            h, a, zz, m = layer(h, keeps, banned)
            aux, z = aux + a, z + zz
            masks.append(m)
        loss = sum((y * dy).sum() for y, dy in zip(h, self.dys, strict=True)) + aux + z
        loss.backward()
        return {
            "out": [t.detach() for t in h],
            "dx": [x.grad for x in xs],
            "grads": [layer.grads() for layer in layers],
            "aux": float(aux.detach()),
            "z": float(z.detach()),
            "masks": masks,
        }


def to_local(batch: PackedBatch, per_sequence: list[Tensor]) -> Tensor:
    """Per-sequence tensors (n_i, ...) -> this rank's (T/P, ...) rows; padding rows are zero."""
    first = per_sequence[0]
    natural = first.new_zeros((batch.total_tokens, *first.shape[1:]))
    for start, t in zip(batch.layout.bounds, per_sequence, strict=False):
        natural[start : start + t.shape[0]] = t
    return batch.layout.shard(natural)


def padded_total(lens: list[int], P: int) -> int:
    return sum(pad_length(n, P) for n in lens)
