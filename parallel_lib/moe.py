"""The mixture-of-experts MLP: a router, E routed SwiGLU experts, optional shared experts.

Storage (the unified layout): rank r of P stores experts [r E/P, (r+1) E/P) whole, as
`experts_gate_up` (E/P * 2F_e, H) = per expert [gate rows; up rows] and `experts_down`
(E/P * F_e, H) (per expert W_down transposed); the shared experts are a dense SwiGLU of width
F_s stored as the dense MLP's column/row shards (F_s/P); the router (E, H) is replicated like the
norm weights. No strategy moves an expert's weight:
- `local` (P = 1) and expert parallelism (the `zero3` and `streamed` modes: ulysses, ring, usp,
  metp): each rank routes its own tokens and sends each (token, expert) pair's row to the rank
  holding the expert with an uneven all-to-all; the outputs come back the same way and are
  combined where the token lives. No weight is gathered.
- `tensor_parallel` (tp_sp): tokens and their routing are all-gathered (one collective), each
  rank runs its experts on every token routed to them, and the partial sums are reduce-scattered,
  exactly as the dense MLP's tensor parallelism (the shared experts ride in the same sums).
The router always runs on the local tokens, so its gradient and the auxiliary losses are the same
computation under every strategy. Experts with no pair are not computed; a pair a router hook
drops costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .comm import all_gather_tokens, all_to_all_uneven, exchange_counts, reduce_scatter_tokens
from .groups import CommGroup
from .mlp import SWIGLU, Mlp
from .ops import swiglu
from .routing import (
    Routing,
    RoutingContext,
    balance_losses,
    check_routing,
    top_k_routing,
)
from .shape import LayerShape, MlpWeights, random_shard

__all__ = ["MoeShape", "MoeWeights", "MixtureOfExperts"]


@dataclass(frozen=True)
class MoeShape:
    """A mixture-of-experts MLP's dimensions and routing options."""

    experts: int
    """Routed experts E."""
    top_k: int
    """Experts kept per token by the default routing (1 <= top_k <= experts)."""
    expert_ffn_hidden: int
    """SwiGLU width F_e of one routed expert."""
    shared_ffn_hidden: int = 0
    """Total SwiGLU width F_s of the shared experts every token uses (0: none)."""
    renormalize: bool = True
    """Renormalise the kept top-k weights to sum to 1."""
    aux_loss_coef: float = 0.0
    """Coefficient of the load-balancing loss (0: off)."""
    z_loss_coef: float = 0.0
    """Coefficient of the router z-loss (0: off)."""

    def __post_init__(self) -> None:
        for name in ("experts", "top_k", "expert_ffn_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.moe.{name} must be a positive integer, got {value!r}")
        if self.top_k > self.experts:
            raise ValueError(
                f"model.moe.top_k ({self.top_k}) exceeds model.moe.experts ({self.experts}); "
                "set top_k to at most the number of experts"
            )
        if self.shared_ffn_hidden < 0:
            raise ValueError(
                f"model.moe.shared_ffn_hidden must be >= 0, got {self.shared_ffn_hidden}"
            )
        for name in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.moe.{name} must be >= 0, got {getattr(self, name)}")

    def layout_problem(self, P: int) -> str | None:
        """Why P ranks cannot hold the experts as whole-expert blocks, or None."""
        if self.experts % P:
            fits = [p for p in range(1, self.experts + 1) if self.experts % p == 0]
            return (
                f"model.moe.experts ({self.experts}) is not divisible by the group size {P}; "
                f"choose sp among {fits} or change the expert count"
            )
        if self.shared_ffn_hidden % P:
            return (
                f"the shared experts' width ({self.shared_ffn_hidden}: model.moe.shared_experts x "
                f"expert_ffn_hidden) is not divisible by the group size {P}; make it a multiple "
                f"of {P}"
            )
        return None


class MoeWeights(NamedTuple):
    """One rank's MoE shards (see the module doc) and the micro-batch's routing context."""

    router: Tensor
    experts_gate_up: Tensor
    experts_down: Tensor
    shared_gate_up: Tensor | None
    shared_down: Tensor | None
    shape: LayerShape
    context: RoutingContext | None = None

    def shared(self) -> MlpWeights | None:
        if self.shared_gate_up is None:
            return None
        return MlpWeights(self.shared_gate_up, self.shared_down, self.shape)


def _run_experts(rows: Tensor, counts: list[int], gate_up: Tensor, down: Tensor) -> Tensor:
    """rows (M, H) grouped by local expert (counts[e] rows for expert e) -> (M, H) outputs.
    An expert with no row runs no kernel."""
    f = down.shape[0] // len(counts)
    outs = []
    for e, chunk in enumerate(rows.split(counts)):
        if counts[e]:
            h = swiglu(chunk @ gate_up[2 * e * f : 2 * (e + 1) * f].t(), 1)
            outs.append(h @ down[e * f : (e + 1) * f])
    if outs:
        return torch.cat(outs)
    # No local expert has a row: return the (0, H) rows as a function of the rows and the expert
    # weights anyway, so that it requires grad on this rank exactly when it does on the ranks
    # that ran experts and the backward collectives after it run on every rank (no kernel runs).
    return rows * (gate_up[:0].sum() + down[:0].sum())


def _combine(out_rows: int, token: Tensor, y: Tensor, weight: Tensor) -> Tensor:
    """(rows, H): sum over pairs of weight * y at the pair's token."""
    out = y.new_zeros((out_rows, y.shape[1]))
    return out.index_add(0, token, y * weight.to(y.dtype)[:, None])


class MixtureOfExperts(Mlp):
    """The MoE MLP kind for one `MoeShape` (on `MoeWeights`)."""

    name = "moe"

    def __init__(self, moe: MoeShape) -> None:
        self.moe = moe

    def __repr__(self) -> str:
        return f"MixtureOfExperts({self.moe})"

    def __eq__(self, other) -> bool:
        return isinstance(other, MixtureOfExperts) and other.moe == self.moe

    def __hash__(self) -> int:
        return hash(self.moe)

    def random_weights(self, shape, P, generator, context=None, **kw) -> MoeWeights:
        m = self.moe
        e, f, s = m.experts // P, m.expert_ffn_hidden, m.shared_ffn_hidden // P
        H = shape.hidden
        shared = (random_shard(2 * s, H, generator, **kw), random_shard(s, H, generator, **kw))
        return MoeWeights(
            random_shard(m.experts, H, generator, **kw),
            random_shard(e * 2 * f, H, generator, **kw),
            random_shard(e * f, H, generator, **kw),
            *(shared if s else (None, None)),
            shape,
            context,
        )

    # ---------------------------------------------------------------- routing
    def _route(self, x: Tensor, w: MoeWeights, group: CommGroup) -> Routing:
        ctx = w.context
        if ctx is None:
            raise ValueError(
                "a MoE layer needs its micro-batch's RoutingContext (MoeWeights.context)"
            )
        m = self.moe
        logits = (x @ w.router.t()).float()  # (T/P, E)
        request = ctx.request(logits, m.top_k, m.renormalize, group)
        routing = (ctx.hook or top_k_routing)(request)
        check_routing(routing, x.shape[0], m.experts)
        aux, z = balance_losses(request, routing, group,
                                aux_coef=m.aux_loss_coef, z_coef=m.z_loss_coef)  # fmt: skip
        if ctx.recorder is not None:
            load = torch.bincount(routing.expert, minlength=m.experts)
            ctx.recorder.record(ctx.layer, load, aux, z)
        return routing

    # ---------------------------------------------------------------- modes
    def _routed_experts_and_shared(self, mode: str, x, w: MoeWeights, group, recomputed):
        """Expert parallelism for the routed experts (every mode but tensor_parallel), plus the
        shared experts as the dense SwiGLU runs in `mode`."""
        y = self._expert_parallel(x, self._route(x, w, group), w, group)
        shared = w.shared()
        if shared is None:
            return y
        return y + SWIGLU(x, shared, group, mode, recomputed=recomputed)

    def local(self, x, w: MoeWeights, group, *, recomputed):
        return self._routed_experts_and_shared("local", x, w, group, recomputed)

    def zero3(self, x, w: MoeWeights, group, *, recomputed):
        return self._routed_experts_and_shared("zero3", x, w, group, recomputed)

    def streamed(self, x, w: MoeWeights, group, *, recomputed):
        return self._routed_experts_and_shared("streamed", x, w, group, recomputed)

    def _expert_parallel(self, x: Tensor, routing: Routing, w: MoeWeights, group) -> Tensor:
        """Pairs to the ranks holding their experts and back (uneven all-to-all, P > 1)."""
        P, E = group.size, self.moe.experts
        order = torch.argsort(routing.expert, stable=True)  # by expert, hence by owner
        token, weight = routing.token[order], routing.weight[order]
        send = torch.bincount(routing.expert, minlength=E).view(P, E // P)
        recv = exchange_counts(send, group)  # (P, E/P): from rank i, per local expert
        send_rows, recv_rows = send.sum(1).tolist(), recv.sum(1).tolist()
        rows = all_to_all_uneven(x.index_select(0, token), send_rows, recv_rows, group)
        if P > 1:  # rows arrive by source rank, then expert: regroup by expert
            expert_of_row = torch.arange(E // P, device=x.device).repeat(P)
            expert_of_row = expert_of_row.repeat_interleave(recv.reshape(-1))
            by_expert = torch.argsort(expert_of_row, stable=True)
            back = torch.empty_like(by_expert)
            back[by_expert] = torch.arange(len(by_expert), device=x.device)
            rows = rows.index_select(0, by_expert)
        y = _run_experts(rows, recv.sum(0).tolist(), w.experts_gate_up, w.experts_down)
        if P > 1:
            y = all_to_all_uneven(y.index_select(0, back), recv_rows, send_rows, group)
        return _combine(x.shape[0], token, y, weight)

    def tensor_parallel(self, x, w: MoeWeights, group, *, recomputed):
        P, E = group.size, self.moe.experts
        n, H = x.shape
        routing = self._route(x, w, group)
        dense = x.new_zeros((n, E), dtype=torch.float32)
        dense = dense.index_put((routing.token, routing.expert), routing.weight)
        kept = torch.zeros((n, E), dtype=x.dtype, device=x.device)
        kept[routing.token, routing.expert] = 1
        # one gather for tokens, weights and the kept mask: (T/P, H + 2E) -> (T, H + 2E)
        gathered = all_gather_tokens(torch.cat([x, dense.to(x.dtype), kept], 1), group)
        first = group.rank * E // P  # this rank's experts: [first, first + E/P)
        xg = gathered[:, :H]
        weights_g = gathered[:, H + first : H + first + E // P]
        kept_g = gathered[:, H + E + first : H + E + first + E // P].detach() > 0
        expert, token = kept_g.t().nonzero(as_tuple=True)  # grouped by local expert
        y = _run_experts(xg.index_select(0, token), kept_g.sum(0).tolist(),
                         w.experts_gate_up, w.experts_down)  # fmt: skip
        partial = _combine(xg.shape[0], token, y, weights_g[token, expert])
        shared = w.shared()
        if shared is not None:  # the dense MLP's column/row TP on the same gathered tokens
            partial = partial + swiglu(xg @ shared.gate_up.t(), 1) @ shared.down
        return reduce_scatter_tokens(partial, group)
