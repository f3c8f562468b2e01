"""The planning problem as arrays, its checks, and the error for a budget no plan fits.

A problem is three (layers, options) tables: `time[l][j]` seconds, `mem[l][j]` bytes held from
the forward to the backward (the saved bytes) and `transient[l][j]` the most bytes the layer needs
beyond every layer's saved bytes at its worst moment, plus a budget in bytes. A plan picks one
option per layer; it fits when sum of its mem + the largest of its transients <= budget (DESIGN
7). An infinite time marks an option a layer cannot run (a strategy that cannot split it).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .units import format_bytes

__all__ = ["InfeasibleError", "Problem", "as_problem", "plan_time", "plan_memory", "saved_sum"]

RELATIVE_TOLERANCE = 1e-12
"""Times within this relative distance count as equal (sums of the same floats in other orders)."""


class InfeasibleError(ValueError):
    """No plan fits the memory budget. The message names the leanest plan's memory, the budget
    and, from `Planner`, the longest single sequence that would fit.

    method: None when no plan at all fits; else the method that found none ("static:ring",
    "paradyse"), whose own leanest plan `leanest_bytes` is."""

    def __init__(
        self,
        leanest_bytes: float,
        budget_bytes: float,
        longest_fitting: int | None = None,
        method: str | None = None,
        static_bytes: int = 0,
    ) -> None:
        self.static_bytes = static_bytes
        self.leanest_bytes = leanest_bytes
        self.budget_bytes = budget_bytes
        self.longest_fitting = longest_fitting
        self.method = method
        need, allowed = format_bytes(leanest_bytes), format_bytes(budget_bytes)
        if method is None:
            message = (
                f"no plan fits: the leanest plan needs {need} per rank, the budget is {allowed}"
            )
        elif leanest_bytes > budget_bytes:
            message = f"{method} does not fit: it needs {need} per rank, the budget is {allowed}"
        else:
            message = (
                f"{method} found no plan within the budget of {allowed} per rank, although the "
                f"leanest plan needs {need}: use the exact planner"
            )
        if longest_fitting is not None:
            message += (
                f"; the longest single sequence that fits is {longest_fitting:,} tokens"
                if longest_fitting > 0
                else "; not even the shortest sequence fits"
            )
        if static_bytes > 0 and static_bytes >= budget_bytes:
            message += (
                f"; weights, gradients and optimizer state alone need {format_bytes(static_bytes)}"
                ": use a larger sp, shard the optimizer over dp, or a larger budget"
            )
        super().__init__(message)


@dataclass(frozen=True)
class Problem:
    time: np.ndarray
    """(L, K) float64 seconds; inf where a layer cannot run the option."""
    mem: np.ndarray
    """(L, K) float64 bytes."""
    transient: np.ndarray
    """(L, K) float64 bytes."""
    budget: float

    @property
    def layers(self) -> int:
        return self.time.shape[0]

    @property
    def available(self) -> np.ndarray:
        return np.isfinite(self.time)

    def leanest_bytes(self) -> float:
        """The least memory any plan needs: for each transient cap, the leanest option of every
        layer among those under the cap, plus the cap."""
        best = math.inf
        for cap in np.unique(self.transient[self.available]):
            allowed = self.available & (self.transient <= cap)
            if allowed.any(axis=1).all():
                lean = saved_sum(np.where(allowed, self.mem, np.inf).min(axis=1))
                best = min(best, lean + float(cap))
        return float(best)

    def infeasible(self) -> InfeasibleError:
        return InfeasibleError(self.leanest_bytes(), self.budget)


def _table(name: str, rows, shape: tuple[int, int] | None) -> np.ndarray:
    try:
        table = np.asarray(rows, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (layers x options) table of numbers") from None
    if table.ndim != 2 or table.shape[0] == 0 or table.shape[1] == 0:
        raise ValueError(
            f"{name} must be a non-empty (layers x options) table, got shape {table.shape}"
        )
    if shape is not None and table.shape != shape:
        raise ValueError(f"{name} has shape {table.shape}, time has {shape}: they must match")
    return table


def as_problem(time, mem, transient, budget: float) -> Problem:
    """Check and convert the tables of `choose()`; ValueError, one line, for a malformed input."""
    t = _table("time", time, None)
    m = _table("mem", mem, t.shape)
    tr = _table("transient", transient, t.shape)
    if np.isnan(t).any() or (t < 0).any():
        raise ValueError("time must be non-negative seconds (inf for an unavailable option)")
    available = np.isfinite(t)
    for name, table in (("mem", m), ("transient", tr)):
        values = table[available]
        if not np.isfinite(values).all() or (values < 0).any():
            raise ValueError(f"{name} must be finite and non-negative for every available option")
    missing = np.flatnonzero(~available.any(axis=1))
    if missing.size:
        raise ValueError(f"layer {int(missing[0])} has no available option (every time is inf)")
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or math.isnan(budget):
        raise ValueError(f"budget must be a number of bytes, got {budget!r}")
    # unavailable cells get neutral values so that vectorised sums never meet inf - inf
    m = np.where(available, m, 0.0)
    tr = np.where(available, tr, 0.0)
    return Problem(t, m, tr, float(budget))


def plan_time(problem: Problem, choice: Sequence[int]) -> float:
    return float(problem.time[np.arange(problem.layers), list(choice)].sum())


def saved_sum(values) -> float:
    """The correctly rounded sum (math.fsum): the same in every order, so that whether a plan
    fits does not depend on the order its layers are added in."""
    return math.fsum(np.asarray(values, dtype=np.float64).tolist())


def plan_memory(problem: Problem, choice: Sequence[int]) -> float:
    """Sum of the chosen options' mem + the largest chosen transient: the one test of fitting
    that every method's plan passes."""
    rows = np.arange(problem.layers)
    picked = list(choice)
    return saved_sum(problem.mem[rows, picked]) + float(problem.transient[rows, picked].max())
