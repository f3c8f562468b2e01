"""Do two profiles make the planner choose alike? The half of `profile_stability.py` that judges
profiles by what the planner does with them rather than coefficient by coefficient.

The planner never uses a coefficient alone: it compares options' predicted times (scale x
analytic + overhead), and a machine that runs 20% faster in the second profile moves every
option alike. So for micro-batches of the adaptive_vs_static mix's shapes (each length from 64
to the longest measured, as many sequences as fit in that many tokens, at most sp), every
uniform option (a strategy, group size and recompute mode on every layer) is priced under
each profile, within the run's memory budget:

- per option, the second profile's predicted time over the first's, per length;
- per length, the option each profile picks (the fastest it predicts), and what the other
  profile's pick costs: T_A(pick of B) / T_A(pick of A) - 1, judged by A, and the same judged
  by B; the larger of the two is the length's regret.

The last line: `choices: the same option at N of M lengths; worst regret +X.X% (L tokens)`.
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
        label = f"{option.name.split('+')[0]}+{option.recompute}"
        planner = setup.planner(f"static:{label}")
        row = []
        for lens in batches:
            try:
                row.append(planner.plan(lens).predicted_s)
            except InfeasibleError:
                row.append(None)
        times[label] = row
    return times


def _pick(times: dict[str, list[float | None]], i: int) -> str:
    return min((o for o in times if times[o][i] is not None), key=lambda o: times[o][i])


def compare_choices(first: dict, second: dict, batches: list[list[int]]) -> tuple[list, list]:
    """(per option: (name, [second / first per batch]), per batch: (tokens, pick of the first,
    pick of the second, regret)) from two `option_times` tables."""
    ratios = [(o, [None if a is None or b is None else b / a
                   for a, b in zip(first[o], second[o], strict=True)])
              for o in first if o in second]  # fmt: skip
    picks = []
    for i, lens in enumerate(batches):
        a, b = _pick(first, i), _pick(second, i)
        regret = max(first[b][i] / first[a][i], second[a][i] / second[b][i]) - 1.0
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
        lines.append(f"{_label(lens):>9} {a:<22} {b:<22} {regret:>+7.1%}")
    same = sum(a == b for _, a, b, _ in picks)
    worst = max(range(len(picks)), key=lambda i: picks[i][3])
    lines.append(f"choices: the same option at {same} of {len(picks)} lengths; worst regret "
                 f"{picks[worst][3]:+.1%} ({_label(batches[worst])} tokens)")  # fmt: skip
    return lines


def _label(lens: list[int]) -> str:
    return f"{len(lens)}x{lens[0]}"
