"""`choose()`: the pure planning function every method goes through (DESIGN 7)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from .exact import solve_exact
from .heuristic import solve_paradyse, uniform_costs
from .problem import InfeasibleError, Problem, as_problem, plan_memory

__all__ = [
    "METHODS", "InfeasibleError", "choose", "parse_option_label", "check_method", "static_columns"
]  # fmt: skip

METHODS = ("exact", "paradyse", "static:<strategy>[+<recompute>]")
"""exact: the optimum (default); paradyse: the published heuristic; static:NAME: one option on
every layer (static:ring picks ring's fastest recompute mode that fits; static:ring+full
fixes it)."""

_LABEL = re.compile(r"^([a-z_]+?)(\d+x\d+)?(?:\+(none|selective|full))?$")


def parse_option_label(label: str) -> tuple[str, str | None, str]:
    """'usp2x4+full' -> ('usp', '2x4', 'full'); 'tp_sp' -> ('tp_sp', None, 'none')."""
    match = _LABEL.match(label)
    if not match:
        raise ValueError(
            f"bad option name {label!r}: write STRATEGY[+RECOMPUTE], e.g. ring+full or usp2x4"
        )
    return match.group(1), match.group(2), match.group(3) or "none"


def check_method(method: str) -> None:
    """ValueError, one line, for a method `choose()` does not know."""
    if method in ("exact", "paradyse"):
        return
    if method.startswith("static:") and method != "static:":
        parse_option_label(method.removeprefix("static:"))
        return
    raise ValueError(f"unknown planner method {method!r}; choose from {', '.join(METHODS)}")


def static_columns(wanted: str, labels: Sequence[str]) -> list[int]:
    """The option columns static:`wanted` may use: its strategy (and split, and recompute mode
    when given); ValueError, one line, when there is none."""
    strategy, factors, recompute = parse_option_label(wanted)
    columns = []
    for j, label in enumerate(labels):
        s, f, r = parse_option_label(label)
        if s == strategy and factors in (None, f) and ("+" not in wanted or r == recompute):
            columns.append(j)
    if not columns:
        raise ValueError(f"static:{wanted}: no such option; the options are {', '.join(labels)}")
    return columns


def _static(problem: Problem, wanted: str, options: Sequence[str] | None) -> list[int] | None:
    if options is None or len(options) != problem.time.shape[1]:
        raise ValueError(
            f"static:{wanted} needs options=, one name per option column "
            f"({problem.time.shape[1]} columns)"
        )
    usable = [j for j in static_columns(wanted, options) if problem.available[:, j].all()]
    if not usable:
        raise ValueError(f"static:{wanted}: the option cannot run on every layer")
    fitting = [j for j in usable if uniform_costs(problem, j)[1] <= problem.budget]
    if not fitting:
        leanest = min(uniform_costs(problem, j)[1] for j in usable)
        raise InfeasibleError(leanest, problem.budget, method=f"static:{wanted}")
    best = min(fitting, key=lambda j: (uniform_costs(problem, j)[0], j))
    return [best] * problem.layers


def choose(
    time,
    mem,
    transient,
    budget: float,
    method: str = "exact",
    *,
    options: Sequence[str] | None = None,
) -> list[int]:
    """One option index per layer minimising total time with sum(mem) + max(transient) <=
    budget, by `method` (see METHODS). `time[l][j]`, `mem[l][j]`, `transient[l][j]`: the cost
    of option j at layer l (time inf: layer l cannot run j). `options`: a name per column, needed
    by static methods. Raises InfeasibleError when the method finds no plan that fits, and
    ValueError, one line, for malformed input."""
    check_method(method)
    problem = as_problem(time, mem, transient, budget)
    if method == "exact":
        plan = solve_exact(problem)
    elif method == "paradyse":
        plan = solve_paradyse(problem)
    else:
        plan = _static(problem, method.removeprefix("static:"), options)
    if plan is None:
        error = problem.infeasible()
        if method == "paradyse" and error.leanest_bytes <= problem.budget:
            error = InfeasibleError(error.leanest_bytes, problem.budget, method="paradyse")
        raise error
    if plan_memory(problem, plan) > problem.budget:  # every method checks this; a guard
        raise AssertionError(f"{method} returned a plan over budget: {plan}")
    return [int(j) for j in plan]
