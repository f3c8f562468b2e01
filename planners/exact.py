"""The optimal plan: a multiple-choice knapsack per transient cap, solved exactly by a search
pruned with linear-programming bounds.

Minimise sum_l time[l][j_l] subject to sum_l mem[l][j_l] + max_l transient[l][j_l] <= budget.

The max-transient term is handled exactly by enumerating its value: for a cap c taken from the
transients that occur, only options with transient <= c are allowed and the saved bytes must fit
in budget - c. The plan that is optimal overall is optimal for the cap equal to its own largest
transient, so the best over the caps is the optimum.

Each cap's knapsack (least sum of time, sum of mem <= capacity, one option per layer) is solved
without discretising memory. Layers with identical rows are interchangeable, so a plan is how
many of each group's layers take each option of the group's (memory, time) Pareto frontier:
- the LP relaxation (`planners.lp`) bounds every plan from below, and its greedy solution,
  rounded down and improved by single and paired changes, is a plan that fits;
- an exact search decides the counts one (group, option) at a time and keeps only Pareto states
  whose LP bound for what is undecided can beat a limit; the limit starts near the LP bound and
  widens to the best plan so far, the last search being complete.
Caps are built in order of a cheap bound (each layer's fastest option under the cap, plus the
least cost of the option a plan needs to have that largest transient) until it cannot beat a
plan found, then searched in order of their LP bounds until those cannot. Whether a plan fits
is decided by correctly rounded sums (`problem.saved_sum`), in any order the same. The result
is the true optimum, to float rounding (1e-12 relative) of the sums of time.

The search is exponential in the worst case (a knapsack is NP-hard). Once the searches have
considered MAX_CANDIDATES states, the caps still to solve fall back to a dynamic program over
memory rounded UP to 1/DP_RESOLUTION of the free bytes, whose plan surely fits, and a warning
says how far from the optimum the result may be (against the LP bounds); the paradyse
heuristic's plan is taken instead if it is faster, so exact never loses to it. Planner instances
(identical layers, or a few kinds) stay far below the limit.
"""

from __future__ import annotations

import warnings

import numpy as np

from .heuristic import solve_paradyse
from .knapsack import DP_RESOLUTION, _frontier, _Knapsack, _TooManyStates
from .problem import RELATIVE_TOLERANCE, Problem, plan_time, saved_sum

__all__ = ["solve_exact", "SEARCH_LIMITS", "MAX_CANDIDATES", "DP_RESOLUTION"]

SEARCH_LIMITS = (0.02, 0.2, 1.0)
"""Fractions of the gap between a knapsack's LP bound and the best plan so far below which
successive searches look; the last (1.0) is complete."""


MAX_CANDIDATES = 1_000_000
"""States the searches of one `choose()` may consider in all; past it, the caps still to solve
fall back to the rounded-up DP."""


class _Work:
    """States the searches of one `solve_exact` may still consider."""

    def __init__(self) -> None:
        self.left = MAX_CANDIDATES

    def spend(self, states: int) -> None:
        self.left -= states
        if self.left < 0:
            raise _TooManyStates


def solve_exact(problem: Problem) -> list[int] | None:
    """The optimal plan's option per layer, or None when no plan fits."""
    t, m, tr, budget = problem.time, problem.mem, problem.transient, problem.budget
    available = problem.available
    rows = np.arange(problem.layers)
    fastest = np.lexsort((m, t), axis=1)[:, 0]  # least time, then least memory, per layer
    if saved_sum(m[rows, fastest]) + tr[rows, fastest].max() <= budget:
        return fastest.tolist()
    # layers with identical rows are interchangeable: solve per group of them
    content = np.concatenate((t, m, np.where(available, tr, -1.0)), axis=1)
    _, first, group_of = np.unique(content, axis=0, return_index=True, return_inverse=True)
    group_of = group_of.reshape(-1)
    members = [np.flatnonzero(group_of == g) for g in range(first.size)]
    caps = np.unique(tr[available])
    counts = np.array([len(layers) for layers in members])
    cheap, lean = _cap_bounds(t[first], m[first], tr[first], available[first], caps, counts)
    knapsacks, seen, best = [], {}, (None, np.inf)  # seen: frontiers -> the least cap built
    for c in np.argsort(cheap, kind="stable").tolist():
        if cheap[c] >= best[1] * (1 - RELATIVE_TOLERANCE):
            break  # no cap left can beat a plan already found
        if lean[c] * (1 - RELATIVE_TOLERANCE) + caps[c] > budget:
            continue  # not even the leanest options fit (decided exactly by _Knapsack below)
        allowed = available[first] & (tr[first] <= caps[c])
        frontiers = tuple(
            tuple(_frontier(t[r], m[r], a)) for r, a in zip(first, allowed, strict=True)
        )
        if seen.get(frontiers, np.inf) <= caps[c]:
            continue  # the same options as a smaller cap, with less room: never better
        seen[frontiers] = caps[c]
        knapsack = _Knapsack(t[first], m[first], frontiers, members, float(caps[c]), budget)
        if knapsack.feasible:
            knapsacks.append(knapsack)
            best = min(best, knapsack.incumbent, key=lambda plan: plan[1])
    if not knapsacks:
        return None
    uncertain = []  # LP bounds of the caps the search gave up on
    work = _Work()
    for knapsack in sorted(knapsacks, key=lambda k: (k.bound, k.cap)):
        if knapsack.bound >= best[1] * (1 - RELATIVE_TOLERANCE):
            break  # every knapsack left has a bound at least as large
        # Search below a limit close to the LP bound first: optima sit near it, and a tight
        # limit prunes most states. A plan found below a limit is the best of the knapsack.
        gap = best[1] * (1 - RELATIVE_TOLERANCE) - knapsack.bound
        try:
            for fraction in SEARCH_LIMITS:
                found = knapsack.search(knapsack.bound + fraction * gap, work)
                if found is not None:
                    best = found
                    break
        except _TooManyStates:
            uncertain.append(knapsack.bound)
            found = knapsack.rounded_dp()
            if found is not None and found[1] < best[1]:
                best = found
    if uncertain:  # no longer certain: the heuristic's plan, if better, is the one to return
        heuristic = solve_paradyse(problem)
        if heuristic is not None and plan_time(problem, heuristic) < best[1]:
            best = (heuristic, plan_time(problem, heuristic))
        slack = best[1] / max(min(min(uncertain), best[1]), 1e-300) - 1
        warnings.warn(
            f"exact planner: the search passed {MAX_CANDIDATES:,} states on {len(uncertain)} "
            f"transient cap(s); their plans come from memory rounded up to 1/{DP_RESOLUTION} "
            f"of the free bytes and are at most {slack:.3%} slower than the optimum",
            RuntimeWarning,
            stacklevel=3,
        )
    return best[0]


def _cap_bounds(t, m, tr, available, caps, counts) -> tuple[np.ndarray, np.ndarray]:
    """Per cap c, cheap facts from the options with transient <= c of groups of `counts`
    identical layers (a row each): a lower bound on the time of a plan whose largest transient
    is c (each layer's fastest such option, and the least extra time of putting one layer on an
    option whose transient is c, which that plan needs), and the sum of each layer's leanest
    such option. inf where a layer has none."""
    order = np.argsort(np.where(available, tr, np.inf), axis=1, kind="stable")
    by_transient = np.take_along_axis(np.where(available, tr, np.inf), order, axis=1)
    fastest = np.minimum.accumulate(np.take_along_axis(t, order, axis=1), axis=1)
    leanest = np.minimum.accumulate(
        np.take_along_axis(np.where(available, m, np.inf), order, axis=1), axis=1
    )
    rows = np.arange(t.shape[0])[:, None]
    upto = (by_transient[:, :, None] <= caps[None, None, :]).sum(axis=1) - 1  # (rows, caps)
    none = upto < 0  # (layers, caps): no option under the cap
    fast = np.where(none, np.inf, fastest[rows, np.maximum(upto, 0)])
    lean = np.where(none, np.inf, leanest[rows, np.maximum(upto, 0)])
    cell_layer, cell_option = np.nonzero(available)
    cell_cap = np.searchsorted(caps, tr[cell_layer, cell_option])
    extra = np.full(caps.size, np.inf)
    np.minimum.at(extra, cell_cap, t[cell_layer, cell_option] - fast[cell_layer, cell_cap])
    missing = np.where(none.any(axis=0), np.inf, 0.0)
    fast_sum, lean_sum = counts @ np.where(none, 0.0, fast), counts @ np.where(none, 0.0, lean)
    return fast_sum + extra + missing, lean_sum + missing
