"""Do two profiles make the planner choose alike? The half of `profile_stability.py` that judges
profiles by what the planner does with them rather than coefficient by coefficient.

The planner never uses a coefficient alone: it compares options' predicted times (scale x
analytic + overhead), and a machine that runs 20% faster in the second profile moves every
option alike. So for micro-batches of the adaptive_vs_static mix's shapes (each power of two
from 64 tokens to the longest measured, as many sequences as fit in that many tokens, at most
sp), every uniform option (a strategy, group size and recompute mode on every layer) is priced
under each profile, within the run's memory budget:

- per option, the second profile's predicted time over the first's, per length;
- per length, the option each profile picks (the fastest it predicts), and what the other
  profile's pick costs: T_A(pick of B) / T_A(pick of A) - 1, judged by A, and the same judged
  by B; the larger of the two is the length's regret.

The last line: `choices: the same option at N of M lengths; worst regret +X.X% (KxL tokens)`.
A micro-batch that no option fits under one of the profiles is shown with `-` and left out.
A regret under a few percent means the profiles' differences do not change what the planner
gains, whatever single coefficients moved.
"""

from __future__ import annotations

import math

from cost_models import Hardware, Profile
from paradyse.planning import run_setup
from planners import InfeasibleError


def batch_shapes(sp: int, longest: int, shortest: int = 64) -> list[list[int]]:
    """One batch per power-of-two length from `shortest` to `longest`: as many sequences of
    that length as fit in `longest` tokens, at most sp."""
    lengths, n = [], shortest
    while n <= longest:
        lengths.append(n)
        n *= 2
    return [[n] * max(1, min(sp, longest // n)) for n in lengths]


def option_times(config, sp: int, hardware: Hardware, profile: Profile,
                 batches: list[list[int]]) -> dict[str, list[float | None]]:  # fmt: skip
    """Every uniform option's predicted seconds per batch under `profile` (None: it does not
    fit the budget)."""
    setup = run_setup(config, sp=sp, dp=1, hardware=hardware, profile=profile, every_option=True)
    times = {}
    for option in setup.costs.options:
        label = option.fixed_label
        planner = setup.planner(f"static:{label}")
        row = []
        for lens in batches:
            try:
                row.append(planner.plan(lens).predicted_s)
            except InfeasibleError:
                row.append(None)
        times[label] = row
    return times


def compare_choices(first: dict, second: dict, batches: list[list[int]]) -> tuple[list, list]:
    """(per option both tables price: (name, [second / first per batch]), per batch: (tokens,
    pick of the first, pick of the second, regret; None where a profile fits no option)) from
    two `option_times` tables. The picks are among the options both profiles fit (the memory
    model does not use the profile: the same options, bar an error)."""
    shared = [o for o in first if o in second]
    first, second = {o: first[o] for o in shared}, {o: second[o] for o in shared}
    ratios = [(o, [None if a is None or b is None else b / a
                   for a, b in zip(first[o], second[o], strict=True)])
              for o in shared]  # fmt: skip
    picks = []
    for i, lens in enumerate(batches):
        both = {o: (first[o][i], second[o][i]) for o in shared
                if None not in (first[o][i], second[o][i])}  # fmt: skip
        a = min(both, key=lambda o: both[o][0]) if both else None  # the first profile's pick
        b = min(both, key=lambda o: both[o][1]) if both else None
        regret = None
        if both:
            regret = max(both[b][0] / both[a][0], both[a][1] / both[b][1]) - 1.0
        picks.append((sum(lens), a, b, regret))
    return ratios, picks


def format_choices(ratios, picks, batches) -> list[str]:
    """The ratio table (an option's row: its geometric mean, then each length), the picks and
    the last line."""
    header = f"{'option':<22} {'mean':>5} " + " ".join(f"{_label(b):>7}" for b in batches)
    lines = ["", "predicted time per option, second profile / first, per micro-batch", header]
    for option, row in ratios:
        known = [r for r in row if r is not None]
        mean = math.exp(sum(map(math.log, known)) / len(known)) if known else float("nan")
        cells = " ".join("      -" if r is None else f"{r:>6.2f}x" for r in row)
        lines.append(f"{option:<22} {mean:>4.2f}x {cells}")
    lines += ["", f"{'batch':>9} {'first picks':<22} {'second picks':<22} {'regret':>7}"]
    for (_, a, b, regret), lens in zip(picks, batches, strict=True):
        shown = "-" if regret is None else f"{regret:+.1%}"
        lines.append(f"{_label(lens):>9} {a or '-':<22} {b or '-':<22} {shown:>7}")
    judged = [i for i, p in enumerate(picks) if p[3] is not None]
    same = sum(picks[i][1] == picks[i][2] for i in judged)
    text = f"choices: the same option at {same} of {len(judged)} lengths"
    if judged:
        worst = max(judged, key=lambda i: picks[i][3])
        text += f"; worst regret {picks[worst][3]:+.1%} ({_label(batches[worst])} tokens)"
    lines.append(text)
    return lines


def _label(lens: list[int]) -> str:
    return f"{len(lens)}x{lens[0]}"
