"""The tables and ratios of `benchmarks/adaptive_vs_static.py`: tokens/s per method, the best
static, the per-batch oracle, the headline and the ceiling pass's bound."""

from __future__ import annotations

from dataclasses import dataclass, field

MiB = 1 << 20
HEADLINE = "adaptive/best-static = {:.2f}x  adaptive/oracle = {:.2f}x  unfit(best-static) = {}"


@dataclass
class MethodResult:
    method: str
    seconds: list[float | None] = field(default_factory=list)
    """Per micro-batch, the measured (or, with --predict, predicted) step seconds; None: unfit."""
    predicted: list[float | None] = field(default_factory=list)
    """Per micro-batch, the cost model's seconds of its plan (the layers); None: unfit."""
    plans: list[str] = field(default_factory=list)
    peak_bytes: int = 0
    """The largest predicted peak (static + saved + transient) of the batches it ran."""

    @property
    def unfit(self) -> int:
        return sum(s is None for s in self.seconds)

    def tokens_per_s(self, lengths: list[int], *, predicted: bool = False) -> float:
        seconds = self.predicted if predicted else self.seconds
        ran = [(n, s) for n, s in zip(lengths, seconds, strict=True) if s is not None]
        total = sum(s for _, s in ran)
        return sum(n for n, _ in ran) / total if total > 0 else 0.0

    @property
    def static(self) -> bool:
        """A static strategy on the whole sp group (a fixed group: what 'best static' and the
        oracle choose among)."""
        return self.method.startswith("static:") and not self.grouped

    @property
    def grouped(self) -> bool:
        """A static strategy on sub-groups of N ranks (static:gN:NAME)."""
        return self.method.startswith("static:g") and ":" in self.method[len("static:") :]


@dataclass
class Ceiling:
    """Every uniform option (one strategy, split and recompute mode on every layer) measured
    once per distinct length, with no memory limit: what any per-batch choice could reach."""

    lengths: list[int]
    """The distinct lengths, ascending."""
    options: list[str]
    """Option labels with their recompute mode: tp_sp+none, usp2x2+full, ..."""
    seconds: dict[str, list[float]]
    """option -> measured step seconds per distinct length."""


def uniform_label(plan: str) -> str:
    """'ring+full x4' (a static's uniform plan as printed) -> 'ring+full'; 'tp_sp x4' ->
    'tp_sp+none'."""
    label = plan.rsplit(" x", 1)[0]
    return label if "+" in label else f"{label}+none"


def ceiling_report(ceiling: Ceiling, results: list[MethodResult], lengths: list[int],
                   summary: dict, tokens: dict[int, int] | None = None) -> list[str]:  # fmt: skip
    """The per-length table and `ceiling/best-static`, both from the ceiling pass: the best
    static's time for a batch is that of the option it ran there in the main pass; the
    ceiling's is the fastest option whatever its memory, over the batches the exact planner
    ran (a bound on the headline's adaptive/best-static up to the two passes' noise, as
    layer-wise plans cost a mix of these options' per-layer times). `tokens`: a batch's tokens
    by its sequences' length (default: the length, one sequence). An option that cannot run a
    batch is left out of its column."""
    index = {n: i for i, n in enumerate(ceiling.lengths)}
    size = tokens or {n: n for n in ceiling.lengths}
    fastest = [min(t[i] for t in ceiling.seconds.values() if t[i] is not None)
               for i in range(len(ceiling.lengths))]  # fmt: skip
    best = next(r for r in results if r.method == summary["best_static"])
    exact = next(r for r in results if r.method == "exact")
    ran = [(n, uniform_label(p)) for n, p, s in zip(lengths, best.plans, best.seconds,
                                                   strict=True) if s is not None]  # fmt: skip
    static_rate = sum(size[n] for n, _ in ran) / sum(ceiling.seconds[o][index[n]] for n, o in ran)
    fit = [n for n, s in zip(lengths, exact.seconds, strict=True) if s is not None]
    bound = sum(size[n] for n in fit) / sum(fastest[index[n]] for n in fit)
    lines = ["", "ceiling: every uniform option, ms per step (median), no memory limit"]
    lines.append(f"{'option':<24} " + " ".join(f"{n:>6}" for n in ceiling.lengths))
    for option in ceiling.options:
        cells = " ".join("     -" if s is None else f"{s * 1e3:>6.0f}"
                         for s in ceiling.seconds[option])  # fmt: skip
        lines.append(f"{option:<24} {cells}")
    lines.append(f"{'fastest':<24} " + " ".join(f"{s * 1e3:>6.0f}" for s in fastest))
    lines.append(
        f"ceiling/best-static = {bound / static_rate:.2f}x  ({short_name(best.method)}, unfit "
        f"{best.unfit}; every batch the exact planner fits on its fastest option, this pass)"
    )
    return lines


# ------------------------------------------------------------------------------ report
def oracle_seconds(results: list[MethodResult]) -> list[float]:
    """Per micro-batch, the fastest static that fit it (the exact planner's time if none did)."""
    statics = [r for r in results if r.static]
    exact = next((r for r in results if r.method == "exact"), None)
    best = []
    for i in range(len(results[0].seconds)):
        times = [r.seconds[i] for r in statics if r.seconds[i] is not None]
        if times:
            best.append(min(times))
        elif exact is not None and exact.seconds[i] is not None:
            best.append(exact.seconds[i])
        else:
            best.append(None)  # nothing fits it: left out of the oracle
    return best


def summarise(results: list[MethodResult], lengths: list[int]) -> dict:
    """tokens/s of every method, the best static, the oracle and the headline ratios."""
    rates = {r.method: r.tokens_per_s(lengths) for r in results}
    predicted = {r.method: r.tokens_per_s(lengths, predicted=True) for r in results}
    statics = [r for r in results if r.static]
    best = max(statics, key=lambda r: rates[r.method]) if statics else None
    ran = [(n, s) for n, s in zip(lengths, oracle_seconds(results), strict=True) if s is not None]
    oracle = sum(n for n, _ in ran) / sum(s for _, s in ran) if ran else float("nan")
    adaptive = rates.get("exact", 0.0)
    best_rate = rates[best.method] if best else float("nan")
    return {
        "rates": rates,
        "predicted_rates": predicted,
        "unfit": {r.method: r.unfit for r in results},
        "best_static": best.method if best else None,
        "best_static_rate": best_rate,
        "oracle_rate": oracle,
        "adaptive_over_best": adaptive / best_rate if best else float("nan"),
        "predicted_adaptive_over_best": (
            predicted.get("exact", 0.0) / predicted[best.method] if best else float("nan")
        ),
        "adaptive_over_oracle": adaptive / oracle,
        "unfit_best": best.unfit if best else 0,
    }


def format_report(results, lengths, summary, *, per_batch: bool = True) -> list[str]:
    best_rate = summary["best_static_rate"]
    predicted = summary["predicted_rates"]
    best_predicted = predicted.get(summary["best_static"], float("nan"))
    lines = [f"{'method':<16} {'tokens/s':>9} {'unfit':>5} {'x best static':>13} "
             f"{'predicted x':>11} {'peak MiB':>9}"]  # fmt: skip
    for r in results:
        rate = summary["rates"][r.method]
        mark = "  <- best static" if r.method == summary["best_static"] else ""
        lines.append(
            f"{r.method:<16} {rate:>9.0f} {r.unfit:>5} {rate / best_rate:>13.2f} "
            f"{predicted[r.method] / best_predicted:>11.2f} {r.peak_bytes / MiB:>9.1f}{mark}"
        )
    oracle = summary["oracle_rate"]
    lines.append(f"{'oracle':<16} {oracle:>9.0f} {0:>5} {oracle / best_rate:>13.2f}")
    if per_batch:
        best = oracle_seconds(results)
        lines.append("")
        lines.append("per micro-batch ms (- unfit); oracle = fastest static; exact's plan")
        lines.append(f"{'tokens':>6} " + " ".join(f"{short_name(r.method):>8}" for r in results)
                     + f" {'oracle':>8}  plan(exact)")  # fmt: skip
        exact = next((r for r in results if r.method == "exact"), results[0])
        for i, n in enumerate(lengths):
            cells = " ".join(
                f"{'-':>8}" if r.seconds[i] is None else f"{r.seconds[i] * 1e3:>8.0f}"
                for r in results
            )
            oracle_ms = f"{'-':>8}" if best[i] is None else f"{best[i] * 1e3:>8.0f}"
            lines.append(f"{n:>6} {cells} {oracle_ms}  {exact.plans[i]}")
    return lines


def short_name(method: str) -> str:
    return method.removeprefix("static:")


def headline(summary: dict) -> str:
    return HEADLINE.format(
        summary["adaptive_over_best"], summary["adaptive_over_oracle"], summary["unfit_best"]
    )
