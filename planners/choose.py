"""`choose()`: the pure planning function every method goes through (DESIGN 7)."""

from __future__ import annotations

from collections.abc import Sequence

from .exact import solve_exact
from .heuristic import solve_paradyse, uniform_costs
from .method import METHODS, Method, parse_option_label
from .problem import InfeasibleError, Problem, as_problem, plan_memory

__all__ = ["METHODS", "InfeasibleError", "choose", "parse_option_label"]


def _static(problem: Problem, method: Method, options: Sequence[str] | None) -> list[int] | None:
    if options is None or len(options) != problem.time.shape[1]:
        raise ValueError(
            f"{method} needs options=, one name per option column ({problem.time.shape[1]} columns)"
        )
    usable = [j for j in method.columns(options) if problem.available[:, j].all()]
    if not usable:
        raise ValueError(f"{method}: the option cannot run on every layer")
    fitting = [j for j in usable if uniform_costs(problem, j)[1] <= problem.budget]
    if not fitting:
        leanest = min(uniform_costs(problem, j)[1] for j in usable)
        raise InfeasibleError(leanest, problem.budget, method=str(method))
    best = min(fitting, key=lambda j: (uniform_costs(problem, j)[0], j))
    return [best] * problem.layers


def choose(
    time,
    mem,
    transient,
    budget: float,
    method: str | Method = "exact",
    *,
    options: Sequence[str] | None = None,
) -> list[int]:
    """One option index per layer minimising total time with sum(mem) + max(transient) <=
    budget, by `method` (see METHODS). `time[l][j]`, `mem[l][j]`, `transient[l][j]`: the cost
    of option j at layer l (time inf: layer l cannot run j). `options`: a name per column, needed
    by static methods. Raises InfeasibleError when the method finds no plan that fits, and
    ValueError, one line, for malformed input."""
    method = Method.parse(method)
    problem = as_problem(time, mem, transient, budget)
    if method.kind == "exact":
        plan = solve_exact(problem)
    elif method.kind == "paradyse":
        plan = solve_paradyse(problem)
    else:
        plan = _static(problem, method, options)
    if plan is None:
        error = problem.infeasible()
        if method.kind == "paradyse" and error.leanest_bytes <= problem.budget:
            error = InfeasibleError(error.leanest_bytes, problem.budget, method="paradyse")
        raise error
    if plan_memory(problem, plan) > problem.budget:  # every method checks this; a guard
        raise AssertionError(f"{method} returned a plan over budget: {plan}")
    return [int(j) for j in plan]
