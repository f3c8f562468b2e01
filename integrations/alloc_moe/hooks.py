"""Router hooks (`parallel_lib.routing.RouterHook`) of Alloc-MoE and its baselines.

Every hook here ranks each real token's experts by router probability (descending; equal
probabilities go to the lower expert index), keeps a prefix of that ranking whose length the
method decides, and weights each kept pair by its probability, divided by the sum over the
token's kept experts when renormalising (default: as the layer's own routing does). Padding is
never routed; the pairs are a deterministic function of the request and the weights a
differentiable function of `request.probs`. When a hook keeps each token's top `request.top_k`
its routing equals the layer's default `top_k_routing` bit for bit.

- `LayerTopK`: top-K_l per layer (Alloc-L; the uniform reduced top-k when K_l is the same).
- `AllocT`: each layer's budget of T * K_l pairs shared among its T tokens by routing score.
- `TopP`, `NAEESkip`: the dynamic baselines; `BudgetCap` holds any of these to a budget.
- `ProbabilityProbe`: records router probabilities for calibration (`calibrate`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from parallel_lib.routing import RouterRequest, Routing, top_k_routing

__all__ = [
    "AllocT",
    "BudgetCap",
    "LayerTopK",
    "NAEESkip",
    "PerLayer",
    "ProbabilityProbe",
    "RankedRouter",
    "TopP",
]


class PerLayer:
    """A value per MoE layer, by decoder-layer index (`RouterRequest.layer`): one number for
    every layer, a mapping {layer: value}, or a sequence with `layers` (its layers' indices,
    e.g. `allocate_layers(S, B)` with the profile's `layers`)."""

    def __init__(self, values, layers: Sequence[int] | None = None, what: str = "k") -> None:
        self.what = what
        if isinstance(values, Mapping):
            self.values = {int(k): v for k, v in values.items()}
        elif isinstance(values, Sequence) and not isinstance(values, str):
            if layers is None or len(layers) != len(values):
                raise ValueError(
                    f"a list of {what} per MoE layer needs layers= (their decoder-layer indices, "
                    f"one per value), got {len(values)} values and layers={layers!r}"
                )
            self.values = dict(zip((int(i) for i in layers), values, strict=True))
        else:
            self.values = None  # one value for every layer
        self.default = None if self.values is not None else values

    def all(self) -> list:
        """Every value given (the single one, or one per layer)."""
        return [self.default] if self.values is None else list(self.values.values())

    def __getitem__(self, layer: int):
        if self.values is None:
            return self.default
        if layer not in self.values:
            raise ValueError(
                f"no {self.what} for MoE layer {layer}; given for layers {sorted(self.values)}"
            )
        return self.values[layer]


def _check_ints(values: PerLayer, lowest: int, what: str) -> None:
    for value in values.all():
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise ValueError(f"{what} must be an integer >= {lowest}, got {value!r}")


def _group_top(scores: Tensor, candidates: Tensor, group: Tensor, slots: Tensor) -> Tensor:
    """(n, W) bool: per group g of tokens (`group` (n,) int64), its `slots[g]` candidates of
    highest score; ties go to the lower token index, then the lower rank (which, among equal
    probabilities, is the lower expert index). Non-candidates are never chosen."""
    n, W = scores.shape
    flat = torch.where(candidates, scores, float("-inf")).reshape(-1)  # token-major
    order = torch.sort(flat, descending=True, stable=True).indices
    owner = group.repeat_interleave(W)  # (n W,) group of each flat candidate
    order = order[torch.sort(owner[order], stable=True).indices]  # by group, then by score
    owner = owner[order]
    size = torch.bincount(owner, minlength=len(slots))
    first = torch.cumsum(size, 0) - size
    place = torch.arange(len(order), device=scores.device) - first[owner]  # rank inside group
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[order] = place < slots[owner]
    return chosen.view(n, W) & candidates


class RankedRouter(ABC):
    """The base of the hooks here: subclasses say how many ranked experts to look at
    (`width`) and which to keep (`select`, a prefix of each token's ranking)."""

    def __init__(self, renormalize: bool | None = None) -> None:
        self.renormalize = renormalize
        """Renormalise the kept weights per token (None: as the layer's routing does)."""

    def width(self, request: RouterRequest) -> int:
        """How many of each token's ranked experts `select` chooses among."""
        return request.top_k

    @abstractmethod
    def select(self, request: RouterRequest, tokens: Tensor, ranked: Tensor) -> Tensor:
        """(n, W) bool: which of the n real tokens' (local indices `tokens`) W ranked experts,
        of probabilities `ranked` (n, W) detached and descending, are kept."""

    def __call__(self, request: RouterRequest) -> Routing:
        tokens = request.real.nonzero().squeeze(1)  # (n,) local indices of real tokens
        probs = request.probs.index_select(0, tokens)  # (n, E)
        W = self.width(request)
        if not 1 <= W <= probs.shape[1]:
            raise ValueError(
                f"{type(self).__name__} looks at {W} experts per token in layer "
                f"{request.layer}, which has {probs.shape[1]}"
            )
        values, experts = torch.sort(probs, dim=-1, descending=True, stable=True)
        values, experts = values[:, :W], experts[:, :W]  # (n, W) ranked
        keep = self.select(request, tokens, values.detach())
        renormalize = request.renormalize if self.renormalize is None else self.renormalize
        if renormalize:
            # the sum over a contiguous (n, W) tensor, as top_k_routing sums its top-k
            total = (values * keep).sum(-1, keepdim=True)
            values = values / torch.where(total > 0, total, torch.ones_like(total))
        return Routing(tokens[:, None].expand_as(keep)[keep], experts[keep], values[keep])


class LayerTopK(RankedRouter):
    """Each real token of layer l keeps its top `k_per_layer[l]` experts: Alloc-L alone
    (k from `allocate_layers`), or the uniform reduced top-k (one k everywhere)."""

    def __init__(self, k_per_layer, layers=None, renormalize: bool | None = None) -> None:
        super().__init__(renormalize)
        self.k = PerLayer(k_per_layer, layers, "k")
        _check_ints(self.k, 1, "LayerTopK: every k")

    def width(self, request: RouterRequest) -> int:
        return self.k[request.layer]

    def select(self, request, tokens, ranked):
        return torch.ones_like(ranked, dtype=torch.bool)


class AllocT(RankedRouter):
    """Alloc-T: layer l spends `T * K_l` activations on its T real tokens. Every token keeps its
    top `k_base`; the other candidates, each token's experts ranked k_base+1..W with W the
    layer's original top_k (or `max_k`), compete by routing probability for the remaining
    `(K_l - k_base) * T` slots (ties: lower local token index, then lower expert index). So the
    total is exactly T * K_l, no token exceeds the original k, tokens with flatter routing get
    more experts, and T = 1 (decoding) is top-K_l.

    `scope="batch"` pools the micro-batch (the paper); `"sequence"` gives each sequence its own
    `n_s * K_l`, so a sequence's routing does not depend on what it is packed with.
    Under sequence parallelism a rank sees only its T/P tokens, so the pool and the budget are
    per rank (T_local * K_l): the total over ranks is still exactly T * K_l, but the choice is
    not the one a single rank holding all T tokens would make."""

    def __init__(
        self,
        k_per_layer,
        k_base: int = 1,
        *,
        layers=None,
        max_k: int | None = None,
        scope: str = "batch",
        renormalize: bool | None = None,
    ) -> None:
        super().__init__(renormalize)
        self.k = PerLayer(k_per_layer, layers, "k")
        _check_ints(self.k, 1, "AllocT: every k")
        _check_ints(PerLayer(k_base), 0, "AllocT: k_base")
        least = min(self.k.all())
        if k_base > least:
            raise ValueError(f"AllocT: k_base {k_base} exceeds the least layer budget k={least}")
        if max_k is not None:
            _check_ints(PerLayer(max_k), 1, "AllocT: max_k")
        if scope not in ("batch", "sequence"):
            raise ValueError(f"AllocT: scope must be batch or sequence, got {scope!r}")
        self.k_base, self.max_k, self.scope = k_base, max_k, scope

    def width(self, request: RouterRequest) -> int:
        W = self.max_k or request.top_k
        if self.k[request.layer] > W:
            raise ValueError(
                f"AllocT: layer {request.layer}'s k={self.k[request.layer]} exceeds the {W} "
                "candidates per token (the layer's top_k, or max_k)"
            )
        return W

    def select(self, request, tokens, ranked):
        rank = torch.arange(ranked.shape[1], device=ranked.device)
        base = (rank < self.k_base).expand_as(ranked)
        if self.scope == "sequence":
            group = request.seq_index.index_select(0, tokens)
            tokens_per_group = torch.bincount(group, minlength=len(request.seq_lens))
        else:
            group = torch.zeros_like(tokens)
            tokens_per_group = torch.tensor([len(tokens)], device=tokens.device)
        slots = tokens_per_group * (self.k[request.layer] - self.k_base)
        return base | _group_top(ranked, ~base, group, slots)


class TopP(RankedRouter):
    """Top-p dynamic routing ("Harder tasks need more experts"): each token adds experts in
    order of probability until their cumulative probability reaches p (at least 1, at most
    `max_k`, None: every expert). p = 1 keeps all `max_k` (float sums may reach 1 early), so
    `TopP(1.0, max_k=top_k)` is the layer's own routing. p may be given per layer."""

    def __init__(self, p, max_k: int | None = None, *, layers=None, renormalize=None) -> None:
        super().__init__(renormalize)
        self.p = PerLayer(p, layers, "p")
        for value in self.p.all():
            if not (isinstance(value, int | float) and 0 < value <= 1):
                raise ValueError(f"TopP: p must be in (0, 1], got {value!r}")
        if max_k is not None:
            _check_ints(PerLayer(max_k), 1, "TopP: max_k")
        self.max_k = max_k

    def width(self, request: RouterRequest) -> int:
        E = request.probs.shape[1]
        return E if self.max_k is None else min(self.max_k, E)

    def select(self, request, tokens, ranked):
        n, W = ranked.shape
        p = self.p[request.layer]
        if p >= 1:
            count = torch.full((n,), W, device=ranked.device)
        else:  # experts needed to reach p: 1 + how many partial sums before the last fall short
            count = 1 + (ranked.cumsum(-1)[:, :-1] < p).sum(-1)
        return torch.arange(W, device=ranked.device) < count[:, None]


class NAEESkip(RankedRouter):
    """NAEE-style dynamic skipping: each token keeps its first expert and drops every later one
    of its top_k whose probability is below beta times the first's (top-2: the second expert
    is skipped when p_2 / p_1 < beta). beta = 0 is the layer's own routing, beta above 1 keeps
    the first expert alone; beta per layer comes from `calibrate_naee_beta`."""

    def __init__(self, beta_per_layer, *, layers=None, renormalize: bool | None = None) -> None:
        super().__init__(renormalize)
        self.beta = PerLayer(beta_per_layer, layers, "beta")
        for value in self.beta.all():
            if not (isinstance(value, int | float) and value >= 0):
                raise ValueError(f"NAEESkip: beta must be a number >= 0, got {value!r}")

    def select(self, request, tokens, ranked):
        keep = ranked / ranked[:, :1] >= self.beta[request.layer]  # the same ratio as calibrate
        keep[:, 0] = True
        return keep


class BudgetCap(RankedRouter):
    """Holds a ranked hook (`TopP`, `NAEESkip`, ...) to a budget of `T * k_per_layer[l]` pairs
    per layer: when it keeps more, each token keeps its first `keep_first` and the rest compete
    by probability as in `AllocT` (batch scope). A calibrated method seldom needs it; it makes
    "never above the budget" a guarantee. `trimmed` counts the pairs it dropped (every call,
    recomputations included)."""

    def __init__(self, inner: RankedRouter, k_per_layer, *, layers=None, keep_first: int = 1):
        super().__init__(inner.renormalize)
        self.inner = inner
        self.k = PerLayer(k_per_layer, layers, "k")
        _check_ints(self.k, 1, "BudgetCap: every k")
        _check_ints(PerLayer(keep_first), 0, "BudgetCap: keep_first")
        if keep_first > min(self.k.all()):
            raise ValueError(f"BudgetCap: keep_first {keep_first} exceeds the least budget k")
        self.keep_first = keep_first
        self.trimmed = 0

    def width(self, request: RouterRequest) -> int:
        return self.inner.width(request)

    def select(self, request, tokens, ranked):
        keep = self.inner.select(request, tokens, ranked)
        cap = len(tokens) * self.k[request.layer]
        kept = int(keep.sum())
        if kept <= cap:
            return keep
        self.trimmed += kept - cap
        first = keep & (torch.arange(ranked.shape[1], device=ranked.device) < self.keep_first)
        slots = torch.tensor([cap - int(first.sum())], device=ranked.device)
        return first | _group_top(ranked, keep & ~first, torch.zeros_like(tokens), slots)


class ProbabilityProbe:
    """Routes with `inner` (None: the layer's top-k) and records each MoE layer's router
    probabilities of the real tokens, `probs[layer]`: a list of (n, E) float32 CPU tensors, one
    per call, for `calibrate_naee_beta` / `calibrate_top_p` and entropy statistics. Use it in
    evaluation (no backward: a recomputed layer would record twice). Under sequence
    parallelism each rank records its own tokens."""

    def __init__(self, inner: Callable[[RouterRequest], Routing] | None = None) -> None:
        self.inner = inner
        self.probs: dict[int, list[Tensor]] = {}

    def __call__(self, request: RouterRequest) -> Routing:
        real = request.probs.detach()[request.real].float().cpu()
        self.probs.setdefault(request.layer, []).append(real)
        return (self.inner or top_k_routing)(request)
