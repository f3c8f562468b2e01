"""The measured coefficients of the cost model: a versioned JSON profile and its fitted curves.

Written by `python -m cost_models.profile`, read by `CostModel`. Pure Python.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Profile", "ProfileError", "Curve", "LinkFit", "SCHEMA", "VERSION", "SPREAD_TARGET",
    "fit_calibration", "store_calibration",
]  # fmt: skip

SCHEMA = "paradyse.cost_profile"
VERSION = 2
"""2 added the conditions of the measurement and each coefficient's spread."""
READABLE = (1, 2)
"""Versions this ParaDySe reads (a version-1 file has no conditions and no spreads)."""
SPREAD_TARGET = 0.10
"""A coefficient is pinned down when its spread (IQR / median of its rounds) is at most this."""


class ProfileError(ValueError):
    """A profile file that cannot be used; the message is one line saying what to do."""


class Curve:
    """Seconds of one call as a function of its FLOPs (or bytes), from measured points:
    piecewise linear in log-log between points, a constant rate beyond the largest and a
    constant time (the call's fixed cost) below the smallest."""

    def __init__(self, points: Sequence[Sequence[float]]) -> None:
        merged: dict[float, list[float]] = {}
        for x, t in points:
            if x > 0 and t > 0:
                merged.setdefault(float(x), []).append(math.log(t))
        pts = sorted((x, math.exp(sum(ts) / len(ts))) for x, ts in merged.items())
        if len(pts) < 2:
            raise ProfileError("a curve needs at least two positive points")
        self.points = pts
        self._logx = [math.log(x) for x, _ in pts]
        self._logt = [math.log(t) for _, t in pts]

    def __call__(self, x: float) -> float:
        if x <= 0:
            return 0.0
        (x0, t0), (x1, t1) = self.points[0], self.points[-1]
        if x <= x0:
            return t0
        if x >= x1:
            return t1 * x / x1
        lx = math.log(x)
        j = bisect.bisect_right(self._logx, lx)
        f = (lx - self._logx[j - 1]) / (self._logx[j] - self._logx[j - 1])
        return math.exp(self._logt[j - 1] + f * (self._logt[j] - self._logt[j - 1]))

    def to_list(self) -> list[list[float]]:
        return [[x, t] for x, t in self.points]


@dataclass(frozen=True)
class LinkFit:
    """time = alpha + bytes / beta for one collective kind on one group size."""

    alpha: float
    """Seconds per call."""
    beta: float
    """Bytes per second (bytes this rank sends)."""

    def __call__(self, nbytes: float, calls: int = 1) -> float:
        return calls * self.alpha + nbytes / self.beta

    @classmethod
    def fit(cls, samples: Sequence[tuple[float, float]]) -> LinkFit:
        """Least squares of time on bytes, weighted by 1/time^2 (relative errors count, so the
        small messages fix alpha and the large ones beta); alpha >= 0. Where even the largest
        message spent under a quarter of its time transferring (flat, latency-bound samples),
        beta cannot be told from noise and is the largest message's bytes/time instead: never
        a link faster than any transfer measured."""
        samples = [(b, t) for b, t in samples if t > 0 and b >= 0]
        if not samples:
            raise ProfileError("a link fit needs at least one positive time")
        largest, largest_t = max(samples)
        observed = largest / largest_t if largest > 0 else 1e30
        w = [1.0 / t**2 for _, t in samples]
        sw = sum(w)
        mx = sum(wi * b for wi, (b, _) in zip(w, samples, strict=True)) / sw
        mt = sum(wi * t for wi, (_, t) in zip(w, samples, strict=True)) / sw
        sxx = sum(wi * (b - mx) ** 2 for wi, (b, _) in zip(w, samples, strict=True))
        sxt = sum(wi * (b - mx) * (t - mt) for wi, (b, t) in zip(w, samples, strict=True))
        slope = sxt / sxx if sxx else 0.0
        alpha = mt - slope * mx
        if slope <= 0 or alpha < 0:  # refit through the origin (pure bandwidth)
            sbb = sum(wi * b * b for wi, (b, _) in zip(w, samples, strict=True))
            sbt = sum(wi * b * t for wi, (b, t) in zip(w, samples, strict=True))
            alpha, slope = (0.0, sbt / sbb) if sbb else (mt, 0.0)
        alpha = max(alpha, 0.0)
        if slope <= 0 or largest_t - alpha < 0.25 * largest_t:
            return cls(alpha=alpha, beta=observed)
        return cls(alpha=alpha, beta=1.0 / slope)


def _listed(curve: Curve | None) -> list | None:
    return None if curve is None else curve.to_list()


def _curve(points) -> Curve | None:
    return None if points is None else Curve(points)


@dataclass
class Profile:
    """Coefficients measured on one machine, backend and dtype."""

    machine: dict
    """What was measured: device, backend, world size, dtype, threads, torch version."""
    matmul: Curve
    attention_forward: Curve
    attention_backward: Curve
    elementwise: LinkFit
    """Memory-bound ops: seconds for bytes read and written."""
    collectives: dict[str, dict[int, LinkFit]]
    """kind -> group size -> fit."""
    calibration: dict[str, tuple[float, float]] = field(default_factory=dict)
    """strategy -> (forward scale, backward scale): a layer's time is scale x the analytic
    time + the overhead, fitted on real layer steps (see cost_models.profile)."""
    calibration_overhead: dict[str, tuple[float, float]] = field(default_factory=dict)
    """strategy -> (forward, backward) seconds a layer step takes beyond scale x the analytic
    time, whatever its size (dispatch, Python, synchronisation); absent: 0."""
    reduce_scatter_copy: bool = False
    """The backend copies a reduce-scatter's input (gloo)."""
    calibration_points: dict[str, list] = field(default_factory=dict)
    """The layer steps the calibration was fitted on, for inspection: 'strategy/recompute' ->
    [[tokens, measured forward s, measured backward s, analytic forward s, analytic backward
    s], ...]."""
    attention_forward_full: Curve | None = None
    """Attention blocks without a causal mask (ring steps off the diagonal); None: the causal
    curves serve."""
    attention_backward_full: Curve | None = None
    overlap: float = 1.0
    """Fraction of the shorter of compute and point-to-point traffic hidden under the other when
    both are in flight (1 on GPUs with copy engines; less where communication takes CPU)."""
    conditions: dict = field(default_factory=dict)
    """What the machine was doing while it was measured (`cost_models.stability.
    conditions_record`): load averages, other processes' cores, threads, CPU count, host, time;
    empty for a version-1 profile."""
    spread: dict[str, float] = field(default_factory=dict)
    """Coefficient name -> the spread its measurement reached (IQR / median of its rounds; the
    overlap's is absolute), e.g. 'p2p/4.alpha', 'matmul', 'calibration/ring.forward'."""
    spread_target: float = SPREAD_TARGET
    """The spread the profiler aimed for; coefficients above it were not pinned down."""

    def problem(self) -> str | None:
        """Why these coefficients cannot be used, or None."""
        for kind, fits in self.collectives.items():
            for size, f in fits.items():
                if not (f.alpha >= 0 and f.beta > 0) or size < 1:
                    return f"{kind} on {size} ranks has alpha={f.alpha}, beta={f.beta}"
        if not (self.elementwise.alpha >= 0 and self.elementwise.beta > 0):
            return f"elementwise bandwidth {self.elementwise.beta} is not positive"
        if not 0.0 <= self.overlap <= 1.0:
            return f"overlap {self.overlap} is outside [0, 1]"
        for name, scales in self.calibration.items():
            if not all(k > 0 for k in scales):
                return f"calibration of {name} {scales} is not positive"
        for name, seconds in self.calibration_overhead.items():
            if not all(c >= 0 for c in seconds):
                return f"calibration overhead of {name} {seconds} is negative"
        return None

    def check_matches(self, *, dtype: str, sp: int | None = None) -> None:
        """ProfileError (one line) when this profile was measured for another dtype or group
        size than the run that wants to use it."""
        measured = self.machine.get("dtype")
        if measured is not None and measured != dtype:
            raise ProfileError(
                f"the profile was measured in {measured}, the run computes in {dtype}; "
                f"profile again with --dtype {dtype}"
            )
        size = self.machine.get("sp")
        if sp is not None and size is not None and size != sp:
            raise ProfileError(
                f"the profile was measured on sp={size}, the run uses sp={sp}; profile again "
                "with the run's group size"
            )

    def attention(self, direction: str, causal: bool) -> Curve:
        full = getattr(self, f"attention_{direction}_full")
        return getattr(self, f"attention_{direction}") if causal or full is None else full

    def collective(self, kind: str, group_size: int) -> LinkFit:
        """The fit for `kind` on a group of `group_size`. A size the profile lacks uses the
        nearest profiled size of that kind (profile on the group sizes you train with); a kind
        it lacks uses the all-gather fit."""
        table = self.collectives.get(kind) or self.collectives.get("all_gather")
        if not table:
            raise ProfileError(f"the profile has no {kind} measurements; profile again")
        if group_size in table:
            return table[group_size]
        nearest = min(table, key=lambda p: (abs(math.log(p / group_size)), -p))
        return table[nearest]

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "version": VERSION,
            "machine": self.machine,
            "matmul": self.matmul.to_list(),
            "attention_forward": self.attention_forward.to_list(),
            "attention_backward": self.attention_backward.to_list(),
            "elementwise": {"alpha": self.elementwise.alpha, "beta": self.elementwise.beta},
            "collectives": {
                kind: {str(p): {"alpha": f.alpha, "beta": f.beta} for p, f in fits.items()}
                for kind, fits in self.collectives.items()
            },
            "calibration": {k: list(v) for k, v in self.calibration.items()},
            "calibration_overhead": {k: list(v) for k, v in self.calibration_overhead.items()},
            "calibration_points": self.calibration_points,
            "reduce_scatter_copy": self.reduce_scatter_copy,
            "attention_forward_full": _listed(self.attention_forward_full),
            "attention_backward_full": _listed(self.attention_backward_full),
            "overlap": self.overlap,
            "conditions": self.conditions,
            "spread": self.spread,
            "spread_target": self.spread_target,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "profile") -> Profile:
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ProfileError(f"{source} is not a ParaDySe cost profile (no schema {SCHEMA!r})")
        if data.get("version") not in READABLE:
            raise ProfileError(
                f"{source} has schema version {data.get('version')!r}, this ParaDySe reads "
                f"versions {', '.join(map(str, READABLE))}; run python -m cost_models.profile again"
            )
        try:
            collectives = {
                kind: {int(p): LinkFit(float(f["alpha"]), float(f["beta"])) for p, f in t.items()}
                for kind, t in data["collectives"].items()
            }
            profile = cls(
                machine=dict(data["machine"]),
                matmul=Curve(data["matmul"]),
                attention_forward=Curve(data["attention_forward"]),
                attention_backward=Curve(data["attention_backward"]),
                elementwise=LinkFit(
                    float(data["elementwise"]["alpha"]), float(data["elementwise"]["beta"])
                ),
                collectives=collectives,
                calibration={k: (float(v[0]), float(v[1])) for k, v in data["calibration"].items()},
                reduce_scatter_copy=bool(data["reduce_scatter_copy"]),
                calibration_overhead={
                    k: (float(v[0]), float(v[1]))
                    for k, v in (data.get("calibration_overhead") or {}).items()
                },
                calibration_points=dict(data.get("calibration_points", {})),
                attention_forward_full=_curve(data.get("attention_forward_full")),
                attention_backward_full=_curve(data.get("attention_backward_full")),
                overlap=float(data.get("overlap", 1.0)),
                conditions=dict(data.get("conditions") or {}),
                spread={k: float(v) for k, v in (data.get("spread") or {}).items()},
                spread_target=float(data.get("spread_target", SPREAD_TARGET)),
            )
        except ProfileError as e:
            raise ProfileError(
                f"{source} is corrupt: {e}; run python -m cost_models.profile"
            ) from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise ProfileError(
                f"{source} is corrupt ({type(e).__name__}: {e}); "
                "run python -m cost_models.profile again"
            ) from None
        problem = profile.problem()
        if problem:
            raise ProfileError(f"{source} is corrupt: {problem}; run python -m cost_models.profile")
        return profile

    def save(self, path: str | Path) -> None:
        """Write atomically (a temporary file renamed over the target; removed on failure)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ProfileError(f"cannot read profile {path}: {e.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(
                f"{path} is corrupt (not JSON: {e.msg} at line {e.lineno}); "
                "run python -m cost_models.profile again"
            ) from None
        return cls.from_dict(data, source=str(path))


def fit_calibration(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """(k, c) minimising sum((k x analytic + c - measured) / measured)^2 over (measured,
    analytic) pairs, with c >= 0 seconds and k clamped to [0.25, 4]. The fixed cost of a layer
    step (dispatch, Python, synchronisation) shows in the smallest steps and the scale in the
    largest, so a single scale fitted on both over-prices long steps by the short ones' excess.
    c = 0 (the scale alone) where the fit would make it negative."""
    rows = [(a / m, 1.0 / m) for m, a in pairs if m > 0]  # (analytic, 1) relative to measured
    sa, sb = sum(a for a, _ in rows), sum(b for _, b in rows)
    saa, sab, sbb = (sum(a * a for a, _ in rows), sum(a * b for a, b in rows),
                     sum(b * b for _, b in rows))  # fmt: skip
    det = saa * sbb - sab * sab
    if det > 1e-12 * max(saa * sbb, 1e-300):
        k, c = (sa * sbb - sb * sab) / det, (saa * sb - sab * sa) / det
        if c >= 0 and 0.25 <= k <= 4.0:
            return k, c
    k = sa / max(saa, 1e-18)
    return min(max(k, 0.25), 4.0), 0.0


def store_calibration(profile: Profile, key: str, rows) -> None:
    """Fit and store the calibration entry `key` from rows [tokens, measured forward s,
    measured backward s, analytic forward s, analytic backward s]."""
    fits = [fit_calibration([(row[1 + phase], row[3 + phase]) for row in rows])
            for phase in (0, 1)]  # fmt: skip
    profile.calibration[key] = (fits[0][0], fits[1][0])
    profile.calibration_overhead[key] = (fits[0][1], fits[1][1])
