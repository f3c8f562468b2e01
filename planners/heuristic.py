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

from .problem import Problem, plan_memory

__all__ = ["solve_paradyse", "uniform_costs"]


def uniform_costs(problem: Problem, j: int) -> tuple[float, float]:
    """(time, memory) of option j on every layer."""
    return (
        float(problem.time[:, j].sum()),
        float(problem.mem[:, j].sum() + problem.transient[:, j].max()),
    )


def _undominated(problem: Problem) -> list[int]:
    """Options every layer can run, by (time, memory), without the dominated ones."""
    usable = np.flatnonzero(problem.available.all(axis=0)).tolist()
    ranked = sorted(usable, key=lambda j: (*uniform_costs(problem, j), j))
    kept: list[int] = []
    for j in ranked:
        if not kept or uniform_costs(problem, j)[1] < uniform_costs(problem, kept[-1])[1]:
            kept.append(j)
    return kept


def solve_paradyse(problem: Problem) -> list[int] | None:
    """The heuristic's plan, or None when none of the plans it considers fits."""
    L, budget = problem.layers, problem.budget
    ranked = _undominated(problem)
    if not ranked:
        return None
    fastest = ranked[0]
    if uniform_costs(problem, fastest)[1] <= budget:
        return [fastest] * L

    def prefix(table, j, op=np.cumsum):  # value over layers [0, s) for s = 0..L
        return np.concatenate(([0.0], op(table[:, j])))

    def suffix(table, j, op=np.cumsum):  # value over layers [s, L) for s = 0..L
        return np.concatenate((op(table[::-1, j])[::-1], [0.0]))

    found = []  # (time, rank of the pair, split s)
    for a, i in enumerate(ranked):
        t_i, m_i = prefix(problem.time, i), prefix(problem.mem, i)
        tr_i = prefix(problem.transient, i, np.maximum.accumulate)
        for k in ranked[a + 1 :]:
            # layers [s, L) on k, for s = L..0: s = L - n after moving n layers
            t_k, m_k = suffix(problem.time, k), suffix(problem.mem, k)
            tr_k = suffix(problem.transient, k, np.maximum.accumulate)
            time = t_i + t_k
            fits = m_i + m_k + np.maximum(tr_i, tr_k) <= budget
            if fits.any():
                splits = np.flatnonzero(fits)[::-1]  # s from L down: the order layers move in
                s = int(splits[np.argmin(time[splits])])
                found.append((float(time[s]), len(found), i, k, s))
    for _, _, i, k, s in sorted(found):
        plan = [i] * s + [k] * (L - s)
        if plan_memory(problem, plan) <= budget:  # the sums of every method, in one order
            return plan
    return None
