"""Routing of a mixture-of-experts layer: the router's decision as (token, expert, weight) pairs,
the hook an integration replaces it with, and the auxiliary losses.

A routing is any set of pairs: a token may keep 0 to E experts. The default is top-k of the
softmax over experts, optionally renormalised over the kept k. Padding tokens are never routed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .comm import all_reduce_
from .groups import CommGroup

__all__ = [
    "Routing",
    "RouterRequest",
    "RouterHook",
    "RoutingContext",
    "MoeRecorder",
    "top_k_routing",
    "check_routing",
    "balance_losses",
]


@dataclass(frozen=True)
class Routing:
    """The kept (token, expert) pairs of this rank's local tokens, N of them in any order."""

    token: Tensor
    """(N,) int64 local token index (0 <= token < T/P)."""
    expert: Tensor
    """(N,) int64 expert index (0 <= expert < E); one pair per (token, expert) at most."""
    weight: Tensor
    """(N,) float32 combine weight, a differentiable function of the router's probabilities."""

    def __len__(self) -> int:
        return int(self.token.numel())


@dataclass(frozen=True)
class RouterRequest:
    """What a router hook sees for one layer and one micro-batch on this rank."""

    layer: int
    """The id the hook is keyed by: the decoder-layer index in ParaDySe models (under
    `integrations.alloc_moe.hf`, the MoE block's index, or the decoder index with
    `numbering="decoder"`)."""
    probs: Tensor
    """(T/P, E) float32 softmax of the router logits of the local tokens (differentiable)."""
    logits: Tensor
    """(T/P, E) float32 router logits."""
    top_k: int
    """The layer's configured k."""
    renormalize: bool
    """Whether the configured routing renormalises the kept weights to sum to 1."""
    real: Tensor
    """(T/P,) bool: real tokens (padding is False and must not be routed)."""
    seq_index: Tensor
    """(T/P,) int64: the micro-batch sequence each local token belongs to."""
    seq_lens: tuple[int, ...]
    """Unpadded lengths of the micro-batch's sequences (the whole batch, not this rank's)."""
    group: CommGroup | None = None
    """The sp group the layer runs on (a hook that pools over the whole micro-batch may
    communicate over it; every rank of the group calls the hook for the same layer)."""
    recording: bool = True
    """False while a recomputation in the backward calls the hook again (a stateful hook should
    count only recording calls)."""


RouterHook = Callable[[RouterRequest], Routing]
"""Replaces a layer's routing decision: must be deterministic in its inputs (a recomputed layer
calls it again and must get the same pairs) and identical in shape rules on every rank."""


def top_k_routing(request: RouterRequest, k: int | None = None) -> Routing:
    """The default decision: each real token keeps its k most probable experts (ties go to the
    lower expert index: a stable sort), weights renormalised over the kept k when the layer says
    so."""
    k = request.top_k if k is None else k
    tokens = request.real.nonzero().squeeze(1)
    probs = request.probs.index_select(0, tokens)
    # the order from a stable sort of the values alone, the weights gathered: the backward
    # keeps (n, k) indices, not the sort's (n, E)
    expert = probs.detach().sort(dim=-1, descending=True, stable=True).indices[:, :k].clone()
    weight = probs.gather(1, expert)
    if request.renormalize and k:
        weight = weight / weight.sum(-1, keepdim=True)
    return Routing(tokens.repeat_interleave(k), expert.reshape(-1), weight.reshape(-1))


def check_routing(routing: Routing, local_tokens: int, experts: int) -> None:
    """Raise ValueError, one line, for pairs a layer cannot run."""
    t, e, w = routing.token, routing.expert, routing.weight
    if not (t.dim() == e.dim() == w.dim() == 1 and len(t) == len(e) == len(w)):
        raise ValueError(
            "a router hook must return 1-D token, expert and weight tensors of one length, got "
            f"{tuple(t.shape)}, {tuple(e.shape)}, {tuple(w.shape)}"
        )
    if len(t) and (int(t.min()) < 0 or int(t.max()) >= local_tokens):
        raise ValueError(f"router hook: token index outside [0, {local_tokens})")
    if len(e) and (int(e.min()) < 0 or int(e.max()) >= experts):
        raise ValueError(f"router hook: expert index outside [0, {experts})")
    if len(t) > 1 and torch.unique(t * experts + e).numel() < len(t):
        raise ValueError(
            "router hook: a (token, expert) pair appears twice; return each pair once "
            "(sum the weights of repeats)"
        )


@dataclass
class MoeRecorder:
    """Collects, while `active` (the model's forward, not a recomputation), each MoE layer's
    auxiliary-loss terms (with their graph, for the backward) and its statistics (detached).

    `losses`: summed terms of this rank's local tokens, ready to add to the summed token loss.
    `load[layer]`: (E,) pairs per expert of this rank's tokens; `aux[layer]`, `z[layer]`: the
    layer's summed balance and z-loss terms (already times their coefficients)."""

    active: bool = False
    losses: list[Tensor] = field(default_factory=list)
    load: dict[int, Tensor] = field(default_factory=dict)
    aux: dict[int, float] = field(default_factory=dict)
    z: dict[int, float] = field(default_factory=dict)

    def clear(self) -> None:
        self.losses, self.load, self.aux, self.z = [], {}, {}, {}

    def record(self, layer: int, load: Tensor, aux: Tensor | None, z: Tensor | None) -> None:
        if not self.active:
            return
        self.load[layer] = self.load.get(layer, 0) + load.detach().double()
        for term, store in ((aux, self.aux), (z, self.z)):
            if term is not None:
                self.losses.append(term)
                store[layer] = store.get(layer, 0.0) + float(term.detach())


@dataclass(frozen=True)
class RoutingContext:
    """What a MoE layer needs besides its weights for one micro-batch (built from the batch)."""

    layer: int
    real: Tensor
    """(T/P,) bool, real local tokens."""
    seq_index: Tensor
    """(T/P,) int64 sequence of each local token."""
    seq_lens: tuple[int, ...]
    hook: RouterHook | None = None
    recorder: MoeRecorder | None = None

    def request(
        self, logits: Tensor, top_k: int, renormalize: bool, group: CommGroup | None = None
    ) -> RouterRequest:
        recording = self.recorder is None or self.recorder.active
        return RouterRequest(self.layer, torch.softmax(logits, -1), logits, top_k, renormalize,
                             self.real, self.seq_index, self.seq_lens, group,
                             recording)  # fmt: skip


def balance_losses(
    request: RouterRequest,
    routing: Routing,
    group: CommGroup,
    *,
    aux_coef: float,
    z_coef: float,
) -> tuple[Tensor | None, Tensor | None]:
    """This rank's summed terms of the load-balancing loss and the router z-loss (None when
    their coefficient is 0), to be divided by the step's loss-token count like the token loss.

    Balance (Switch/GShard form, per sequence): for sequence s of n_s real tokens,
    `aux_s = E/k * sum_e f_se * P_se` with f_se = (pairs of s on expert e) / n_s and
    P_se = mean router probability of e over s; the term is `aux_coef * n_s * aux_s`, so the
    step's value is the token-weighted mean of aux_s, whatever the packing, sp or dp. The pair
    counts of each sequence are summed over the group (one small all-reduce). z-loss: `z_coef`
    times the sum over real tokens of logsumexp(logits)^2."""
    aux = z = None
    real = request.real
    if aux_coef:
        n_seq, E = len(request.seq_lens), request.probs.shape[1]
        counts = torch.zeros(n_seq, E, dtype=torch.float32, device=real.device)
        pair_seq = request.seq_index.index_select(0, routing.token)
        counts.index_put_((pair_seq, routing.expert), torch.ones_like(pair_seq, dtype=counts.dtype),
                          accumulate=True)  # fmt: skip
        all_reduce_(counts, group)
        lens = torch.tensor(request.seq_lens, dtype=torch.float32, device=real.device)
        scale = (counts / lens[:, None]).index_select(0, request.seq_index)  # (T/P, E)
        aux = aux_coef * E / request.top_k * (request.probs * scale)[real].sum()
    if z_coef:
        z = z_coef * torch.logsumexp(request.logits, -1)[real].square().sum()
    return aux, z
