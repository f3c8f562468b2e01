"""`Planner`: per micro-batch, the plan (an option per layer) with its predicted time and memory.

It enumerates the options the strategies support, prices them with the cost model (cached by
the batch's length signature), calls `choose()`, and keeps the previous plan while it still fits
and is within `hysteresis` (5%) of the new best. Everything is a deterministic function of the
inputs and of the sequence of calls, so every rank of an sp group that plans the same batches
gets the same plans without communicating.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .choose import check_method, choose, static_columns
from .options import CostTables, LayerCosts, Option
from .problem import InfeasibleError, saved_sum

__all__ = ["Plan", "Planner"]

HYSTERESIS = 0.05
"""Keep the previous plan while it fits and is at most this much slower than the new best (the
paper's gamma)."""


@dataclass(frozen=True)
class Plan:
    """One micro-batch's choice for every layer, with the cost model's prediction for it."""

    options: tuple[Option, ...]
    """Per layer."""
    predicted_s: float
    """Forward + backward seconds of the layers on one rank."""
    predicted_peak_bytes: int
    """static + sum of saved bytes + the largest transient (the LM head's logits included)."""
    method: str
    signature: tuple[int, ...] = field(repr=False)
    """The batch's sorted padded lengths the plan was made for."""
    kept: bool = False
    """True when hysteresis kept the previous plan over a new best."""
    choice: tuple[int, ...] = field(default=(), repr=False)
    """Per layer, the index of its option among the planner's options."""

    @property
    def strategies(self) -> list[str]:
        return [o.strategy for o in self.options]

    @property
    def recomputes(self) -> list[str]:
        return [o.recompute for o in self.options]

    def __str__(self) -> str:
        """Runs of equal options: 'tp_sp x20 | ring+full x4'."""
        runs: list[list] = []
        for option in self.options:
            if runs and runs[-1][0] == option:
                runs[-1][1] += 1
            else:
                runs.append([option, 1])
        return " | ".join(f"{o.name} x{n}" for o, n in runs)


@dataclass
class _Entry:
    tables: CostTables
    best: tuple[int, ...] | None = None
    error: InfeasibleError | None = None
    decisions: dict = field(default_factory=dict)
    """previous plan's choice -> the Plan returned after it (hysteresis is memoised too)."""


class Planner:
    """Plans for `costs.layers` layers within `budget_bytes` per rank.

    static_bytes: weights, gradients and optimizer state per rank (`cost_models.static_memory`),
    subtracted from the budget. method: "exact", "paradyse" or "static:NAME" (see
    `planners.METHODS`)."""

    def __init__(
        self,
        costs: LayerCosts,
        budget_bytes: float,
        *,
        static_bytes: int = 0,
        method: str = "exact",
        hysteresis: float = HYSTERESIS,
    ) -> None:
        check_method(method)
        if not hysteresis >= 0:
            raise ValueError(f"hysteresis must be >= 0, got {hysteresis}")
        self.costs, self.method, self.hysteresis = costs, method, hysteresis
        self.budget_bytes, self.static_bytes = float(budget_bytes), int(static_bytes)
        self.labels = [o.name for o in costs.options]
        if method.startswith("static:"):
            static_columns(method.removeprefix("static:"), self.labels)
        self._entries: dict[tuple[int, ...], _Entry] = {}
        self._previous: tuple[int, ...] | None = None
        self._longest: dict[int, int] = {}  # limit -> longest_fitting(limit)

    @property
    def options(self) -> list[Option]:
        return self.costs.options

    # ------------------------------------------------------------------ planning
    def plan(self, seq_lens: Sequence[int]) -> Plan:
        """The plan for a micro-batch of these (unpadded) lengths; InfeasibleError when none fits,
        naming the leanest plan's memory, the budget and the longest sequence that fits."""
        entry = self._entry(self.costs.signature(seq_lens), seq_lens)
        if entry.error is not None:
            raise entry.error
        plan = entry.decisions.get(self._previous)
        if plan is None:
            plan = self._decide(entry)
            entry.decisions[self._previous] = plan
        self._previous = plan.choice
        return plan

    def _entry(self, key, seq_lens) -> _Entry:
        entry = self._entries.get(key)
        if entry is not None:
            return entry
        entry = _Entry(self.costs.tables(seq_lens))
        try:
            entry.best = self._choose(entry.tables)
        except InfeasibleError as error:
            leanest = error.leanest_bytes + self.static_bytes
            entry.error = InfeasibleError(
                leanest, self.budget_bytes, self.longest_fitting(), error.method, self.static_bytes
            )
        if len(self._entries) >= self.costs.cache_size:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = entry
        return entry

    def _choose(self, tables: CostTables) -> tuple[int, ...]:
        budget = self.budget_bytes - self.static_bytes
        options = self.labels if self.method.startswith("static:") else None
        return tuple(
            choose(tables.time, tables.saved, tables.transient, budget, self.method,
                   options=options)
        )  # fmt: skip

    def _decide(self, entry: _Entry) -> Plan:
        best = self._make(entry.tables, entry.best)
        if self._previous is None or self._previous == entry.best:
            return best
        previous = self._make(entry.tables, self._previous, kept=True)
        fits = self._peak(entry.tables, self._previous) <= self.budget_bytes - self.static_bytes
        if fits and previous.predicted_s <= (1 + self.hysteresis) * best.predicted_s:
            return previous
        return best

    @staticmethod
    def _peak(tables: CostTables, choice) -> float:
        """The layers' bytes at the step's peak, as `choose()` tests them."""
        rows, picked = np.arange(len(choice)), list(choice)
        return saved_sum(tables.saved[rows, picked]) + float(tables.transient[rows, picked].max())

    def _make(self, tables: CostTables, choice, kept: bool = False) -> Plan:
        rows = np.arange(len(choice))
        picked = list(choice)
        time = float(tables.time[rows, picked].sum())
        peak = self._peak(tables, choice)
        return Plan(
            options=tuple(self.options[j] for j in choice),
            predicted_s=time,
            predicted_peak_bytes=int(np.ceil(peak)) + self.static_bytes,  # bytes are whole
            method=self.method,
            signature=tables.signature,
            kept=kept,
            choice=tuple(choice),
        )

    # ------------------------------------------------------------------ limits
    def fits(self, seq_lens: Sequence[int]) -> bool:
        """Whether this planner's method finds a plan for the batch (no hysteresis state moves)."""
        key = self.costs.signature(seq_lens)
        entry = self._entries.get(key)
        if entry is not None:
            return entry.error is None
        try:
            self._choose(self.costs.tables(seq_lens))
        except InfeasibleError:
            return False
        return True

    def longest_fitting(self, limit: int = 1 << 24) -> int:
        """The longest single sequence (tokens, a multiple of 2P) this method can plan within the
        budget, up to `limit`; 0 if not even the shortest fits. Memory grows with length, so a
        doubling then a bisection over multiples of 2P find it."""
        if limit not in self._longest:
            self._longest[limit] = self._search_longest(limit)
        return self._longest[limit]

    def _search_longest(self, limit: int) -> int:
        step = 2 * self.costs.P
        most = limit // step
        if most < 1 or not self.fits([step]):
            return 0
        low, high = 1, 2  # in units of 2P: low fits, high is the next to try
        while high <= most and self.fits([high * step]):
            low, high = high, high * 2
        if high > most:
            if self.fits([most * step]):
                return most * step
            high = most
        while high - low > 1:
            middle = (low + high) // 2
            if self.fits([middle * step]):
                low = middle
            else:
                high = middle
        return low * step
