"""ParaDySe's published heuristic (Algorithm 1), kept as the baseline the exact planner beats.

It only looks at plans made of one option on a prefix of the layers and one leaner option on the
rest:
1. price every option as a plan of its own on every layer, sort by (time, memory) and drop the
   dominated ones (slower and not leaner than another);
2. if the fastest fits, use it everywhere;
3. else, for every option i and every leaner option k, move the layers one at a time, from the
   last, from i to k, and keep every plan that fits; return the fastest kept.
Published, step 4 runs the leanest option everywhere when nothing fits, even over the budget;
here that case raises `InfeasibleError` like every method (a plan over budget is an OOM).
O(K^2 L) with prefix sums (the paper's O(P^2 L^2) re-sums every plan). Options a layer cannot
run are left out unless every layer can run them: the paper's strategies apply to all layers.
"""

from __future__ import annotations

import numpy as np

from .problem import Problem, plan_memory, plan_time

__all__ = ["solve_paradyse", "uniform_costs"]


def uniform_costs(problem: Problem, j: int) -> tuple[float, float]:
    """(time, memory) of option j on every layer."""
    plan = [j] * problem.layers
    return plan_time(problem, plan), plan_memory(problem, plan)


def _undominated(problem: Problem) -> tuple[list[int], dict[int, tuple[float, float]]]:
    """Options every layer can run, by (time, memory), without the dominated ones; and every
    such option's (time, memory) on every layer."""
    usable = np.flatnonzero(problem.available.all(axis=0)).tolist()
    costs = {j: uniform_costs(problem, j) for j in usable}
    kept: list[int] = []
    for j in sorted(usable, key=lambda j: (*costs[j], j)):
        if not kept or costs[j][1] < costs[kept[-1]][1]:
            kept.append(j)
    return kept, costs


def solve_paradyse(problem: Problem) -> list[int] | None:
    """The heuristic's plan, or None when none of the plans it considers fits."""
    L, budget = problem.layers, problem.budget
    ranked, costs = _undominated(problem)
    if not ranked:
        return None
    fastest = ranked[0]
    if costs[fastest][1] <= budget:
        return [fastest] * L

    def prefix(table, j, op=np.cumsum):  # value over layers [0, s) for s = 0..L
        return np.concatenate(([0.0], op(table[:, j])))

    def suffix(table, j, op=np.cumsum):  # value over layers [s, L) for s = 0..L
        return np.concatenate((op(table[::-1, j])[::-1], [0.0]))

    found = []  # (time, then the order the paper visits: i, k, s from L down; i, k, s)
    for a, i in enumerate(ranked):
        t_i, m_i = prefix(problem.time, i), prefix(problem.mem, i)
        tr_i = prefix(problem.transient, i, np.maximum.accumulate)
        for b, k in enumerate(ranked[a + 1 :]):
            # layers [s, L) on k, for s = L..0: s = L - n after moving n layers
            t_k, m_k = suffix(problem.time, k), suffix(problem.mem, k)
            tr_k = suffix(problem.transient, k, np.maximum.accumulate)
            time = t_i + t_k
            # prefix sums round differently from plan_memory's: keep the splits within float
            # rounding of the budget too, and let plan_memory decide below
            memory = m_i + m_k + np.maximum(tr_i, tr_k)
            for s in np.flatnonzero(memory <= budget * (1 + 1e-12) + 1e-300).tolist():
                found.append((float(time[s]), a, b, -s, i, k, s))
    for *_, i, k, s in sorted(found):
        plan = [i] * s + [k] * (L - s)
        if plan_memory(problem, plan) <= budget:  # the sums of every method, in one order
            return plan
    return None
