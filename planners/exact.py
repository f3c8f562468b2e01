"""The optimal plan: a multiple-choice knapsack per transient cap, solved exactly by a search
pruned with linear-programming bounds.

Minimise sum_l time[l][j_l] subject to sum_l mem[l][j_l] + max_l transient[l][j_l] <= budget.

The max-transient term is handled exactly by enumerating its value: for a cap c taken from the
transients that occur, only options with transient <= c are allowed and the saved bytes must fit
in budget - c. The plan that is optimal overall is optimal for the cap equal to its own largest
transient, so the best over the caps is the optimum.

Each cap's knapsack (least sum of time, sum of mem <= capacity, one option per layer) is solved
without discretising memory:
- per layer, only options on the (memory, time) Pareto frontier can be in an optimal plan;
- the LP relaxation (each layer a convex combination of its frontier's lower convex hull) is
  solved greedily by time saved per byte; its value bounds every plan from below, and rounding
  its one fractional layer down, then spending the bytes left, gives a plan that fits;
- an exact forward search over (memory, time) states, layer by layer, keeps only states on the
  Pareto frontier whose LP bound for the layers still to choose can beat the best plan found.
Caps are visited in order of their LP bounds and skipped once the bound cannot beat the best
plan. The result is the true optimum, to float rounding (1e-12 relative) of the sums.
"""

from __future__ import annotations

import numpy as np

from .problem import RELATIVE_TOLERANCE, Problem

__all__ = ["solve_exact"]

SEARCH_LIMITS = (0.02, 0.2, 1.0)
"""Fractions of the gap between a knapsack's LP bound and the best plan so far below which
successive searches look; the last (1.0) is complete."""


def solve_exact(problem: Problem) -> list[int] | None:
    """The optimal plan's option per layer, or None when no plan fits."""
    t, m, tr, budget = problem.time, problem.mem, problem.transient, problem.budget
    available = problem.available
    rows = np.arange(problem.layers)
    fastest = np.lexsort((m, t), axis=1)[:, 0]  # least time, then least memory, per layer
    if m[rows, fastest].sum() + tr[rows, fastest].max() <= budget:
        return fastest.tolist()
    # layers with identical rows are interchangeable: solve per group of them
    content = np.concatenate((t, m, np.where(available, tr, -1.0)), axis=1)
    _, first, group_of = np.unique(content, axis=0, return_index=True, return_inverse=True)
    group_of = group_of.reshape(-1)
    members = [np.flatnonzero(group_of == g) for g in range(first.size)]
    knapsacks, seen = [], set()
    for cap in np.unique(tr[available]):
        allowed = available[first] & (tr[first] <= cap)
        if not allowed.any(axis=1).all():
            continue
        frontiers = tuple(
            tuple(_frontier(t[r], m[r], a)) for r, a in zip(first, allowed, strict=True)
        )
        if frontiers in seen:
            continue  # the same options as a smaller cap, with less room: never better
        seen.add(frontiers)
        knapsack = _Knapsack(t[first], m[first], frontiers, members, float(cap), budget)
        if knapsack.feasible:
            knapsacks.append(knapsack)
    if not knapsacks:
        return None
    best = min((k.incumbent for k in knapsacks), key=lambda plan: plan[1])
    for knapsack in sorted(knapsacks, key=lambda k: (k.bound, k.cap)):
        if knapsack.bound >= best[1] * (1 - RELATIVE_TOLERANCE):
            break  # every knapsack left has a bound at least as large
        # Search below a limit close to the LP bound first: optima sit near it, and a tight
        # limit prunes most states. A plan found below a limit is the best of the knapsack.
        gap = best[1] * (1 - RELATIVE_TOLERANCE) - knapsack.bound
        for fraction in SEARCH_LIMITS:
            found = knapsack.search(knapsack.bound + fraction * gap)
            if found is not None:
                best = found
                break
    return best[0]


class _Knapsack:
    """One cap's problem: least time with sum of mem <= budget - cap, each layer on an option of
    its group's frontier (groups: layers with identical rows)."""

    def __init__(self, t, m, frontiers, members, cap: float, budget: float) -> None:
        self.cap, self.budget = cap, budget
        self.options = [list(f) for f in frontiers]
        self.members = members
        self.layers = int(sum(len(ls) for ls in members))
        self.times = [t[g, opts] for g, opts in enumerate(self.options)]
        lean = np.array([m[g, opts[0]] for g, opts in enumerate(self.options)])
        counts = np.array([len(ls) for ls in members])
        self.excess = [m[g, opts] - lean[g] for g, opts in enumerate(self.options)]
        self.mems = [m[g, opts] for g, opts in enumerate(self.options)]
        self.feasible = self.fits([[0] * n for n in counts])
        if not self.feasible:
            return
        self.slack = max(budget - cap - float(lean @ counts), 0.0)
        self._steps()
        self.lean_time = np.array([tl[0] for tl in self.times])
        self.bound = float(self._lp_bound(counts, np.array([self.slack]))[0])
        self.incumbent = self._rounded_lp(counts)
        self._bounds: dict = {}  # (group, option) -> the LP table of what is undecided after it

    # ------------------------------------------------------------------ plans
    def plan(self, positions) -> list[int]:
        """positions[g]: frontier indices of the group's layers, in layer order -> options."""
        choice = [0] * self.layers
        for g, layers in enumerate(self.members):
            for layer, k in zip(layers, positions[g], strict=True):
                choice[layer] = self.options[g][k]
        return choice

    def fits(self, positions) -> bool:
        """The same sum, in the same order, as `problem.plan_memory` (with the cap as the max)."""
        per_layer = np.zeros(self.layers)
        for g, layers in enumerate(self.members):
            per_layer[layers] = self.mems[g][list(positions[g])]
        return bool(per_layer.sum() + self.cap <= self.budget)

    def time_of(self, positions) -> float:
        per_layer = np.zeros(self.layers)
        for g, layers in enumerate(self.members):
            per_layer[layers] = self.times[g][list(positions[g])]
        return float(per_layer.sum())

    # ------------------------------------------------------------------ LP relaxation
    def _steps(self) -> None:
        """Every group's lower-convex-hull steps (bytes added, time saved), sorted by time saved
        per byte: the LP relaxation takes them in this order."""
        group, start, step_e, step_t = [], [], [], []
        for g, (e, tl) in enumerate(zip(self.excess, self.times, strict=True)):
            hull = _lower_hull(e, tl)
            for a, b in zip(hull[:-1], hull[1:], strict=True):
                group.append(g), start.append((a, b))
                step_e.append(e[b] - e[a]), step_t.append(tl[a] - tl[b])
        step_e, step_t = np.array(step_e, dtype=float), np.array(step_t, dtype=float)
        order = np.argsort(-step_t / step_e, kind="stable") if step_e.size else np.arange(0)
        self.step_group = np.array(group, dtype=int)[order]
        self.step_hull = [start[i] for i in order]
        self.step_e, self.step_t = step_e[order], step_t[order]

    def _lp_bound(self, counts, capacity: np.ndarray) -> np.ndarray:
        """LP lower bound on the time of `counts[g]` layers of each group given each capacity
        (bytes above their leanest options)."""
        mult = counts[self.step_group] if self.step_group.size else np.zeros(0)
        cum_e = np.concatenate(([0.0], np.cumsum(self.step_e * mult)))
        cum_t = np.concatenate(([0.0], np.cumsum(self.step_t * mult)))
        return float(self.lean_time @ counts) - np.interp(capacity, cum_e, cum_t)

    def _rounded_lp(self, counts) -> tuple[list[int], float]:
        """A plan that fits: the LP's greedy order of steps, each taken by as many layers as the
        bytes left allow, then improved by the best single or paired change of layers' options
        (one layer slower and leaner to let another be faster) while one saves time."""
        at = [np.zeros(len(e), dtype=np.int64) for e in self.excess]  # layers per frontier index
        for g, n in enumerate(counts):
            at[g][0] = n
        left = self.slack
        for g, (a, b), de in zip(self.step_group, self.step_hull, self.step_e, strict=True):
            k = min(int(at[g][a]), int(left // de))
            at[g][a] -= k
            at[g][b] += k
            left -= k * de
        for _ in range(4 * self.layers):  # each round saves time; the bound is a safeguard
            move = self._best_move(at, left)
            if move is None:
                break
            for g, k, k2 in move:
                at[g][k] -= 1
                at[g][k2] += 1
                left -= self.excess[g][k2] - self.excess[g][k]
        # faster options on earlier layers of a group (any order costs the same)
        positions = [[k for k in range(len(a) - 1, -1, -1) for _ in range(a[k])] for a in at]
        if not self.fits(positions):  # float rounding at the boundary: the leanest plan fits
            positions = [[0] * int(n) for n in counts]
        return self.plan(positions), self.time_of(positions)

    def _best_move(self, at, left: float):
        """The change of one or two layers' options that fits in `left` bytes and saves the most
        time, as [(group, from, to), ...]; None if none saves time."""
        moves = [(g, k, k2) for g, a in enumerate(at) for k in np.flatnonzero(a).tolist()
                 for k2 in range(len(a)) if k2 != k]  # fmt: skip
        if not moves:
            return None
        de = np.array([self.excess[g][k2] - self.excess[g][k] for g, k, k2 in moves])
        dt = np.array([self.times[g][k2] - self.times[g][k] for g, k, k2 in moves])
        pair_e, pair_t = de[:, None] + de[None, :], dt[:, None] + dt[None, :]
        source = np.array([g * 64 + k for g, k, _ in moves])
        scarce = np.array([at[g][k] < 2 for g, k, _ in moves])
        clash = (source[:, None] == source[None, :]) & scarce[:, None]
        pair_t = np.where(clash | (pair_e > left), np.inf, pair_t)
        np.fill_diagonal(pair_t, np.inf)
        single_t = np.where(de <= left, dt, np.inf)
        i, j = np.unravel_index(int(np.argmin(pair_t)), pair_t.shape)
        s = int(np.argmin(single_t))
        best_pair, best_single = pair_t[i, j], single_t[s]
        threshold = -RELATIVE_TOLERANCE * max(abs(self.lean_time).max(), 1e-300)
        if min(best_pair, best_single) >= threshold:
            return None
        return [moves[s]] if best_single <= best_pair else [moves[i], moves[j]]

    # ------------------------------------------------------------------ exact search
    def search(self, limit: float) -> tuple[list[int], float] | None:
        """The fastest plan faster than `limit`, or None.

        Layers of a group are interchangeable, so a plan is how many of each group's layers take
        each frontier option. The counts are decided one (group, option) at a time, each for 0
        to the group's layers left (the group's last option takes them all). A state (layers of
        the group used, memory, time) survives when it is on the Pareto frontier of the states
        that used as many and its LP bound, over the options and groups still to decide, can
        beat the limit."""
        tolerance = RELATIVE_TOLERANCE * max(self.slack, max(e[-1] for e in self.excess))
        decisions = [(g, k) for g, e in enumerate(self.excess) for k in range(len(e))]
        counts = np.zeros((1, len(decisions)), dtype=np.int64)
        used, mem, time = np.zeros(1, dtype=np.int64), np.zeros(1), np.zeros(1)
        for d, (g, k) in enumerate(decisions):
            n, e, tl = len(self.members[g]), self.excess[g], self.times[g]
            last = k == len(e) - 1
            if last:  # the group's last option takes every layer left
                take, state = n - used, np.arange(used.size)
            else:  # every state once per count 0..(layers left)
                sizes = n - used + 1
                state = np.repeat(np.arange(used.size), sizes)
                take = np.arange(state.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
            u2, m2 = used[state] + take, mem[state] + take * e[k]
            t2 = time[state] + take * tl[k]
            bound = t2 + self._bound_after(g, k, n - u2, self.slack - m2)
            keep = np.flatnonzero((m2 <= self.slack + tolerance) & (bound < limit))
            if keep.size == 0:
                return None
            if last:
                u2 = np.zeros_like(u2)  # the next group starts with none used
            order = keep[np.lexsort((t2[keep], m2[keep], u2[keep]))]
            # Pareto within each value of `used`: time ranks, offset per segment so that one
            # running minimum restarts at every segment (integers: exact)
            rank = np.unique(t2[order], return_inverse=True)[1].reshape(-1)
            key = rank - u2[order] * (rank.size + 1)
            pareto = np.ones(order.size, dtype=bool)
            pareto[1:] = key[1:] < np.minimum.accumulate(key)[:-1]
            order = order[pareto]
            counts = counts[state[order]]
            counts[:, d] = take[order]
            used, mem, time = u2[order], m2[order], t2[order]
        best = counts[int(np.argmin(time))]
        positions: list[list[int]] = [[] for _ in self.options]
        for (g, k), c in zip(decisions, best.tolist(), strict=True):
            positions[g][:0] = [k] * c  # faster (higher) options first, as in _rounded_lp
        if not self.fits(positions):
            return None
        return self.plan(positions), self.time_of(positions)

    def _bound_after(self, g: int, k: int, left: np.ndarray, room: np.ndarray) -> np.ndarray:
        """LP lower bound on the time of what is still undecided after (group g, option k):
        `left` layers of group g on its options after k, and every layer of the later groups,
        within `room` bytes (above each layer's leanest option); inf where nothing fits."""
        table = self._bounds.get((g, k))
        if table is None:
            table = self._bounds[(g, k)] = self._bound_table(g, k)
        lean_t, lean_e, cap_fixed, cap_per, saved_fixed, saved_per, later_lean = table
        capacity = room - left * lean_e
        outside = capacity < -RELATIVE_TOLERANCE * max(self.slack, 1.0)
        capacity = np.maximum(capacity, 0.0)
        edges = cap_fixed[None, :] + left[:, None] * cap_per[None, :]  # (states, steps + 1)
        saved = saved_fixed[None, :] + left[:, None] * saved_per[None, :]
        i = (edges <= capacity[:, None]).sum(axis=1) - 1
        rows = np.arange(left.size)
        last = i == edges.shape[1] - 1
        j = np.minimum(i + 1, edges.shape[1] - 1)
        width = edges[rows, j] - edges[rows, i]
        frac = np.where(last, 0.0, (capacity - edges[rows, i]) / np.where(last, 1.0, width))
        total = saved[rows, i] + frac * (saved[rows, j] - saved[rows, i])
        value = later_lean + left * lean_t - total
        return np.where(outside, np.inf, value)

    def _bound_table(self, g: int, k: int):
        """The piecewise-linear LP of (g, k)'s undecided layers: the lower-hull steps of group
        g's options after k (each taken by every layer left) and of the later groups' frontiers,
        merged by time saved per byte; edges and savings split into a fixed part and a part per
        layer left of group g."""
        e, tl = self.excess[g], self.times[g]
        rest = slice(k + 1, len(e))
        steps = []  # (time saved per byte, bytes fixed, bytes per layer left, saved likewise)
        if k + 1 < len(e):
            er, tr = e[rest], tl[rest]
            hull = _lower_hull(er, tr)
            for a, b in zip(hull[:-1], hull[1:], strict=True):
                de, dt = er[b] - er[a], tr[a] - tr[b]
                steps.append((dt / de, 0.0, de, 0.0, dt))
            lean_e, lean_t = float(er[0]), float(tr[0])
        else:
            lean_e = lean_t = 0.0
        for later in range(g + 1, len(self.excess)):
            n, el, tll = len(self.members[later]), self.excess[later], self.times[later]
            hull = _lower_hull(el, tll)
            for a, b in zip(hull[:-1], hull[1:], strict=True):
                de, dt = el[b] - el[a], tll[a] - tll[b]
                steps.append((dt / de, n * de, 0.0, n * dt, 0.0))
        steps.sort(key=lambda step: -step[0])
        columns = np.array([s[1:] for s in steps], dtype=float).reshape(-1, 4)
        cum = np.vstack((np.zeros(4), np.cumsum(columns, axis=0)))
        later_lean = float(
            sum(len(self.members[x]) * self.times[x][0] for x in range(g + 1, len(self.excess)))
        )
        return lean_t, lean_e, cum[:, 0], cum[:, 1], cum[:, 2], cum[:, 3], later_lean


def _frontier(times, mems, allowed) -> list[int]:
    """Allowed options not dominated in (memory, time), by memory ascending (time descending).
    Ties keep the lowest index, so the result is deterministic."""
    idx = sorted(np.flatnonzero(allowed).tolist(), key=lambda j: (mems[j], times[j], j))
    kept: list[int] = []
    for j in idx:
        if not kept or times[j] < times[kept[-1]]:
            kept.append(j)
    return kept


def _lower_hull(e, t) -> list[int]:
    """Indices of the lower convex hull of points (e, t), e ascending and t descending."""
    hull: list[int] = []
    for k in range(len(e)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is on or above the chord from a to k: not a vertex
            if (t[b] - t[a]) * (e[k] - e[a]) >= (t[k] - t[a]) * (e[b] - e[a]):
                hull.pop()
            else:
                break
        hull.append(k)
    return hull
