"""Alloc-MoE (SEEDS, seed 1): expert activations held to a budget B per token, summed over the
L MoE layers (the original model spends L * K_orig), with as little quality lost as possible.
Alloc-L gives each MoE layer its own top-K_l from a sensitivity profile by a dynamic program
(`allocate_layers`); Alloc-T shares each layer's T * K_l activations among a batch's T tokens
by routing score (`AllocT`). It replaces the routing decision through the router hook, so
dropped activations are never computed. Turn it on from the config alone:

    [integrations.alloc_moe]
    method = "alloc_lt"    # full | uniform | top_p | naee | alloc_l | alloc_t | alloc_lt
    budget = 6             # activations per token over the MoE layers (0: L * K_orig)
    sensitivity = "runs/alloc/sensitivity.json"   # Alloc-L's profile (alloc_l, alloc_lt)
    k_base = 1             # experts every token keeps under Alloc-T

The full budget reproduces the original model exactly under every method (top_p with p = 1,
naee with beta = 0). Budgets are per rank under sequence parallelism (see `AllocT`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from paradyse.integration import Integration, IntegrationError, RunContext
from parallel_lib.routing import RouterHook

from .allocate import allocate_layers, check_budget, uniform_allocation
from .calibrate import calibrate_naee_beta, calibrate_top_p
from .files import (
    MoeLayers,
    Sensitivity,
    load_naee_beta,
    load_sensitivity,
    moe_layers_of,
    save_naee_beta,
    save_sensitivity,
)
from .hf import RouterHandle, apply_router_hook, hf_moe_blocks, moe_layers_of_hf
from .hooks import AllocT, BudgetCap, LayerTopK, NAEESkip, PerLayer, ProbabilityProbe, TopP

__all__ = [
    "METHODS",
    "AllocT",
    "BudgetCap",
    "LayerTopK",
    "MoeLayers",
    "NAEESkip",
    "Options",
    "PerLayer",
    "ProbabilityProbe",
    "RouterHandle",
    "Sensitivity",
    "TopP",
    "allocate_layers",
    "apply_router_hook",
    "build_hook",
    "calibrate_naee_beta",
    "calibrate_top_p",
    "dynamic_hook",
    "hf_moe_blocks",
    "layer_allocation",
    "load_naee_beta",
    "load_sensitivity",
    "moe_layers_of",
    "moe_layers_of_hf",
    "plug_in",
    "resolved_budget",
    "save_naee_beta",
    "save_sensitivity",
    "uniform_allocation",
]

METHODS = ("full", "uniform", "top_p", "naee", "alloc_l", "alloc_t", "alloc_lt")
"""full: the original routing; uniform: one reduced top-k everywhere; top_p, naee: the dynamic
baselines; alloc_l: Alloc-L's top-K_l; alloc_t: Alloc-T on uniform layer budgets; alloc_lt: both."""


@dataclass(frozen=True)
class Options:
    """The keys of [integrations.alloc_moe]."""

    method: str = "alloc_lt"
    """full | uniform | top_p | naee | alloc_l | alloc_t | alloc_lt (`METHODS`)."""
    budget: int = 0
    """Expert activations per token summed over the MoE layers, L to L * K_orig (0: L * K_orig)."""
    k_base: int = 1
    """Experts every token keeps under Alloc-T (alloc_t, alloc_lt), at most each layer's K_l."""
    scope: str = "batch"
    """Alloc-T's pool: batch (the micro-batch's tokens, the paper) or sequence (each sequence)."""
    sensitivity: str = ""
    """Path of the sensitivity profile JSON (alloc_l, alloc_lt; `save_sensitivity`)."""
    top_p: float = 1.0
    """top_p's threshold p in (0, 1]; 1 keeps every candidate."""
    top_p_max_k: int = 0
    """Most experts a token keeps under top_p (0: the layer's top_k)."""
    naee_beta: float | str = 0.0
    """naee's beta, one for every layer, or the path of a calibrated file (`save_naee_beta`)."""
    cap: bool = True
    """Hold top_p and naee to the budget (`BudgetCap`); the other methods never exceed it."""
    renormalize: bool | str = "layer"
    """Renormalise the kept weights per token: true, false, or layer (as the model routes)."""

    def __post_init__(self) -> None:
        if isinstance(self.naee_beta, str):  # --set gives text: a number, else a path
            with contextlib.suppress(ValueError):
                object.__setattr__(self, "naee_beta", float(self.naee_beta))
        if isinstance(self.renormalize, str) and self.renormalize in ("true", "false"):
            object.__setattr__(self, "renormalize", self.renormalize == "true")
        beta = self.naee_beta
        number = isinstance(beta, int | float) and beta >= 0
        beta_ok = beta != "" if isinstance(beta, str) else number
        checks = (
            ("method", self.method in METHODS, " | ".join(METHODS)),
            ("budget", isinstance(self.budget, int) and self.budget >= 0, "an integer >= 0"),
            ("k_base", isinstance(self.k_base, int) and self.k_base >= 0, "an integer >= 0"),
            ("scope", self.scope in ("batch", "sequence"), "batch | sequence"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_p_max_k", self.top_p_max_k >= 0, "an integer >= 0"),
            ("naee_beta", beta_ok, "a number >= 0 or a file path"),
            ("renormalize", self.renormalize in (True, False, "layer"), "true | false | layer"),
        )
        for key, ok, allowed in checks:
            if not ok:
                raise ValueError(f"alloc_moe.{key} must be {allowed}, got {getattr(self, key)!r}")
        if self.method in ("alloc_l", "alloc_lt") and not self.sensitivity:
            raise ValueError(
                f"alloc_moe.method={self.method} needs alloc_moe.sensitivity, the path of a "
                "sensitivity profile (python -m integrations.alloc_moe profile writes one)"
            )


def resolved_budget(options: Options, moe: MoeLayers) -> int:
    """The budget in activations per token (0 -> L * K_orig), checked against the model."""
    L, full = len(moe.layers), moe.full_budget
    budget = options.budget or full
    if not L <= budget <= full:
        raise ValueError(
            f"alloc_moe.budget {budget} is outside [{L}, {full}]: each of the {L} MoE layers "
            f"keeps 1 to top_k={moe.top_k} experts per token (0: the full {full})"
        )
    return check_budget(budget, L)


def layer_allocation(options: Options, model) -> list[int]:
    """K_l per MoE layer (in `moe_layers_of(model).layers` order): Alloc-L's DP for alloc_l and
    alloc_lt, the uniform shares for the others. At the full budget every layer keeps K_orig
    (nothing is reduced, whatever noise in the profile favours)."""
    moe = moe_layers_of(model)
    budget = resolved_budget(options, moe)
    if options.method in ("alloc_l", "alloc_lt"):
        profile = load_sensitivity(options.sensitivity, moe)
        if budget < moe.full_budget:
            return allocate_layers(profile.S, budget)
    return uniform_allocation(budget, len(moe.layers), moe.top_k)


def build_hook(options: Options, model) -> RouterHook | None:
    """The router hook of `options` for `model` (a model or `MoeLayers`); None for full.
    ValueError, one line, for options that do not fit the model or a bad file."""
    moe = moe_layers_of(model)
    method, layers = options.method, moe.layers
    if method == "full":
        return None
    renormalize = None if options.renormalize == "layer" else options.renormalize
    ks = layer_allocation(options, moe)
    if method in ("uniform", "alloc_l"):
        return LayerTopK(ks, layers, renormalize)
    if method in ("alloc_t", "alloc_lt"):
        low = min(range(len(ks)), key=ks.__getitem__)
        if options.k_base > ks[low]:
            raise ValueError(
                f"alloc_moe.k_base {options.k_base} exceeds the {ks[low]} experts MoE layer "
                f"{layers[low]} gets at budget {resolved_budget(options, moe)}: lower k_base "
                "or raise the budget"
            )
        return AllocT(ks, options.k_base, layers=layers, scope=options.scope,
                      renormalize=renormalize)  # fmt: skip
    if method == "top_p":
        return dynamic_hook(method, options.top_p, options, moe)
    beta = options.naee_beta
    if isinstance(beta, str):
        beta = load_naee_beta(beta, moe)
    return dynamic_hook(method, beta, options, moe)


def dynamic_hook(method: str, threshold, options: Options, model) -> RouterHook:
    """top_p with p = `threshold`, or naee with beta = `threshold` (one value, or one per layer
    as `calibrate_top_p` / `calibrate_naee_beta` give), held to the budget's uniform shares
    (`BudgetCap`) when options.cap."""
    moe = moe_layers_of(model)
    renormalize = None if options.renormalize == "layer" else options.renormalize
    if method == "top_p":
        inner = TopP(threshold, options.top_p_max_k or moe.top_k, renormalize=renormalize)
    else:
        inner = NAEESkip(threshold, renormalize=renormalize)
    if not options.cap:
        return inner
    return BudgetCap(inner, layer_allocation(options, moe), layers=moe.layers)


def plug_in(options: Options, run: RunContext) -> Integration:
    try:
        hook = build_hook(options, run.model)
    except ValueError as error:
        raise IntegrationError(f"[integrations.alloc_moe]: {error}") from None
    return Integration(router_hook=hook)
