"""The tables and the last line of benchmarks/peers.py (rank 0 prints them)."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

LOSS_TOLERANCE = 1e-4
"""How far a peer's first-step loss may be from ParaDySe's (same weights, same batch)."""
MIXES = ("default", "short", "long")


@dataclass
class PassResult:
    """One mix (or the per-length pass): per method, its median seconds per batch (None: unfit)
    and its loss on the warm-up batch; ParaDySe's plan of every batch."""

    name: str
    methods: list[str]
    lengths: list[list[int]]
    """The sequence lengths of every batch."""
    seconds: dict[str, list[float | None]] = field(default_factory=dict)
    first_loss: dict[str, float | None] = field(default_factory=dict)
    plans: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for method in self.methods:
            self.seconds.setdefault(method, [])

    def tokens_per_s(self, method: str, batches: list[int] | None = None) -> float | None:
        """Tokens of the batches it ran (of `batches`, default all) / the sum of their times."""
        chosen = range(len(self.lengths)) if batches is None else batches
        ran = [(sum(self.lengths[b]), self.seconds[method][b]) for b in chosen
               if self.seconds[method][b] is not None]  # fmt: skip
        return sum(n for n, _ in ran) / sum(s for _, s in ran) if ran else None

    def unfit(self, method: str) -> int:
        return sum(s is None for s in self.seconds[method])

    def best_peer(self, batches: list[int] | None = None) -> tuple[str | None, float | None]:
        """The fastest peer among those that fit every batch (of `batches`)."""
        chosen = range(len(self.lengths)) if batches is None else batches
        fitting = [m for m in self.methods if m != "paradyse"
                   and all(self.seconds[m][b] is not None for b in chosen)]  # fmt: skip
        if not fitting:
            return None, None
        best = max(fitting, key=lambda m: self.tokens_per_s(m, batches))
        return best, self.tokens_per_s(best, batches)

    def ratio(self, batches: list[int] | None = None) -> float:
        """ParaDySe's tokens/s over the best fitting peer's (inf where none fits)."""
        ours, (_, best) = self.tokens_per_s("paradyse", batches), self.best_peer(batches)
        if best is None:
            return float("inf")
        return (ours or 0.0) / best

    def to_dict(self) -> dict:
        found = asdict(self)
        found["tokens_per_s"] = {m: self.tokens_per_s(m) for m in self.methods}
        found["unfit"] = {m: self.unfit(m) for m in self.methods}
        return found


def loss_gaps(results: list[PassResult]) -> list[float]:
    """|peer - ParaDySe| of the first-step loss, for every peer of every mix."""
    gaps = []
    for r in results:
        ours = r.first_loss.get("paradyse")
        for method, loss in r.first_loss.items():
            if method != "paradyse" and loss is not None and ours is not None:
                gaps.append(abs(loss - ours))
    return gaps


def loss_within(results: list[PassResult]) -> bool:
    gaps = loss_gaps(results)
    return bool(gaps) and max(gaps) <= LOSS_TOLERANCE


def _describe(r: PassResult) -> str:
    every = [n for b in r.lengths for n in b]
    steps = [sum(b) for b in r.lengths]
    return (f"{r.name}: {len(r.lengths)} steps of {min(steps)}-{max(steps)} tokens, "
            f"{len(every)} sequences of {min(every)}-{max(every)} (median "
            f"{statistics.median(every):.0f})")  # fmt: skip


def _mix_table(mixes: list[PassResult]) -> list[str]:
    lines = [f"{'mix':<8} {'method':<11} {'tokens/s':>9} {'unfit':>5} {'paradyse/x':>10} "
             f"{'loss@1':>9} {'|loss-paradyse|':>15}"]  # fmt: skip
    for r in mixes:
        ours, ref = r.tokens_per_s("paradyse"), r.first_loss.get("paradyse")
        for m in r.methods:
            tps, loss = r.tokens_per_s(m), r.first_loss.get(m)
            ratio = f"{ours / tps:.2f}x" if tps and ours else "-"
            gap = f"{abs(loss - ref):.1e}" if loss is not None and ref is not None else "-"
            lines.append(f"{r.name:<8} {m:<11} {tps or 0:>9.0f} {r.unfit(m):>5} {ratio:>10} "
                         f"{'-' if loss is None else f'{loss:.6f}':>9} {gap:>15}")  # fmt: skip
    return lines


def _length_table(r: PassResult) -> list[str]:
    n = [b[0] for b in r.lengths]
    lines = [f"tokens/s by length (a step: one sequence of n tokens per rank, {len(r.lengths[0])} "
             "ranks)", f"{'method':<14}" + "".join(f"{k:>9}" for k in n)]  # fmt: skip
    for m in r.methods:
        cells = [r.tokens_per_s(m, [b]) for b in range(len(n))]
        lines.append(f"{m:<14}" + "".join(f"{c:>9.0f}" if c else f"{'unfit':>9}" for c in cells))
    ratios = [r.ratio([b]) for b in range(len(n))]
    lines.append(f"{'paradyse/best':<14}" + "".join(f"{x:>8.2f}x" for x in ratios))
    if r.plans:
        lines.append(
            "paradyse plans: " + " | ".join(f"{k}: {p}" for k, p in zip(n, r.plans, strict=False))
        )
    return lines


def format_report(results: list[PassResult], elapsed_s: float) -> list[str]:
    """The mixes, the per-mix table, the per-length table, the loss check, the time and the
    headline (last)."""
    mixes = [r for r in results if r.name in MIXES]
    lines = ["mixes (the same global batches for every method):"]
    lines += [f"  {_describe(r)}" for r in results]
    lines += _mix_table(mixes)
    for r in mixes:
        best, _ = r.best_peer()
        plans = ", ".join(sorted(set(r.plans))) if r.plans else "-"
        lines.append(f"{r.name}: best peer {best or 'none fits'}; paradyse plans: {plans}")
    lines += [line for r in results if r.name == "per-length" for line in _length_table(r)]
    gaps = loss_gaps(results)
    worst = f"{max(gaps):.1e}" if gaps else "-"
    verdict = "ok" if loss_within(results) else "FAIL"
    lines.append(f"loss check (first step, same weights, same batch): max |peer - paradyse| = "
                 f"{worst} (tolerance {LOSS_TOLERANCE:.0e}): {verdict}")  # fmt: skip
    lines.append(f"{elapsed_s:.0f} s")
    ratio = {r.name: r.ratio() for r in mixes}
    lines.append(f"paradyse/best-peer = {ratio.get('default', float('nan')):.2f}x  "
                 f"short = {ratio.get('short', float('nan')):.2f}x  "
                 f"long = {ratio.get('long', float('nan')):.2f}x")  # fmt: skip
    return lines
