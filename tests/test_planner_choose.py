"""planners.choose(): the exact method against brute force, the paradyse heuristic against its
own definition, the static baselines, and the checks of the input."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest

from planners import InfeasibleError, choose, plan_memory, plan_time
from planners.exact import _frontier, _Knapsack, _Work
from planners.problem import as_problem


def brute_force(t, m, tr, budget):
    """(time, plan) of the fastest plan that fits, over every plan; None if none fits."""
    L, K = t.shape
    plans = np.array(list(itertools.product(range(K), repeat=L)))  # (K^L, L)
    rows = np.arange(L)
    times = t[rows, plans].sum(axis=1)
    memory = m[rows, plans].sum(axis=1) + tr[rows, plans].max(axis=1)
    # the planners' test of fitting sums exactly (math.fsum): use it where rounding could matter
    for i in np.flatnonzero(np.abs(memory - budget) <= 1e-9 * max(1.0, abs(budget))):
        memory[i] = math.fsum(m[rows, plans[i]].tolist()) + tr[rows, plans[i]].max()
    ok = np.isfinite(times) & (memory <= budget)
    if not ok.any():
        return None
    best = np.flatnonzero(ok)[np.argmin(times[ok])]
    return float(times[best]), tuple(plans[best])


def random_instance(rng, index: int):
    """Up to 6 layers x 5 options: continuous values, small integers (ties), identical rows
    (the planner's usual case) or two kinds of rows; sometimes unavailable options; a budget
    from below the leanest plan to above the fastest."""
    L, K = int(rng.integers(1, 7)), int(rng.integers(1, 6))
    kind = index % 4
    if kind == 0:
        t, m, tr = rng.random((L, K)), rng.random((L, K)), rng.random((L, K))
    elif kind == 1:
        t = rng.integers(1, 5, (L, K)).astype(float)
        m = rng.integers(0, 5, (L, K)).astype(float)
        tr = rng.integers(0, 3, (L, K)).astype(float)
    else:
        kinds = 1 if kind == 2 else 2
        rows = rng.random((kinds, 3, K))
        which = rng.integers(0, kinds, L)
        t, m, tr = (rows[which, i] for i in range(3))
    if rng.random() < 0.25:
        t = np.where(rng.random((L, K)) < 0.2, np.inf, t)
        t[np.arange(L), rng.integers(0, K, L)] = rng.random(L) + 0.5  # one option everywhere
    problem = as_problem(t, m, tr, 0.0)
    lean, fast = problem.leanest_bytes(), m.max(axis=1).sum() + tr.max()
    budget = lean + (rng.random() * 1.2 - 0.1) * (fast - lean)
    return t, m, tr, float(budget)


def test_exact_equals_brute_force_on_random_instances() -> None:
    rng = np.random.default_rng(2026)
    solved = infeasible = 0
    for index in range(600):
        t, m, tr, budget = random_instance(rng, index)
        expected = brute_force(t, m, tr, budget)
        if expected is None:
            with pytest.raises(InfeasibleError):
                choose(t, m, tr, budget)
            infeasible += 1
            continue
        plan = choose(t, m, tr, budget)
        problem = as_problem(t, m, tr, budget)
        assert plan_memory(problem, plan) <= budget, (index, plan)
        assert plan_time(problem, plan) == pytest.approx(expected[0], rel=1e-9, abs=1e-12)
        solved += 1
    assert solved > 300 and infeasible > 30  # both outcomes are exercised


def test_the_exact_search_alone_equals_brute_force() -> None:
    """The search that certifies the LP-rounded plan, run from no incumbent: the optimum of each
    transient cap's knapsack, for one group of layers and for several."""
    rng = np.random.default_rng(7)
    checked = 0
    for index in range(300):
        t, m, tr, budget = random_instance(rng, index)
        problem = as_problem(t, m, tr, budget)
        content = np.concatenate((t, m, tr), axis=1)
        _, first, group_of = np.unique(content, axis=0, return_index=True, return_inverse=True)
        members = [np.flatnonzero(group_of.reshape(-1) == g) for g in range(first.size)]
        available = problem.available
        for cap in np.unique(tr[available]):
            allowed = available[first] & (tr[first] <= cap)
            if not allowed.any(axis=1).all():
                continue
            frontiers = [_frontier(t[r], m[r], a) for r, a in zip(first, allowed, strict=True)]
            knapsack = _Knapsack(t[first], m[first], frontiers, members, float(cap), budget)
            capped = np.where(tr <= cap, t, np.inf)
            expected = brute_force(capped, m, np.full_like(tr, cap), budget)
            if not knapsack.feasible:
                assert expected is None
                continue
            found = knapsack.search(math.inf, _Work())
            assert (found is None) == (expected is None)
            if found is not None:
                assert found[1] == pytest.approx(expected[0], rel=1e-9, abs=1e-12)
                assert knapsack.bound <= found[1] * (1 + 1e-12)  # the LP bound is a bound
                # a limit just above the optimum: the bounds must not prune the path to it
                tight = knapsack.search(expected[0] * (1 + 1e-9) + 1e-12, _Work())
                assert tight is not None and tight[1] == pytest.approx(expected[0], rel=1e-9)
                assert knapsack.search(expected[0] * (1 - 1e-9), _Work()) is None
                checked += 1
    assert checked > 300


def test_exact_equals_brute_force_when_the_budget_is_a_plans_memory() -> None:
    """Budgets on the boundary: the memory of a random plan, to the last bit. The optimum may
    sit exactly there, and no order of summation may turn it away."""
    rng = np.random.default_rng(99)
    for index in range(400):
        t, m, tr, _ = random_instance(rng, index)
        t = np.where(np.isfinite(t), t, 1.0)  # every plan available, so any can set the budget
        plan = rng.integers(0, t.shape[1], t.shape[0])
        budget = plan_memory(as_problem(t, m, tr, 0.0), plan)
        expected = brute_force(t, m, tr, budget)
        assert expected is not None
        found = choose(t, m, tr, budget)
        problem = as_problem(t, m, tr, budget)
        assert plan_memory(problem, found) <= budget
        assert plan_time(problem, found) == pytest.approx(expected[0], rel=1e-9, abs=1e-12), index
        try:
            heuristic = choose(t, m, tr, budget, method="paradyse")
        except InfeasibleError:
            continue
        assert plan_time(problem, found) <= plan_time(problem, heuristic) * (1 + 1e-12)


def test_exact_fits_a_budget_equal_to_the_leanest_plan() -> None:
    t = np.array([[1.0, 2.0, 3.0]] * 4)
    m = np.array([[3.0, 2.0, 1.0]] * 4)
    tr = np.array([[0.5, 0.25, 0.125]] * 4)
    leanest = as_problem(t, m, tr, 0).leanest_bytes()
    assert choose(t, m, tr, leanest) == [2, 2, 2, 2]
    with pytest.raises(InfeasibleError):
        choose(t, m, tr, np.nextafter(leanest, 0))


def test_the_largest_transient_is_counted_once() -> None:
    # option 0: fast, small saved bytes, a large transient; two layers on it cost one transient
    t, m, tr = [[1.0, 3.0]] * 2, [[1.0, 1.0]] * 2, [[4.0, 0.0]] * 2
    assert choose(t, m, tr, 6.0) == [0, 0]  # 1 + 1 + max(4, 4)
    assert choose(t, m, tr, 5.9) == [1, 1]


def heuristic_reference(t, m, tr, budget):
    """Algorithm 1 written out with plain loops: undominated options by whole-model (time,
    memory); the fastest everywhere if it fits; else every split of the layers into a prefix on
    option i and a suffix on a leaner option k; the fastest that fits. Returns its time."""
    L, K = t.shape
    usable = [j for j in range(K) if np.isfinite(t[:, j]).all()]

    def cost(plan):
        rows = np.arange(L)
        return t[rows, plan].sum(), math.fsum(m[rows, plan].tolist()) + tr[rows, plan].max()

    ranked = sorted(usable, key=lambda j: (*cost([j] * L), j))
    kept = []
    for j in ranked:
        if not kept or cost([j] * L)[1] < cost([kept[-1]] * L)[1]:
            kept.append(j)
    if not kept:
        return None
    if cost([kept[0]] * L)[1] <= budget:
        return cost([kept[0]] * L)[0]
    best = None
    for a, i in enumerate(kept):
        for k in kept[a + 1 :]:
            for s in range(L + 1):
                time, memory = cost([i] * s + [k] * (L - s))
                if memory <= budget and (best is None or time < best):
                    best = time
    return best


def test_paradyse_is_algorithm_1_and_exact_never_loses_to_it() -> None:
    rng = np.random.default_rng(11)
    rescued = 0
    for index in range(400):
        t, m, tr, budget = random_instance(rng, index)
        problem = as_problem(t, m, tr, budget)
        expected = heuristic_reference(t, m, tr, budget)
        try:
            plan = choose(t, m, tr, budget, method="paradyse")
        except InfeasibleError:
            assert expected is None
            try:
                choose(t, m, tr, budget)
                rescued += 1
            except InfeasibleError:
                pass
            continue
        assert plan_memory(problem, plan) <= budget
        assert plan_time(problem, plan) == pytest.approx(expected, rel=1e-12)
        exact = choose(t, m, tr, budget)
        assert plan_time(problem, exact) <= plan_time(problem, plan) * (1 + 1e-12)
    assert rescued > 0  # instances where only exact finds a plan


def test_exact_beats_the_prefix_suffix_splits() -> None:
    # three identical layers: the optimum uses three options, beyond any two-option split
    t, m, tr = [[1.0, 1.5, 3.0]] * 3, [[3.0, 2.2, 1.0]] * 3, [[0.0] * 3] * 3
    problem = as_problem(t, m, tr, 6.2)
    assert sorted(choose(t, m, tr, 6.2)) == [0, 1, 2]
    assert plan_time(problem, choose(t, m, tr, 6.2)) == 5.5
    assert plan_time(problem, choose(t, m, tr, 6.2, method="paradyse")) == 6.0
    # two layers that each want another option: whole-model dominance drops the one needed
    t, m, tr = [[2.0, 1.0], [2.0, 1.0]], [[1.0, 5.0], [5.0, 1.0]], [[0.0, 0.0]] * 2
    assert choose(t, m, tr, 4.0) == [0, 1]
    with pytest.raises(InfeasibleError, match="paradyse found no plan within the budget"):
        choose(t, m, tr, 4.0, method="paradyse")


OPTIONS = ["tp_sp", "tp_sp+full", "ring", "ring+full", "usp2x4", "usp4x2+full"]


def static_instance():
    t = np.array([[1.0, 1.5, 1.2, 1.6, 1.1, 1.4]] * 4)
    m = np.array([[4.0, 1.0, 3.0, 1.0, 3.5, 1.0]] * 4)
    tr = np.zeros_like(t)
    return t, m, tr


def test_static_methods_pick_one_option_everywhere() -> None:
    t, m, tr = static_instance()
    assert choose(t, m, tr, 100, "static:ring", options=OPTIONS) == [2] * 4
    assert choose(t, m, tr, 10, "static:ring", options=OPTIONS) == [3] * 4  # only +full fits
    assert choose(t, m, tr, 100, "static:ring+full", options=OPTIONS) == [3] * 4
    assert choose(t, m, tr, 100, "static:usp", options=OPTIONS) == [4] * 4
    assert choose(t, m, tr, 4, "static:usp4x2+full", options=OPTIONS) == [5] * 4
    with pytest.raises(InfeasibleError, match=r"static:tp_sp\+full does not fit: it needs"):
        choose(t, m, tr, 3.5, "static:tp_sp+full", options=OPTIONS)
    with pytest.raises(ValueError, match="no such option"):
        choose(t, m, tr, 100, "static:metp", options=OPTIONS)
    with pytest.raises(ValueError, match="needs options="):
        choose(t, m, tr, 100, "static:ring")


def test_infeasible_error_names_the_leanest_plan_and_the_budget() -> None:
    t, m, tr = [[1.0, 2.0]] * 2, [[2**30, 2**29]] * 2, [[0.0, 2**29]] * 2
    with pytest.raises(InfeasibleError) as caught:
        choose(t, m, tr, 2**30)
    assert caught.value.leanest_bytes == 3 * 2**29  # 2 x 512 MiB saved + 512 MiB transient
    assert caught.value.budget_bytes == 2**30
    assert str(caught.value) == (
        "no plan fits: the leanest plan needs 1.50 GiB per rank, the budget is 1.00 GiB"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (([[1.0, 2.0]], [[1.0]], [[0.0, 0.0]], 1.0), "mem has shape"),
        (([], [], [], 1.0), "non-empty"),
        (([[float("nan")]], [[1.0]], [[0.0]], 1.0), "non-negative seconds"),
        (([[1.0]], [[-1.0]], [[0.0]], 1.0), "mem must be finite and non-negative"),
        (([[math.inf, math.inf]], [[1.0, 1.0]], [[0.0, 0.0]], 1.0), "layer 0 has no available"),
        (([[1.0]], [[1.0]], [[0.0]], "lots"), "budget must be a number"),
    ],
)
def test_malformed_input_is_one_line(args, message) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        choose(*args)
    assert "\n" not in str(caught.value)


def test_unknown_method_is_one_line() -> None:
    with pytest.raises(ValueError, match="unknown planner method 'greedy'; choose from exact"):
        choose([[1.0]], [[1.0]], [[0.0]], 2.0, method="greedy")


def test_ties_take_the_leaner_option() -> None:
    t = [[1.0, 1.0, 2.0]] * 3
    m = [[2.0, 1.0, 1.0]] * 3
    tr = [[0.0] * 3] * 3
    assert choose(t, m, tr, 100) == [1, 1, 1]  # same time, less memory


def test_numpy_budgets_are_numbers() -> None:
    t, m, tr = [[1.0, 2.0]], [[2.0, 1.0]], [[0.0, 0.0]]
    for budget in (np.int64(2), np.float32(2.0), np.float64(1.5)):
        assert choose(t, m, tr, budget) == ([0] if budget >= 2 else [1])
    with pytest.raises(ValueError, match="budget must be a number"):
        choose(t, m, tr, True)
    with pytest.raises(InfeasibleError) as caught:
        choose(t, m, tr, 0)
    assert "optimizer" not in str(caught.value)  # no static bytes were named


def test_past_its_work_limit_the_search_falls_back_to_a_plan_that_fits(monkeypatch) -> None:
    """Anti-correlated costs over distinct layers, the hard case for a knapsack search: with a
    tiny work limit the caps fall back to the rounded-up DP, whose plan fits, is within the
    gap the warning states and is no slower than the heuristic's."""
    import planners.exact

    monkeypatch.setattr(planners.exact, "MAX_CANDIDATES", 50)
    rng = np.random.default_rng(4)
    for _ in range(10):
        x = rng.random((6, 5))
        t, m, tr = (0.5 + x) * 1e-3, (1.5 - x) * 1e9, rng.random((6, 5)) * 1e8
        lean = as_problem(t, m, tr, 0).leanest_bytes()
        budget = lean + 0.5 * (m.max(axis=1).sum() + tr.max() - lean)
        expected = brute_force(t, m, tr, budget)
        with pytest.warns(RuntimeWarning, match=r"at most (\d+\.\d+)% slower") as caught:
            plan = choose(t, m, tr, budget)
        problem = as_problem(t, m, tr, budget)
        assert plan_memory(problem, plan) <= budget
        stated = float(re.search(r"at most (\d+\.\d+)%", str(caught[0].message)).group(1))
        assert plan_time(problem, plan) <= expected[0] * (1 + stated / 100 + 1e-5)
        heuristic = choose(t, m, tr, budget, method="paradyse")
        assert plan_time(problem, plan) <= plan_time(problem, heuristic) * (1 + 1e-12)
