"""Alloc-L's sensitivity profile, and the evaluation table of every method at every budget.

Profile (SEEDS, Alloc-MoE): S[i][k-1] = calibration perplexity with MoE layer i at top-k, the
layers deeper than i at top-1 and the shallower ones at the original K (so deeper layers cannot
make up for layer i), profiled deep to shallow: L x K_orig evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from . import (
    METHODS,
    Options,
    build_hook,
    calibrate_naee_beta,
    calibrate_top_p,
    dynamic_hook,
    moe_layers_of,
)
from .evaluate import RoutingTap, forward_tokens_per_s, js_divergence, measure, spearman
from .hooks import LayerTopK, ProbabilityProbe

__all__ = ["profile_sensitivity", "evaluation_rows", "calibrated_thresholds", "NAMES"]

NAMES = {"full": "full", "uniform": "uniform", "top_p": "top-p", "naee": "NAEE",
         "alloc_l": "Alloc-L", "alloc_t": "Alloc-T", "alloc_lt": "Alloc-L+T"}  # fmt: skip


def profile_sensitivity(
    model, sequences: Sequence[np.ndarray], batch_tokens: int = 4096, log: Callable = print
) -> list[list[float]]:
    """S (L x K_orig) of `model` on the calibration `sequences` (see the module doc)."""
    moe = moe_layers_of(model)
    L, K = len(moe.layers), moe.top_k
    S = [[math.nan] * K for _ in range(L)]
    for i in reversed(range(L)):
        for k in range(1, K + 1):
            ks = [K] * i + [k] + [1] * (L - i - 1)
            hook = LayerTopK(ks, moe.layers)
            ppl = S[i][k - 1] = measure(model, sequences, hook, batch_tokens).perplexity
            log(f"  layer {moe.layers[i]} at top-{k}, deeper at top-1: perplexity {ppl:.4f}")
    return S


def calibrated_thresholds(model, sequences, budget: int, batch_tokens: int = 4096):
    """(top_p's p, NAEE's per-layer beta) that keep `budget / L` experts per token on average
    on the calibration `sequences` (their probabilities recorded under the full routing)."""
    moe = moe_layers_of(model)
    probe = ProbabilityProbe()
    measure(model, sequences, probe, batch_tokens)
    target = budget / len(moe.layers)
    p = calibrate_top_p(probe.probs, target, moe.top_k)
    beta = calibrate_naee_beta(probe.probs, moe.top_k, target)
    return p, beta


def evaluation_rows(
    model,
    sequences: Sequence[np.ndarray],
    calibration: Sequence[np.ndarray],
    sensitivity: str,
    budgets: Sequence[int],
    methods: Sequence[str] = METHODS,
    *,
    batch_tokens: int = 4096,
    speed_rows: int = 256,
    log: Callable = print,
) -> list[dict]:
    """One row per (budget, method): perplexity, activations per token counted in the layers,
    expert-load Spearman and JS divergence against the full model, the correlation of the
    experts each token kept with its routing entropy, and forward tokens/s on a prefill-like
    micro-batch (the evaluation sequences) and on `speed_rows` single-token rows, each with its
    ratio to the full routing timed interleaved with it."""
    moe = moe_layers_of(model)
    full = measure(model, sequences, None, batch_tokens)
    prefill = list(sequences)[: max(1, batch_tokens // max(len(s) for s in sequences))]
    singles = [np.asarray(s[:1]) for s in list(sequences) * (1 + speed_rows // len(sequences))]
    singles = singles[:speed_rows]
    speed = {"prefill": forward_tokens_per_s(model, prefill, None)[0],
             "decode": forward_tokens_per_s(model, singles, None)[0]}  # fmt: skip
    rows = [_row("full", moe.full_budget, full, full, math.nan, speed, speed)]
    log(_line(rows[-1]))
    for budget in budgets:
        options = Options(method="uniform", budget=budget, sensitivity=sensitivity)
        p, beta = calibrated_thresholds(model, calibration, budget, batch_tokens)
        for method in methods:
            if method == "full":
                continue
            if method in ("top_p", "naee"):  # calibrated per layer, capped to the budget
                threshold = p if method == "top_p" else beta
                hook = dynamic_hook(method, threshold, replace(options, method=method), model)
            else:
                hook = build_hook(replace(options, method=method), model)
            tap = RoutingTap(hook)
            got = measure(model, sequences, tap, batch_tokens)
            (base_prefill, prefill_tps), (base_decode, decode_tps) = (
                forward_tokens_per_s(model, prefill, hook),
                forward_tokens_per_s(model, singles, hook),
            )
            fast = {"prefill": prefill_tps, "decode": decode_tps}
            base = {"prefill": base_prefill, "decode": base_decode}
            rows.append(_row(method, budget, got, full, tap.entropy_correlation(), fast, base))
            log(_line(rows[-1]))
    return rows


def _row(method, budget, got, full, entropy_corr, speed, base_speed) -> dict:
    rhos = [spearman(got.load[i], full.load[i]) for i in full.load]
    jss = [js_divergence(got.load[i], full.load[i]) for i in full.load]
    return {
        "method": method,
        "budget": budget,
        "perplexity": got.perplexity,
        "activations_per_token": got.activations_per_token,
        "load_spearman": float(np.nanmean(rhos)),
        "load_js": float(np.mean(jss)),
        "entropy_correlation": entropy_corr,
        "prefill_tokens_per_s": speed["prefill"],
        "decode_tokens_per_s": speed["decode"],
        "prefill_speedup": speed["prefill"] / base_speed["prefill"],
        "decode_speedup": speed["decode"] / base_speed["decode"],
    }


def _line(row: dict) -> str:
    return (f"  B={row['budget']:>3} {NAMES[row['method']]:<10} ppl {row['perplexity']:.4f} "
            f"act/token {row['activations_per_token']:.2f}")  # fmt: skip
