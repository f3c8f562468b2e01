"""Calibration of the dynamic baselines to a budget: the per-layer NAEE beta and top-p p that
keep, on calibration router probabilities (`hooks.ProbabilityProbe`), a target average number
of experts per token. Pure functions of probability tensors.

Both count functions are monotone step functions of their threshold, so the threshold is read
off the sorted statistics: with n tokens and a target t, at most m = floor((t - 1) n) pairs
beyond each token's first may be kept, and the threshold is put just past the (m+1)-th best.
The statistics are computed by the same float32 operations the hooks use, so applied to the
calibration data the hooks keep at most t per token on average, as close to t as ties allow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["calibrate_naee_beta", "calibrate_top_p"]


def _ranked(probs: Tensor | Sequence[Tensor], width: int | None, layer: int) -> Tensor:
    """(n, W) float32 probabilities of the calibration tokens on the CPU, rows descending."""
    p = probs if isinstance(probs, Tensor) else torch.cat(list(probs))
    if p.dim() != 2 or not len(p):
        raise ValueError(f"layer {layer}: calibration probabilities must be (tokens > 0, experts)")
    ranked = torch.sort(p.detach().float().cpu(), dim=-1, descending=True, stable=True).values
    return ranked[:, : width or p.shape[1]]


def _extras(target, layer: int, tokens: int, width: int) -> int:
    """Pairs beyond each token's first that a mean of `target` per token allows."""
    t = target[layer] if isinstance(target, Mapping) else target
    if not (isinstance(t, int | float) and t >= 1):
        raise ValueError(f"layer {layer}: the target experts per token must be >= 1, got {t!r}")
    return math.floor((min(t, width) - 1) * tokens + 1e-9)


def calibrate_naee_beta(
    probs: Mapping[int, Tensor | Sequence[Tensor]],
    top_k: int,
    target: float | Mapping[int, float],
) -> dict[int, float]:
    """Per layer, the smallest beta with which `NAEESkip` keeps on average at most `target`
    experts per token (of each token's top_k) on `probs[layer]` ((n, E) router probabilities
    of real tokens, or a list of such); 0 where the whole top_k fits the target."""
    betas = {}
    for layer, p in probs.items():
        ranked = _ranked(p, top_k, layer)
        ratio = (ranked / ranked[:, :1])[:, 1:].reshape(-1)  # as NAEESkip.select
        m = _extras(target, layer, len(ranked), top_k)
        if m >= len(ratio):
            betas[layer] = 0.0
            continue
        cut = torch.sort(ratio, descending=True).values[m]  # the best pair that must go
        betas[layer] = float(torch.nextafter(cut, torch.tensor(math.inf)))
    return betas


def calibrate_top_p(
    probs: Mapping[int, Tensor | Sequence[Tensor]],
    target: float | Mapping[int, float],
    max_k: int | None = None,
) -> dict[int, float]:
    """Per layer, the largest p with which `TopP(p, max_k)` keeps on average at most `target`
    experts per token on `probs[layer]`; 1.0 where all max_k fit the target."""
    ps = {}
    for layer, p in probs.items():
        ranked = _ranked(p, max_k, layer)
        partial = ranked.cumsum(-1)[:, :-1].reshape(-1)  # as TopP.select
        m = _extras(target, layer, len(ranked), ranked.shape[1])
        if m >= len(partial):
            ps[layer] = 1.0
            continue
        cut = torch.sort(partial).values[m]  # the smallest partial sum that must stop a token
        ps[layer] = float(cut) if cut < 1 else float(torch.nextafter(cut, torch.tensor(0.0)))
    return ps
