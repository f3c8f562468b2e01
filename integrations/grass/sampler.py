"""GRASS's layer importance and sampling, as plain numpy on plain numbers (no torch, no ranks):
every rank feeds it the same global gradient norms, so every rank draws the same layers.

- A layer's importance is its mean gradient norm (MGN) over a window of steps:
  m_l = (1/T) sum_t sqrt(||g_t^(l)||^2 / N_l), N_l the layer's parameter count.
- Probing fills every m_l from the first `probe_steps` steps (every layer's gradient, no update).
- Every `period` steps `gamma` layers are drawn without replacement with
  p_l = softmax(m_l / tau) (optionally mixed with a uniform floor); after their window the drawn
  layers refresh m_l <- alpha * m_l(window) + (1 - alpha) * m_l; the others keep theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["MeanGradientNorms", "sampling_probabilities"]


def sampling_probabilities(
    mgn: Sequence[float], tau: float, *, relative: bool = True, floor: float = 0.0
) -> np.ndarray:
    """softmax(m / t) with t = tau * mean(m) (`relative`, scale-free) or t = tau, then mixed
    with the uniform distribution so that every layer keeps at least `floor`."""
    m = np.asarray(mgn, dtype=np.float64)
    scale = tau * float(m.mean()) if relative else tau
    if not scale > 0:  # every m is 0 (no gradient yet): nothing tells the layers apart
        p = np.full(len(m), 1.0 / len(m))
    else:
        z = m / scale
        p = np.exp(z - z.max())
        p /= p.sum()
    if floor > 0:
        p = (1 - floor * len(p)) * p + floor
    return p


class MeanGradientNorms:
    """Per-layer MGN values and the window sums they are refreshed from."""

    def __init__(self, layers: int, numels: Sequence[int]) -> None:
        if len(numels) != layers:
            raise ValueError(f"{layers} layers but {len(numels)} parameter counts")
        self.numels = np.asarray(numels, dtype=np.float64)
        self.values: np.ndarray = np.full(layers, np.nan)
        """m_l; NaN until the layer has been measured once."""
        self.sums = np.zeros(layers)
        self.counts = np.zeros(layers, dtype=np.int64)

    def record(self, layer_grad_norms: Sequence[float | None]) -> None:
        """Add one step's global gradient norms (None: the layer was frozen)."""
        for i, norm in enumerate(layer_grad_norms):
            if norm is not None and np.isfinite(norm):
                self.sums[i] += np.sqrt(norm * norm / self.numels[i])
                self.counts[i] += 1

    def close_window(self, layers: Sequence[int] | None, alpha: float) -> None:
        """End a window: `layers` (None: every layer) measured in it refresh their MGN (the first
        measurement is taken as it is); the sums start again."""
        chosen = range(len(self.values)) if layers is None else layers
        for i in chosen:
            if self.counts[i] == 0:
                continue
            window = self.sums[i] / self.counts[i]
            old = self.values[i]
            self.values[i] = window if np.isnan(old) else alpha * window + (1 - alpha) * old
        self.sums[:] = 0.0
        self.counts[:] = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "values": [None if np.isnan(v) else float(v) for v in self.values],
            "sums": self.sums.tolist(),
            "counts": self.counts.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = np.array([np.nan if v is None else v for v in state["values"]], np.float64)
        self.sums = np.asarray(state["sums"], dtype=np.float64)
        self.counts = np.asarray(state["counts"], dtype=np.int64)
