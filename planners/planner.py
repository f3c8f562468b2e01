"""`Planner`: per micro-batch, the plan (an option per layer) with its predicted time and memory.

It prices the options with the cost model (cached by the batch's length signature and the
layers frozen this step), calls `choose()`, and keeps the previous plan while it still fits and
is within `hysteresis` (5%) of the new best. Everything is a deterministic function of the
inputs and of the sequence of calls, so every rank of an sp group that plans the same batches
gets the same plans without communicating.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .choose import choose
from .method import Method, option_group
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
    method: Method
    signature: tuple[int, ...] = field(repr=False)
    """The batch's sorted padded lengths the plan was made for."""
    kept: bool = False
    """True when hysteresis kept the previous plan over a new best."""
    choice: tuple[int, ...] = field(default=(), repr=False)
    """Per layer, the index of its option among the planner's options."""
    frozen: frozenset[int] = frozenset()
    """The layers planned as frozen (no weight gradients)."""

    @property
    def group_size(self) -> int | None:
        """g when the micro-batch runs on sub-groups of g ranks (`Option.group`, the same on
        every layer); None: on the whole sp group."""
        return self.options[0].group if self.options else None

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
    static: int
    """The static bytes the entry was planned with."""
    best: tuple[int, ...] | None = None
    error: InfeasibleError | None = None
    decisions: dict = field(default_factory=dict)
    """previous plan's choice -> the Plan returned after it (hysteresis is memoised too)."""


class Planner:
    """Plans for `costs.layers` layers within `budget_bytes` per rank.

    static_bytes: weights, gradients and optimizer state per rank (`cost_models.static_memory`
    plus what every micro-batch holds besides its layers), subtracted from the budget.
    offloadable_bytes: per layer, the part of static_bytes that is its optimizer state, which
    leaves the device while an optimizer wrapper keeps it elsewhere (`set_step`).
    frozen_bytes: per layer, the part of static_bytes that is its gradient buffer, freed while
    the layer is frozen. method: a
    `Method` or its string ("exact", "paradyse", "static:NAME"; see `planners.METHODS`).
    group_size: plan every micro-batch on sub-groups of that size (the options named 'gN:...');
    None: each micro-batch on the group size whose plan is fastest."""

    def __init__(
        self,
        costs: LayerCosts,
        budget_bytes: float,
        *,
        static_bytes: int = 0,
        offloadable_bytes: Sequence[int] = (),
        frozen_bytes: Sequence[int] = (),
        method: str | Method = "exact",
        hysteresis: float = HYSTERESIS,
        group_size: int | None = None,
    ) -> None:
        self.method = Method.parse(method)
        if not hysteresis >= 0:
            raise ValueError(f"hysteresis must be >= 0, got {hysteresis}")
        self.costs, self.hysteresis = costs, hysteresis
        self.budget_bytes, self.static_bytes = float(budget_bytes), int(static_bytes)
        self.offloadable_bytes = tuple(int(b) for b in offloadable_bytes) or (0,) * costs.layers
        self.frozen_bytes = tuple(int(b) for b in frozen_bytes) or (0,) * costs.layers
        for name, values in (("offloadable_bytes", self.offloadable_bytes),
                             ("frozen_bytes", self.frozen_bytes)):  # fmt: skip
            if len(values) != costs.layers:
                raise ValueError(f"{name} has {len(values)} entries for {costs.layers} layers")
        self.labels = [o.name for o in costs.options]
        if self.method.static:
            self.method.columns(self.labels)  # ValueError, one line, for an option not here
        self._by_group: dict[int | None, list[int]] = {}
        """Option columns per sub-group size (None: the whole group): a plan uses one."""
        for j, option in enumerate(costs.options):
            self._by_group.setdefault(option.group, []).append(j)
        self.group_size = None if group_size == costs.P else group_size
        """Forced sub-group size: its options wherever every layer can run them."""
        self._entries: dict[tuple, _Entry] = {}
        self._previous: tuple[int, ...] | None = None
        self._longest: dict[tuple, int] = {}  # (limit, step state) -> longest_fitting(limit)
        self.frozen: frozenset[int] = frozenset()
        """Layers frozen this step (see `set_step`)."""
        self.offloaded: frozenset[int] = frozenset()
        """Layers whose optimizer state is off the device this step."""

    def set_step(self, *, frozen: Iterable[int] = (), offloaded: Iterable[int] = ()) -> None:
        """The state of the coming step: which layers are frozen (priced without weight
        gradients) and whose optimizer state is off the device (left out of the static memory).
        Every rank of an sp group must set the same."""
        self.frozen = self.costs.check_layers(frozen)
        self.offloaded = self.costs.check_layers(offloaded, "offloaded")

    @property
    def step_static_bytes(self) -> int:
        """The static bytes of this step: less the optimizer state that is off the device and
        the gradient buffers of the frozen layers (the engine frees them)."""
        away = sum(self.offloadable_bytes[i] for i in self.offloaded)
        return self.static_bytes - away - sum(self.frozen_bytes[i] for i in self.frozen)

    @property
    def options(self) -> list[Option]:
        return self.costs.options

    # ------------------------------------------------------------------ planning
    def plan(self, seq_lens: Sequence[int]) -> Plan:
        """The plan for a micro-batch of these (unpadded) lengths; InfeasibleError when none fits,
        naming the leanest plan's memory, the budget and the longest sequence that fits."""
        entry = self._entry(seq_lens)
        if entry.error is not None:
            raise entry.error
        plan = entry.decisions.get(self._previous)
        if plan is None:
            plan = self._decide(entry)
            entry.decisions[self._previous] = plan
        self._previous = plan.choice
        return plan

    def _key(self, seq_lens) -> tuple:
        """What a plan depends on: the batch's length signature and the step's state."""
        return self.costs.signature(seq_lens), self.frozen, self.step_static_bytes

    def _entry(self, seq_lens) -> _Entry:
        key = self._key(seq_lens)
        static = key[2]
        entry = self._entries.get(key)
        if entry is not None:
            return entry
        entry = _Entry(self.costs.tables(seq_lens, self.frozen), static)
        try:
            entry.best = self._choose(entry.tables, static)
        except InfeasibleError as error:
            leanest = error.leanest_bytes + static
            entry.error = InfeasibleError(
                leanest, self.budget_bytes, self.longest_fitting(), error.method, static
            )
        if len(self._entries) >= self.costs.cache_size:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = entry
        return entry

    def _choose(self, tables: CostTables, static: int) -> tuple[int, ...]:
        """The method's plan; exact and paradyse plan each group size on its own columns (a
        micro-batch has one layout) and keep the fastest (ties: the whole group first)."""
        budget = self.budget_bytes - static
        if self.method.static or len(self._by_group) == 1:
            options = self.labels if self.method.static else None
            return tuple(choose(tables.time, tables.saved, tables.transient, budget,
                                self._static_fallback(tables), options=options))  # fmt: skip
        best, failures = None, []
        groups = self._by_group
        forced = groups.get(self.group_size) if self.group_size is not None else None
        if forced is not None and np.isfinite(tables.time[:, forced]).any(axis=1).all():
            groups = {self.group_size: forced}
        for columns in groups.values():
            if not np.isfinite(tables.time[:, columns]).any(axis=1).all():
                continue  # a layer that runs on the whole group only (MoE)
            try:
                sub = choose(tables.time[:, columns], tables.saved[:, columns],
                             tables.transient[:, columns], budget, self.method)  # fmt: skip
            except InfeasibleError as error:
                failures.append(error)
                continue
            choice = tuple(columns[j] for j in sub)
            time = float(tables.time[np.arange(len(choice)), list(choice)].sum())
            if best is None or time < best[0]:
                best = (time, choice)
        if best is None:
            raise min(failures, key=lambda e: e.leanest_bytes)
        return best[1]

    def _static_fallback(self, tables: CostTables) -> Method:
        """The method, except that a static 'gN:NAME' runs NAME on the whole group where a
        layer cannot run on sub-groups (a mixture-of-experts layer; InfeasibleError where NAME
        has no whole-group option, as local)."""
        method = self.method
        if not method.static or option_group(method.label) is None:
            return method
        columns = method.columns(self.labels)
        if np.isfinite(tables.time[:, columns]).any(axis=1).all():
            return method
        whole = Method("static", method.label.split(":", 1)[1])
        try:
            whole.columns(self.labels)
        except ValueError:  # g1:local: no whole-group counterpart
            raise InfeasibleError(math.inf, self.budget_bytes, method=str(method)) from None
        return whole

    def _decide(self, entry: _Entry) -> Plan:
        best = self._make(entry, entry.best)
        if self._previous is None or self._previous == entry.best:
            return best
        fits = self._peak(entry.tables, self._previous) <= self.budget_bytes - entry.static
        if not fits:
            return best
        if self.group_size is not None and self.options[self._previous[0]].group != (
            best.group_size
        ):
            return best  # a forced group size is not given up to hysteresis
        previous = self._make(entry, self._previous, kept=True)
        if previous.predicted_s <= (1 + self.hysteresis) * best.predicted_s:
            return previous
        return best

    @staticmethod
    def _peak(tables: CostTables, choice) -> float:
        """The layers' bytes at the step's peak, as `choose()` tests them."""
        rows, picked = np.arange(len(choice)), list(choice)
        return saved_sum(tables.saved[rows, picked]) + float(tables.transient[rows, picked].max())

    def _make(self, entry: _Entry, choice, kept: bool = False) -> Plan:
        tables = entry.tables
        rows = np.arange(len(choice))
        picked = list(choice)
        time = float(tables.time[rows, picked].sum())
        peak = self._peak(tables, choice)
        return Plan(
            options=tuple(self.options[j] for j in choice),
            predicted_s=time,
            predicted_peak_bytes=int(np.ceil(peak)) + entry.static,  # bytes are whole
            method=self.method,
            signature=tables.signature,
            kept=kept,
            choice=tuple(choice),
            frozen=tables.frozen,
        )

    # ------------------------------------------------------------------ limits
    def fits(self, seq_lens: Sequence[int]) -> bool:
        """Whether this planner's method finds a plan for the batch in the current step state
        (no hysteresis state moves)."""
        key = self._key(seq_lens)
        entry = self._entries.get(key)
        if entry is not None:
            return entry.error is None
        try:
            self._choose(self.costs.tables(seq_lens, self.frozen), key[2])
        except InfeasibleError:
            return False
        return True

    def longest_fitting(self, limit: int = 1 << 24) -> int:
        """The longest single sequence (tokens, a multiple of 2P) this method can plan within the
        budget, up to `limit`; 0 if not even the shortest fits. Memory grows with length, so a
        doubling then a bisection over multiples of 2P find it."""
        key = (limit, self.frozen, self.step_static_bytes)
        if key not in self._longest:
            self._longest[key] = self._search_longest(limit)
        return self._longest[key]

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
