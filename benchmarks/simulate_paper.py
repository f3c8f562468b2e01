"""`simulate_paradyse.py --mode paper`: the ParaDySe paper's evaluation under its own definitions,
on the cost model with datasheet rates and latencies.

- Strategies as the paper defines them: Megatron TP+SP (tp_sp), Ulysses and ring (each with
  ZeRO-3), all three without recompute, and METP with its own backward (`metp+projections`:
  it keeps each block's norm, the attention output and its softmax normalisers and recomputes
  the projections as the weight shards stream round); no usp. The heuristic (`paradyse`, the
  paper's Algorithm 1 with gamma = 5%) over those four.
- The paper's models in our layer (`planners.models`: `paper-bert`, `paper-llama-70b`,
  `paper-gpt3-175b`), with GRCh38's 3-mer vocabulary.
- The data sorted short to long; every method trains until its first sequence that does not fit.
- Savings as the paper's Table 5 reads (our reading): for each static baseline, the heuristic's
  time over the sequences that baseline trained, against the baseline's.
"""

from __future__ import annotations

import dataclasses
import math

from cost_models import get_preset, logits_bytes
from cost_models.counts import layer_counts, pad_length
from cost_models.layer_dims import layer_dims, mlp_saved, saved_bytes
from paradyse.lengths import LENGTH_DISTRIBUTIONS, sample_lengths
from planners import InfeasibleError, Method, PlanningSetup, config_supports, format_bytes
from planners.breakdown import longest_with_breakdown
from planners.models import MODEL_PRESETS

SAFETY_MARGIN = 512 * 2**20  # the paper's 512 MB, read as MiB
STEPS_PER_OCTAVE = 32
PAPER_OPTIONS = {"tp_sp": "none", "ulysses": "none", "ring": "none", "metp": "projections"}
"""The paper's strategies and the recompute each runs."""
BUDGETS = {
    "A": (80 * 10**9 - SAFETY_MARGIN, "80 GB nominal less the 512 MiB margin"),
    "B": (
        int(79.2 * 2**30) - SAFETY_MARGIN,
        "79.2 GiB, what PyTorch reports usable on an A100-80GB ('total capacity' 79.14-79.25 GiB"
        " in its OOM messages), less the 512 MiB margin",
    ),
}
HEADLINE_BUDGET = "B"
"""The paper trained on real A100s: their usable memory, less its margin."""
GRCH38_VOCAB = 4**3 + 5
"""GRCh38 in 3-mers: 64 tokens plus 5 special ones (DNABERT's 3-mer vocabulary)."""
PAPER_LAYER_TERMS = {
    "none": {"input": 1, "norms": 3, "attention": 4, "mlp": 8},
    "projections": {"input": 1, "norms": 3, "attention": 1, "mlp": 0},
}
"""Saved (T/P, H) 16-bit units per layer in the paper's layer (LayerNorm, fused QKV, flash
attention, 4h GELU MLP, no dropout). Without recompute, Korthikanti et al. (2022)'s 34 sbh/t
bytes less the two dropout masks, 32 sbh/t = 16 units (the paper's Megatron code saves these):
the input; LN1's output, LN2's input and output; Q, K, V and the attention output; the GELU's
input and output (4 each). METP's own (its public code): the input, the three norm tensors and
the attention output, 5."""
LONG = 16384
"""Sequences from here on are compute-bound for every model: the strategies differ little."""
MODELS = (("paper-bert", "BERT"), ("paper-llama-70b", "LLaMA"), ("paper-gpt3-175b", "GPT"))
PAPER_SAVINGS = "paper: up to 89.29% less time (BERT, GitHubCode), 58% (GRCh38)"


def bucket(length: int, quantum: int) -> int:
    """Round up to a multiple of max(quantum, 2^floor(log2 n) / STEPS_PER_OCTAVE)."""
    step = max(quantum, 2 ** max(int(math.log2(length)) - int(math.log2(STEPS_PER_OCTAVE)), 0))
    return -(-length // step) * step


def paper_supports(option, shape, P: int) -> tuple[bool, str]:
    """The paper's strategies, each with its own recompute mode only."""
    if PAPER_OPTIONS.get(option.strategy) != option.recompute:
        return False, f"{option.name}: not one of the paper's options"
    return config_supports(option, shape, P)


def paper_setup(model: str, dataset: str, hardware, budget: float, metp: bool = True):
    spec = MODEL_PRESETS[model]
    if dataset == "grch38":
        spec = dataclasses.replace(spec, vocab=GRCH38_VOCAB)
    strategies = [s for s in PAPER_OPTIONS if metp or s != "metp"]
    return PlanningSetup(spec, hardware, sp=8, dtype="bfloat16", budget_bytes=budget,
                         strategies=strategies, recomputes=("none", "projections"),
                         supports=paper_supports)  # fmt: skip


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:6.2f}"


def breakdown_table(hardware, model: str) -> tuple[list[str], PlanningSetup, dict]:
    """Longest single sequence per strategy and recompute mode (the engine's three and METP's
    own) with the memory at that length, on both budgets, on GRCh38's vocabulary; the lines, the
    setup and the longest by (budget, option)."""
    setup = PlanningSetup(
        dataclasses.replace(MODEL_PRESETS[model], vocab=GRCH38_VOCAB), hardware, sp=8,
        dtype="bfloat16", strategies=("tp_sp", "ulysses", "ring", "usp", "metp"),
        recomputes=("none", "selective", "full", "projections"),
    )  # fmt: skip
    P, H, L = setup.sp, setup.model.hidden, setup.model.layers
    lines, found = [], {}
    for key, (budget, what) in BUDGETS.items():
        lines += [
            f"budget {key}: {format_bytes(budget)} ({what})",
            f"  {'option':<18} {'longest':>9} {'fixed':>6} {'gathers':>7} {'(layer)':>7} "
            f"{'saved':>6} {'u/layer':>7} {'transnt':>7} {'logits':>6}   GiB per rank",
        ]
        for option in setup.costs.options:
            n, b = longest_with_breakdown(setup, option, budget)
            found[key, option.name] = n
            if b is None:
                lines.append(f"  {option.name:<18} {'none':>9}")
                continue
            per_layer = b.saved / L / (pad_length(n, P) // P * H * 2)  # (T/P, H) bf16 units
            paper = " *" if PAPER_OPTIONS.get(option.strategy) == option.recompute else ""
            lines.append(
                f"  {option.name:<18} {n:>9,} {_gib(b.fixed)} {_gib(b.gathers):>7} "
                f"{_gib(b.layer_weights):>7} {_gib(b.saved)} {per_layer:>7.2f} "
                f"{_gib(b.transient)} {_gib(b.logits)}{paper}"
            )
        lines.append(
            "  * the paper's set. fixed: weights, gradients, AdamW state; gathers: the gathered "
            "vocabulary and the largest transient layer's weight buffers (layer); u/layer: saved "
            "(T/P, H) bf16 units per layer; transnt: the largest layer transient less its weights"
        )
    return lines, setup, found


def our_terms(setup: PlanningSetup, option, n: int) -> dict[str, float]:
    """Our layer's saved bytes at n tokens in the paper layer's terms, in (T/P, H) units."""
    m = layer_dims(setup.shape, option.strategy, [n], setup.sp, setup.dtype, option.inner, False)
    unit = m.tl * m.H * m.e
    norms, total = 2 * m.norm_saved, saved_bytes(m, option.recompute)
    mlp = mlp_saved(m) - m.norm_saved if option.recompute == "none" else 0
    terms = {"input": unit, "norms": norms, "attention": total - unit - norms - mlp, "mlp": mlp}
    return {k: v / unit for k, v in terms.items()}


def attention_share(setup: PlanningSetup, strategy: str, n: int) -> float:
    """Of a layer's time at n tokens (no recompute), the share its attention kernels take."""
    counts = layer_counts(setup.shape, strategy, [n], setup.sp, dtype=setup.dtype)
    seconds = sum(
        setup.costs.model.kernel_seconds(k, d, setup.dtype)
        for d, kernels in (("forward", counts.kernels_forward),
                           ("backward", counts.kernels_backward))
        for k in kernels if k.kind == "attention"
    )  # fmt: skip
    column = next(j for j, o in enumerate(setup.costs.options) if o.strategy == strategy)
    return seconds / setup.costs.tables([n]).time[0, column]


def streaming_lines(setup: PlanningSetup, found: dict) -> list[str]:
    """The project's setting (every strategy may recompute), from the breakdown table: how far
    weight streaming alone (metp against the best other strategy at the same recompute mode)
    carries."""
    lines = []
    for key in BUDGETS:
        longest = {o: found[key, o.name] for o in setup.costs.options}
        best = max(longest, key=longest.get)
        change = []
        for mode in ("none", "selective", "full"):
            metp = next(
                n for o, n in longest.items() if o.strategy == "metp" and o.recompute == mode
            )
            other = max(
                n for o, n in longest.items() if o.strategy != "metp" and o.recompute == mode
            )
            change.append(f"{mode} {metp / other - 1:+.1%}")
        lines.append(
            f"project setting, budget {key}: the longest is {best.name} at {longest[best]:,} "
            "tokens; weight streaming alone (metp against the best other strategy at the same "
            f"recompute mode): {', '.join(change)}"
        )
    return lines


def paper_layer_longest(setup: PlanningSetup, option, units: int, budget: float) -> int:
    """The longest sequence if each layer saved the paper layer's `units` (T/P, H) units instead
    of ours, everything else (fixed bytes, gathers, our transient, logits) as the cost model has
    it: a bisection over multiples of 2P (0: none fits)."""
    model, P, L, spec = setup.costs.model, setup.sp, setup.model.layers, setup.model

    def fits(n: int) -> bool:
        cost = model.layer_cost(setup.shape, option.strategy, option.recompute, [n], P,
                                dtype=setup.dtype, nodes_spanned=setup.nodes_spanned)  # fmt: skip
        tokens = pad_length(n, P)
        saved = L * units * (tokens // P) * spec.hidden * 2
        logits = logits_bytes(tokens, spec.vocab, P, setup.logits_chunk)
        return setup.static_bytes + saved + max(cost.transient_bytes, logits) <= budget

    if not fits(2 * P):
        return 0
    low, high = 2 * P, 4 * P
    while fits(high):
        low, high = high, high * 2
    while high - low > 2 * P:
        middle = (low + high) // (4 * P) * 2 * P
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def simulate_sorted(setup: PlanningSetup, method, lengths: list[int]) -> list[float]:
    """Seconds per sequence of the sorted `lengths` until the first that does not fit."""
    planner = setup.planner(method)  # hysteresis: the paper's gamma = 5%
    times = []
    for n in lengths:
        try:
            times.append(planner.plan([bucket(n, 2 * setup.sp)]).predicted_s)
        except InfeasibleError:
            break
    return times


def time_table(hardware, model: str, label: str, dataset: str, lengths: list[int]) -> list[str]:
    """Rows per method over the sorted data and the heuristic's savings against the statics."""
    budget = BUDGETS[HEADLINE_BUDGET][0]
    setup = paper_setup(model, dataset, hardware, budget)
    statics = [Method("static", f"{s}+{r}") for s, r in PAPER_OPTIONS.items()]
    runs = {str(m): simulate_sorted(setup, m, lengths) for m in [Method("paradyse"), *statics]}
    ours = runs["paradyse"]
    lines = [
        f"{label}/{dataset}: {len(lengths)} sequences sorted short to long, budget "
        f"{HEADLINE_BUDGET}",
        f"  {'method':<24} {'trained':>7} {'longest':>9} {'hours':>8} {'paradyse saves':>15}",
    ]
    savings = {}
    for name, times in runs.items():
        k = min(len(times), len(ours))
        saved = 1 - sum(ours[:k]) / sum(times[:k]) if k and sum(times[:k]) > 0 else 0.0
        if name != "paradyse":
            savings[name] = saved
        longest = lengths[len(times) - 1] if times else 0
        lines.append(
            f"  {name:<24} {len(times):>7} {longest:>9,} {sum(times) / 3600:>8.3f} "
            f"{'' if name == 'paradyse' else f'{saved:.1%}':>15}"
        )
    worst, best = max(savings, key=savings.get), min(savings, key=savings.get)
    each = [(1 - p / t, n) for p, t, n in zip(ours, runs[worst], lengths, strict=False)]
    most, at = max(each)
    k = len(each)
    long = [i for i in range(k) if lengths[i] >= LONG]
    share = sum(ours[i] for i in long) / sum(ours[:k]) if k else 0.0
    lines += [
        f"  Table-5 style: paradyse saves {savings[worst]:.1%} against the worst static "
        f"({worst}), {savings[best]:.1%} against the best ({best})",
        f"  per sequence: up to {most:.1%} against {worst} (at {at:,} tokens); sequences of "
        f"{LONG:,}+ tokens are {len(long) / max(k, 1):.0%} of those and {share:.0%} of the "
        "heuristic's time",
    ]
    if dataset == "grch38":  # the paper's Ulysses attends non-causally (the SEEDS digest)
        n = lengths[len(runs["static:ulysses+none"]) // 2]
        x = attention_share(setup, "ulysses", n)
        lines.append(
            f"  the paper's Ulysses runs non-causal attention, twice the work: at {n:,} tokens "
            f"attention is {x:.0%} of ulysses's layer time here, so that alone would save "
            f"{x / (1 + x):.0%} against it"
        )
    return lines


def headline(hardware, dataset: str = "grch38") -> tuple[int, int]:
    """GPT: the heuristic's longest single sequence with and without METP (budget B)."""
    budget = BUDGETS[HEADLINE_BUDGET][0]
    return tuple(
        paper_setup("paper-gpt3-175b", dataset, hardware, budget, metp).planner(
            "paradyse").longest_fitting()
        for metp in (True, False)
    )  # fmt: skip


def run(hardware_name: str, sequences: int, seed: int) -> list[str]:
    """Every paper-mode table, then the last line."""
    hardware = get_preset(hardware_name)
    us = [x * 1e6 for x in (hardware.launch_latency, hardware.collective_latency,
                            hardware.intra_node.latency)]  # fmt: skip
    out = [
        "== paper mode: the ParaDySe paper's evaluation under its own definitions",
        f"8 x {hardware.name}, bf16, datasheet rates; a kernel call >= {us[0]:g} us, a collective "
        f"{us[1]:g} us + {us[2]:g} us per NVLink hop (sources: cost_models.hardware); one "
        "sequence per step",
        "strategies: tp_sp, ulysses, ring without recompute, metp+projections (METP's own "
        "backward); the heuristic `paradyse` over those four; no usp",
        "",
        "-- longest single sequence: GPT-3-175B shape (8 of 96 layers) on GRCh38 (3-mer "
        f"vocabulary, {GRCH38_VOCAB})",
    ]
    lines, setup, found = breakdown_table(hardware, "paper-gpt3-175b")
    out += lines
    out += streaming_lines(setup, found)
    paper_set = [o for o in setup.costs.options if PAPER_OPTIONS.get(o.strategy) == o.recompute]
    out.append("saved units per layer, ours against the paper layer's (input + norms + "
               "attention + MLP), at each option's budget-A longest:")  # fmt: skip
    for option in paper_set:
        ours = our_terms(setup, option, found["A", option.name])
        paper = PAPER_LAYER_TERMS[option.recompute]
        out.append(
            f"  {option.name:<18} ours {sum(ours.values()):5.2f} = "
            + " + ".join(f"{v:.2f}" for v in ours.values())
            + f"; the paper's {sum(paper.values())} = "
            + " + ".join(map(str, paper.values()))
        )
    for key in BUDGETS:
        alt = []
        for option in paper_set:
            units = sum(PAPER_LAYER_TERMS[option.recompute].values())
            n = paper_layer_longest(setup, option, units, BUDGETS[key][0])
            alt.append(f"{option.name} {n:,} (ours {found[key, option.name]:,})")
        out.append(f"  budget {key}, each layer saving the paper layer's units, all else ours: "
                   + "; ".join(alt))  # fmt: skip
    out += ["", "-- time over the sorted data, " + PAPER_SAVINGS]
    for dataset in ("githubcode", "grch38"):
        lengths = sorted(sample_lengths(dataset, sequences, seed))
        out.append(f"== {dataset}: {LENGTH_DISTRIBUTIONS[dataset].source} (the paper's Table 3 "
                   "is not in our sources)")  # fmt: skip
        for model, label in MODELS:
            out += time_table(hardware, model, label, dataset, lengths)
    code, code_without = headline(hardware, "githubcode")
    longest, without = headline(hardware)
    ratio = longest / without if without else float("nan")
    a_with = max(found["A", o.name] for o in paper_set)
    a_without = max(found["A", o.name] for o in paper_set if o.strategy != "metp")
    out += [
        "",
        f"GPT/GitHubCode (vocabulary {MODEL_PRESETS['paper-gpt3-175b'].vocab:,}), budget "
        f"{HEADLINE_BUDGET}: longest {code:,}, without METP {code_without:,} "
        f"({code / code_without - 1:+.0%}; paper: +144.16% over static)",
        f"GPT/GRCh38, the heuristic over the paper's set with and without METP: budget A "
        f"{a_with:,} / {a_without:,} = {a_with / a_without:.2f}x; budget {HEADLINE_BUDGET} on "
        "the last line",
        f"paper mode: GPT/GRCh38 longest = {longest:,} tokens, without METP = {without:,}, "
        f"ratio = {ratio:.2f}x (paper: 329,728 / 112,128 = 2.94x)",
    ]
    return out
