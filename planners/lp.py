"""The LP relaxation of a multiple-choice knapsack over groups of identical layers.

Each layer may take a convex combination of its options; only the lower convex hull of the
(memory, time) frontier matters, and the optimum takes hull steps in order of time saved per
byte. With memory measured above each layer's leanest option, the LP's least time for a set of
layers is a piecewise-linear, convex, decreasing function of the bytes allowed.
"""

from __future__ import annotations

import numpy as np

__all__ = ["lower_hull", "hull_steps", "Steps"]

CHUNK = 1 << 20  # edge evaluations held at once by Steps.saved


def lower_hull(e, t) -> list[int]:
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


def hull_steps(e, t) -> list[tuple[int, int, float, float]]:
    """(from, to, bytes added, time saved) of each step along the lower hull of a frontier."""
    e, t = np.asarray(e, dtype=float).tolist(), np.asarray(t, dtype=float).tolist()
    hull = lower_hull(e, t)
    return [(a, b, e[b] - e[a], t[a] - t[b]) for a, b in zip(hull, hull[1:], strict=False)]


class Steps:
    """Hull steps of several groups, each taken by `fixed` layers or by a number of layers given
    at evaluation (`per`): a piecewise-linear LP value with edges and savings split into a
    fixed part and a part per layer of the `per` kind."""

    def __init__(self, fixed: list[tuple[float, float, int]], per: list[tuple[float, float]]):
        """fixed: (bytes, time saved, layers) per step; per: (bytes, time saved) per step."""
        rows = [(dt / de, de * n, 0.0, dt * n, 0.0) for de, dt, n in fixed]
        rows += [(dt / de, 0.0, de, 0.0, dt) for de, dt in per]
        rows.sort(key=lambda row: -row[0])  # the LP takes the most time saved per byte first
        table = np.array([row[1:] for row in rows], dtype=float).reshape(-1, 4)
        cum = np.vstack((np.zeros(4), np.cumsum(table, axis=0)))
        self.cap_fixed, self.cap_per, self.saved_fixed, self.saved_per = cum.T

    def saved(self, layers: np.ndarray, capacity: np.ndarray) -> np.ndarray:
        """Time the LP saves over the leanest options with `capacity` bytes (>= 0), for `layers`
        of the per-layer kind: one interpolation per distinct count when there are few, else
        all states at once, in chunks of at most CHUNK edge evaluations."""
        out = np.empty(capacity.shape)
        counts = np.unique(layers)
        if counts.size <= 8:
            for n in counts.tolist():
                rows = layers == n
                edges = self.cap_fixed + n * self.cap_per  # non-decreasing; flat steps save 0
                out[rows] = np.interp(capacity[rows], edges, self.saved_fixed + n * self.saved_per)
            return out
        width = self.cap_fixed.size
        chunk = max(1, CHUNK // width)
        for start in range(0, capacity.size, chunk):
            part = slice(start, start + chunk)
            n, c = layers[part][:, None], capacity[part]
            edges = self.cap_fixed + n * self.cap_per  # (states, steps + 1), non-decreasing
            saved = self.saved_fixed + n * self.saved_per
            i = (edges <= c[:, None]).sum(axis=1) - 1  # the last edge within the capacity
            j = np.minimum(i + 1, width - 1)
            rows = np.arange(c.size)
            low, high = edges[rows, i], edges[rows, j]
            frac = np.where(high > low, (c - low) / np.where(high > low, high - low, 1.0), 0.0)
            out[part] = saved[rows, i] + frac * (saved[rows, j] - saved[rows, i])
        return out
