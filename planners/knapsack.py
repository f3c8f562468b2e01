"""One transient cap's multiple-choice knapsack for the exact planner (`planners.exact`): the
least total time with the saved bytes within the cap's room, one option per layer, layers with
identical rows solved as groups over their options' (memory, time) Pareto frontier. An
LP-bounded search decides it exactly; past a work limit, a DP over memory rounded up to
1/DP_RESOLUTION of the free bytes gives a plan that surely fits."""

from __future__ import annotations

import numpy as np

from .lp import Steps, hull_steps
from .problem import RELATIVE_TOLERANCE, saved_sum

__all__ = ["DP_RESOLUTION"]

DP_RESOLUTION = 4096
"""Memory units of the fallback DP."""


class _TooManyStates(Exception):
    pass


class _Knapsack:
    """One cap's problem: least time with sum of mem <= budget - cap, each layer on an option of
    its group's frontier (groups: layers with identical rows)."""

    def __init__(self, t, m, frontiers, members, cap: float, budget: float) -> None:
        self.cap, self.budget = cap, budget
        self.options = [list(f) for f in frontiers]
        self.members = members
        self.counts = np.array([len(ls) for ls in members])
        self.layers = int(self.counts.sum())
        self.times = [t[g, opts] for g, opts in enumerate(self.options)]
        self.mems = [m[g, opts] for g, opts in enumerate(self.options)]
        lean = np.array([mem[0] for mem in self.mems])
        self.excess = [mem - lean[g] for g, mem in enumerate(self.mems)]
        self.feasible = self.fits([[0] * n for n in self.counts])
        if not self.feasible:
            return
        self.slack = max(budget - cap - saved_sum(lean * self.counts), 0.0)
        # memory compares are loose by this much (the slack itself is rounded at the budget's
        # scale); a plan found is then checked exactly by `fits`
        largest = max(float(e[-1]) for e in self.excess)
        self.tolerance = RELATIVE_TOLERANCE * max(abs(budget), self.slack, largest, 1e-300)
        self.lean_time = np.array([tl[0] for tl in self.times])
        self.hulls = [hull_steps(e, tl) for e, tl in zip(self.excess, self.times, strict=True)]
        self.bound = self._root_bound()
        self.incumbent = self._rounded_lp()
        self._suffix: dict[int, list] = {}  # group -> fixed hull steps of the groups after it
        self._bounds: dict[tuple[int, int], Steps] = {}

    # ------------------------------------------------------------------ plans
    def plan(self, positions) -> list[int]:
        """positions[g]: frontier indices of the group's layers, in layer order -> options."""
        choice = [0] * self.layers
        for g, layers in enumerate(self.members):
            for layer, k in zip(layers, positions[g], strict=True):
                choice[layer] = self.options[g][k]
        return choice

    def _per_layer(self, tables, positions) -> np.ndarray:
        values = np.zeros(self.layers)
        for g, layers in enumerate(self.members):
            values[layers] = tables[g][list(positions[g])]
        return values

    def fits(self, positions) -> bool:
        """`problem.plan_memory`'s test, with the cap for the largest transient."""
        return saved_sum(self._per_layer(self.mems, positions)) + self.cap <= self.budget

    def time_of(self, positions) -> float:
        return float(self._per_layer(self.times, positions).sum())

    # ------------------------------------------------------------------ LP relaxation
    def _root_bound(self) -> float:
        steps = Steps([(de, dt, n) for hull, n in zip(self.hulls, self.counts, strict=True)
                       for _, _, de, dt in hull], [])  # fmt: skip
        saved = steps.saved(np.zeros(1, dtype=int), np.array([self.slack]))[0]
        return float(self.lean_time @ self.counts - saved)

    def _rounded_lp(self) -> tuple[list[int], float]:
        """A plan that fits: the LP's steps in order, each taken by as many layers as the bytes
        left allow, then improved by the best single or paired change of layers' options (one
        layer slower and leaner to let another be faster) while one saves time."""
        at = [np.zeros(len(e), dtype=np.int64) for e in self.excess]  # layers per frontier index
        for g, n in enumerate(self.counts):
            at[g][0] = n
        steps = [(dt / de, g, a, b, de) for g, hull in enumerate(self.hulls)
                 for a, b, de, dt in hull]  # fmt: skip
        steps.sort(key=lambda step: -step[0])
        left = self.slack
        for _, g, a, b, de in steps:
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
            positions = [[0] * int(n) for n in self.counts]
        return self.plan(positions), self.time_of(positions)

    def _best_move(self, at, left: float, pairs: int = 32):
        """The change of one or two layers' options that fits in `left` bytes and saves the most
        time, as [(group, from, to), ...]; None if none saves time. Pairs are tried among the
        `pairs` upgrades that save most and the `pairs` downgrades that free most per second."""
        moves = [(g, k, k2) for g, a in enumerate(at) for k in np.flatnonzero(a).tolist()
                 for k2 in range(len(a)) if k2 != k]  # fmt: skip
        if not moves:
            return None
        de = np.array([self.excess[g][k2] - self.excess[g][k] for g, k, k2 in moves])
        dt = np.array([self.times[g][k2] - self.times[g][k] for g, k, k2 in moves])
        threshold = -RELATIVE_TOLERANCE * max(float(np.abs(self.lean_time).max()), 1e-300)
        single = np.where(de <= left, dt, np.inf)
        best = int(np.argmin(single))
        result = (float(single[best]), [moves[best]])
        ups = np.flatnonzero(de > 0)
        ups = ups[np.argsort(dt[ups], kind="stable")[:pairs]]
        downs = np.flatnonzero(de < 0)
        downs = downs[np.argsort(dt[downs] / -de[downs], kind="stable")[:pairs]]
        if ups.size and downs.size:
            pair_e = de[ups][:, None] + de[downs][None, :]
            pair_t = np.where(pair_e <= left, dt[ups][:, None] + dt[downs][None, :], np.inf)
            for i, j in np.argwhere(np.isfinite(pair_t))[
                np.argsort(pair_t[np.isfinite(pair_t)], kind="stable")
            ].tolist():
                up, down = moves[ups[i]], moves[downs[j]]
                if pair_t[i, j] >= result[0]:
                    break
                if up[:2] != down[:2] or at[up[0]][up[1]] >= 2:  # two layers to move from
                    result = (float(pair_t[i, j]), [up, down])
                    break
        return result[1] if result[0] < threshold else None

    # ------------------------------------------------------------------ exact search
    def search(self, limit: float, work) -> tuple[list[int], float] | None:
        """The fastest plan faster than `limit`, or None; _TooManyStates when `work` runs out.

        A plan is how many of each group's layers take each frontier option. The counts are
        decided one (group, option) at a time, each for 0 to the group's layers left (the
        group's last option takes them all); a group of one layer picks its option in one
        step. A state (layers of the group used, memory, time) survives when it is on the
        Pareto frontier of the states that used as many and its LP bound, over the options and
        groups still to decide, can beat the limit."""
        decisions = [(g, k) for g, e in enumerate(self.excess)
                     for k in ([None] if self.counts[g] == 1 else range(len(e)))]  # fmt: skip
        parents = []  # per decision: (the state each survivor extends, its count or option)
        used, mem, time = np.zeros(1, dtype=np.int64), np.zeros(1), np.zeros(1)
        for g, k in decisions:
            n, e, tl = int(self.counts[g]), self.excess[g], self.times[g]
            if k is None:  # one layer: every state once per option (`take` is the option)
                state = np.repeat(np.arange(used.size), len(e))
                take = np.tile(np.arange(len(e)), used.size)
                u2, m2, t2 = np.full_like(state, n), mem[state] + e[take], time[state] + tl[take]
                k = len(e) - 1  # what is left to decide is what the last option leaves
            else:
                if k == len(e) - 1:  # the group's last option takes every layer left
                    take, state = n - used, np.arange(used.size)
                else:  # every state once per count 0..(layers left)
                    sizes = n - used + 1
                    state = np.repeat(np.arange(used.size), sizes)
                    take = np.arange(state.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
                u2, m2 = used[state] + take, mem[state] + take * e[k]
                t2 = time[state] + take * tl[k]
            work.spend(state.size)
            keep = np.flatnonzero(m2 <= self.slack + self.tolerance)
            keep = keep[t2[keep] + self._bound_after(g, k, n - u2[keep], m2[keep]) < limit]
            if keep.size == 0:
                return None
            if k == len(e) - 1:
                u2 = np.zeros_like(u2)  # the next group starts with none used
            order = keep[np.lexsort((t2[keep], m2[keep], u2[keep]))]
            # Pareto within each value of `used`: time ranks, offset per segment so that one
            # running minimum restarts at every segment (integers: exact)
            rank = np.unique(t2[order], return_inverse=True)[1].reshape(-1)
            key = rank - u2[order] * (rank.size + 1)
            pareto = np.ones(order.size, dtype=bool)
            pareto[1:] = key[1:] < np.minimum.accumulate(key)[:-1]
            order = order[pareto]
            parents.append((state[order], take[order]))
            used, mem, time = u2[order], m2[order], t2[order]
        for final in np.argsort(time, kind="stable").tolist():  # the fastest that truly fits
            positions = self._positions(decisions, parents, final)
            if self.fits(positions):
                return self.plan(positions), self.time_of(positions)
        return None

    def _positions(self, decisions, parents, state: int) -> list[list[int]]:
        positions: list[list[int]] = [[] for _ in self.options]
        for (g, k), (state_of, take) in zip(reversed(decisions), reversed(parents), strict=True):
            if k is None:
                positions[g] = [int(take[state])]
            else:
                positions[g] += [k] * int(take[state])  # faster options first, as _rounded_lp
            state = int(state_of[state])
        return positions

    def _bound_after(self, g: int, k: int, left: np.ndarray, mem: np.ndarray) -> np.ndarray:
        """LP lower bound on the time of what is still undecided after (group g, option k):
        `left` layers of group g on its options after k and every layer of the later groups,
        for states holding `mem` bytes above their leanest options; inf where nothing fits."""
        steps = self._bounds.get((g, k))
        if steps is None:
            steps = self._bounds[(g, k)] = self._steps_after(g, k)
        e, tl = self.excess[g], self.times[g]
        lean_e, lean_t = (e[k + 1], tl[k + 1]) if k + 1 < len(e) else (0.0, 0.0)
        capacity = self.slack - mem - left * lean_e
        later = float(self.lean_time[g + 1 :] @ self.counts[g + 1 :])
        value = later + left * lean_t - steps.saved(left, np.maximum(capacity, 0.0))
        outside = capacity < -self.tolerance
        return np.where(outside, np.inf, value)

    def _steps_after(self, g: int, k: int) -> Steps:
        """The hull steps of group g's options after k (per layer left) and of the later groups'
        frontiers (fixed)."""
        if g not in self._suffix:
            self._suffix[g] = [(de, dt, int(self.counts[x])) for x in range(g + 1, len(self.hulls))
                               for _, _, de, dt in self.hulls[x]]  # fmt: skip
        rest = slice(k + 1, len(self.excess[g]))
        per = [(de, dt) for _, _, de, dt in hull_steps(self.excess[g][rest], self.times[g][rest])]
        return Steps(self._suffix[g], per)

    # ------------------------------------------------------------------ bounded fallback
    def rounded_dp(self) -> tuple[list[int], float] | None:
        """The best plan with every option's bytes rounded UP to 1/DP_RESOLUTION of the free
        bytes (so it surely fits), by a dynamic program over layers: O(L K R)."""
        R = DP_RESOLUTION if self.slack > 0 else 0
        quantum = self.slack / DP_RESOLUTION if self.slack > 0 else 1.0
        groups = [g for g, layers in enumerate(self.members) for _ in layers]
        weights = [np.ceil(self.excess[g] / quantum - 1e-9).astype(np.int64) for g in groups]
        times = [self.times[g] for g in groups]
        cols = np.arange(R + 1)
        tables = [np.zeros(R + 1)]  # tables[i][b]: least time of the last i layers within b
        for w, tl in zip(reversed(weights), reversed(times), strict=True):
            usable = w <= R
            padded = np.concatenate((np.full(R, np.inf), tables[-1]))  # padded[R + b] = F[b]
            both = padded[(R - w[usable])[:, None] + cols[None, :]] + tl[usable][:, None]
            tables.append(both.min(axis=0))
        tables.reverse()
        if not np.isfinite(tables[0][R]):
            return None
        positions: list[list[int]] = [[] for _ in self.options]
        b = R
        for i, (w, tl) in enumerate(zip(weights, times, strict=True)):
            nxt = tables[i + 1]
            scores = [tl[k] + nxt[b - w[k]] if w[k] <= b else np.inf for k in range(len(w))]
            k = int(np.argmin(scores))
            positions[groups[i]].append(k)
            b -= int(w[k])
        if not self.fits(positions):
            return None
        return self.plan(positions), self.time_of(positions)


def _frontier(times, mems, allowed) -> list[int]:
    """Allowed options not dominated in (memory, time), by memory ascending (time descending).
    Ties keep the lowest index, so the result is deterministic."""
    idx = sorted(np.flatnonzero(allowed).tolist(), key=lambda j: (mems[j], times[j], j))
    kept: list[int] = []
    for j in idx:
        if not kept or times[j] < times[kept[-1]]:
            kept.append(j)
    return kept
