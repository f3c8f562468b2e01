"""How each transformers MoE family routes and combines its experts (transformers 4.57.3), split
into the family's own routing (`Family.route`) and the output computed from any kept pairs
(`Family.output`), so that `integrations.alloc_moe.hf` can put a router hook in between.

Every family here scores experts by `softmax(router logits)` in float32 and keeps a top-k of it
(`probs`, `top_k`); the kept pair (t, e) of hook weight w (p_e, or p_e over the sum of the
token's kept p when renormalising) enters the output as:

- Mixtral (`MixtralSparseMoeBlock`): w, always renormalised; training adds its input jitter.
- Qwen2-MoE (`Qwen2MoeSparseMoeBlock`): w, renormalised if `norm_topk_prob`; plus the shared
  expert times sigmoid(shared_expert_gate(x)).
- Qwen3-MoE (`Qwen3MoeSparseMoeBlock`), OLMoE (`OlmoeSparseMoeBlock`): w, renormalised if
  `norm_topk_prob`.
- DeepSeek-V2 (`DeepseekV2MoE`): routed_scaling_factor * w, never renormalised; plus the shared
  experts. Group-limited routing zeroes the probabilities outside the token's chosen groups.

DeepSeek-V2 in transformers 4.57.3 never renormalises: its gate reads `norm_topk_prob` and ignores
it, so the adapter does too (DeepSeek-V2(-Lite) checkpoints set it false anyway). Its
group-limited routing (`topk_method="group_limited_greedy"`) keeps, per token, the `topk_group`
groups of experts with the highest best probability and zeroes the others before the top-k: the
hook sees those masked probabilities, so any prefix of its ranking stays inside the allowed groups.

Bit-exactness at the full budget: a CPU matmul's float result for a row depends on where the row
sits in the batch, and DeepSeek-V2 sums its k slots in the order of an unsorted top-k. So the
family's own top-k (`FamilyRouting.selection`) fixes where each kept pair goes: its slot; the row
order inside each expert's matmul, (slot, token) for the Mixtral-like blocks (`torch.where` on a
(k, tokens) expert mask), the order of `argsort` (not stable) of the (tokens, k) expert ids for
DeepSeek-V2; and DeepSeek-V2's (tokens, k) tensor summed over k. With the family's pairs and
weights every tensor operation then sees the tensors the family's own forward sees, and the
results are equal bit for bit. A pair the family would not keep goes after its token's k slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parallel_lib.routing import Routing

__all__ = ["FAMILIES", "Family", "FamilyRouting", "family_of", "pair_slots"]


@dataclass(frozen=True)
class FamilyRouting:
    """A block's own routing of one call, before the hook."""

    router_logits: Tensor
    """What the block returns as its router logits (Mixtral-like blocks; None for DeepSeek-V2)."""
    logits: Tensor
    """(n, E) float32 router logits."""
    probs: Tensor
    """(n, E) float32: what the family ranks experts by (the hook's `probs`)."""
    selection: Tensor
    """(n, k) int64: the family's own top-k experts per token, in its slot order."""


def pair_slots(routing: Routing, selection: Tensor) -> Tensor:
    """(N,) int64 slot of each kept pair: its position in the family's top-k of its token, or,
    for a pair the family would not have kept, k + its order among such pairs of the token."""
    k = selection.shape[1]
    match = selection.index_select(0, routing.token) == routing.expert[:, None]  # (N, k)
    slot = match.to(torch.int64).argmax(1)
    extra = (~match.any(1)).nonzero().squeeze(1)
    if len(extra):
        tok = routing.token.index_select(0, extra)
        order = torch.sort(tok, stable=True).indices
        size = torch.bincount(tok)
        start = torch.cumsum(size, 0) - size
        rank = torch.arange(len(order), device=tok.device) - start[tok[order]]
        slot[extra[order]] = k + rank
    return slot


def expert_groups(routing: Routing, slot: Tensor, experts: int):
    """(expert, pair indices) for every expert with at least one pair, experts ascending, the
    pairs of an expert by (slot, token) (the order of `torch.where` on a (k, n) expert mask)."""
    order = torch.sort(routing.token, stable=True).indices
    order = order[torch.sort(slot[order], stable=True).indices]
    order = order[torch.sort(routing.expert[order], stable=True).indices]
    sizes = torch.bincount(routing.expert, minlength=experts).tolist()
    return [(e, idx) for e, idx in enumerate(order.split(sizes)) if len(idx)]


class Family:
    """One transformers MoE family: its block class and how the block routes and combines."""

    name: str
    module: str
    """transformers module of the block class."""
    block: str
    """Class name of the sparse MoE block."""

    def top_k(self, block: nn.Module) -> int:
        return int(block.top_k)

    def experts(self, block: nn.Module) -> int:
        return len(block.experts)

    def renormalize(self, block: nn.Module) -> bool:
        return bool(block.norm_topk_prob)

    def check(self, block: nn.Module) -> None:
        """ValueError, one line, for a configuration the adapter does not implement."""
        k, E = self.top_k(block), self.experts(block)
        if not 1 <= k <= E:
            raise ValueError(f"{self.name}: top_k={k} must be in [1, {E}] (the expert count)")

    def route(self, block: nn.Module, x: Tensor) -> FamilyRouting:
        """The family's routing of the flattened tokens x (n, H)."""
        router_logits = block.gate(x)  # (n, E)
        probs = F.softmax(router_logits, dim=1, dtype=torch.float)
        selection = torch.topk(probs.detach(), self.top_k(block), dim=-1).indices
        return FamilyRouting(router_logits, router_logits.float(), probs, selection)

    def output(self, block, hidden, x, routing: Routing, slot: Tensor, own, count):
        """The block's return value for input `hidden` (b, s, H) (x: (b s, H)) from the kept
        pairs (`slot`: `pair_slots`; `own`: the block's `FamilyRouting`); `count(rows)` is
        called once per expert matmul."""
        final = torch.zeros_like(x)  # (n, H); as the family: sum over experts ascending
        weight = routing.weight.to(x.dtype)
        for e, idx in expert_groups(routing, slot, self.experts(block)):
            tokens = routing.token.index_select(0, idx)
            out = block.experts[e](x.index_select(0, tokens)) * weight.index_select(0, idx)[:, None]
            count(len(idx))
            final.index_add_(0, tokens, out.to(x.dtype))
        final = self.beside(block, x, final)
        return final.reshape(hidden.shape), own.router_logits

    def beside(self, block: nn.Module, x: Tensor, final: Tensor) -> Tensor:
        """What the block adds besides the routed experts (shared experts)."""
        return final

    def prepare(self, block: nn.Module, hidden: Tensor) -> Tensor:
        """The block's input as its routing sees it."""
        return hidden


class Mixtral(Family):
    name, module = "Mixtral", "transformers.models.mixtral.modeling_mixtral"
    block = "MixtralSparseMoeBlock"

    def renormalize(self, block):
        return True  # Mixtral divides its top-k weights by their sum unconditionally

    def prepare(self, block, hidden):
        if block.training and block.jitter_noise > 0:  # as the family: in place, training only
            hidden *= torch.empty_like(hidden).uniform_(
                1.0 - block.jitter_noise, 1.0 + block.jitter_noise
            )
        return hidden


class Qwen2Moe(Family):
    name, module = "Qwen2-MoE", "transformers.models.qwen2_moe.modeling_qwen2_moe"
    block = "Qwen2MoeSparseMoeBlock"

    def beside(self, block, x, final):
        shared = block.shared_expert(x)
        return final + F.sigmoid(block.shared_expert_gate(x)) * shared


class Qwen3Moe(Family):
    name, module = "Qwen3-MoE", "transformers.models.qwen3_moe.modeling_qwen3_moe"
    block = "Qwen3MoeSparseMoeBlock"


class Olmoe(Family):
    name, module = "OLMoE", "transformers.models.olmoe.modeling_olmoe"
    block = "OlmoeSparseMoeBlock"


class DeepseekV2(Family):
    name, module = "DeepSeek-V2", "transformers.models.deepseek_v2.modeling_deepseek_v2"
    block = "DeepseekV2MoE"

    def top_k(self, block):
        return int(block.gate.top_k)

    def renormalize(self, block):
        return False  # transformers 4.57.3's DeepseekV2MoEGate ignores norm_topk_prob

    def check(self, block):
        super().check(block)
        gate, E = block.gate, self.experts(block)
        if gate.topk_method not in ("greedy", "group_limited_greedy"):
            raise ValueError(
                f"DeepSeek-V2: topk_method={gate.topk_method!r} is not implemented (greedy | "
                "group_limited_greedy, as transformers 4.57.3)"
            )
        if gate.topk_method == "group_limited_greedy":
            G, groups = gate.num_group, gate.topk_group
            if not (isinstance(G, int) and isinstance(groups, int) and 1 <= groups <= G):
                raise ValueError(
                    f"DeepSeek-V2: group_limited_greedy needs 1 <= topk_group <= n_group, got "
                    f"n_group={G}, topk_group={groups}"
                )
            if E % G or gate.top_k > groups * (E // G):
                raise ValueError(
                    f"DeepSeek-V2: group_limited_greedy with {E} experts in n_group={G} groups "
                    f"of which topk_group={groups} are kept cannot choose top_k={gate.top_k} "
                    "experts: n_group must divide the expert count and top_k <= topk_group * "
                    "experts / n_group"
                )

    def route(self, block, x):
        gate = block.gate
        logits = F.linear(x.type(torch.float32), gate.weight.type(torch.float32), None)
        scores = logits.softmax(dim=-1, dtype=torch.float32)  # (n, E)
        if gate.topk_method == "group_limited_greedy":
            n, G, E = x.shape[0], gate.num_group, gate.num_experts
            group_scores = scores.view(n, G, -1).max(dim=-1).values  # (n, G)
            group_idx = torch.topk(group_scores, k=gate.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)  # (n, G)
            score_mask = group_mask.unsqueeze(-1).expand(n, G, E // G).reshape(n, E)
            scores = scores.masked_fill(~score_mask.bool(), 0.0)
        selection = torch.topk(scores.detach(), k=gate.top_k, dim=-1, sorted=False)[1]
        return FamilyRouting(None, logits, scores, selection)

    def output(self, block, hidden, x, routing, slot, own, count):
        (n, H), k, E = x.shape, self.top_k(block), self.experts(block)
        width = max(k, int(slot.max()) + 1 if len(slot) else k)  # k, more if a hook keeps more
        flat = routing.token * width + slot  # (N,) place of each pair in (n, width)
        ids = torch.full((n * width,), E, dtype=torch.int64, device=x.device)  # E: dropped
        ids[flat] = routing.expert
        # as the family: the rows of each expert in the order of argsort (not stable) of the
        # (n, k) expert ids, which the matmul's float results depend on; dropped places last
        order = ids.argsort()[: len(flat)]
        sizes = torch.bincount(routing.expert, minlength=E).tolist()
        rows = x.new_zeros((n * width, H))  # dropped places stay zero and cost no matmul
        for e, places in enumerate(order.split(sizes)):
            if len(places):
                rows[places] = block.experts[e](x.index_select(0, places // width))
                count(len(places))
        scaled = routing.weight * block.gate.routed_scaling_factor  # as the family, float32
        weight = scaled.new_zeros((n, width)).index_put((routing.token, slot), scaled)
        routed = (
            rows.view(n, width, H)
            .type(weight.dtype)
            .mul_(weight.unsqueeze(dim=-1))
            .sum(dim=1)
            .type(rows.dtype)
        )  # (n, width, H) -> (n, H), summed over the slots in the family's order
        return routed.view(*hidden.shape) + block.shared_experts(hidden)


FAMILIES: tuple[Family, ...] = (Mixtral(), Qwen2Moe(), Qwen3Moe(), Olmoe(), DeepseekV2())


def family_of(module: nn.Module) -> Family | None:
    """The family whose sparse MoE block `module` is (exactly that class), or None."""
    cls = type(module)
    for family in FAMILIES:
        if cls.__name__ == family.block and cls.__module__ == family.module:
            return family
    return None
