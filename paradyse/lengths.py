"""Synthetic sequence-length distributions shaped like the paper's data sets (for benchmarks).

The paper gives two facts for GitHubCode (65.7% of sequences under 4K tokens, the longest 309K)
and one for GRCh38 (the longest 624K). The shapes between are our assumptions, stated here:
- `githubcode`: log-normal with sigma 1.6 and the median that puts 65.7% under 4096 tokens,
  cut at 309K (source files: most short, a long tail);
- `grch38`: log-uniform from 16K to 624K tokens (genome windows: all long).
Each sample holds the data set's longest sequence once, so the tail the planner must handle is
always there. The module itself needs only numpy (importing it through the `paradyse` package
loads torch too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["LengthDistribution", "LENGTH_DISTRIBUTIONS", "sample_lengths"]


@dataclass(frozen=True)
class LengthDistribution:
    name: str
    longest: int
    kind: str
    """'lognormal' (parameters: median, sigma) or 'loguniform' (parameters: shortest)."""
    median: float = 0.0
    sigma: float = 0.0
    shortest: int = 1
    source: str = ""

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "lognormal":
            values = np.exp(rng.normal(math.log(self.median), self.sigma, 4 * count + 16))
            values = values[(values >= 1) & (values <= self.longest)][:count]
        else:
            low, high = math.log(self.shortest), math.log(self.longest)
            values = np.exp(rng.uniform(low, high, count))
        return np.maximum(values.astype(np.int64), 1)


_Z_0657 = 0.4049  # the standard normal quantile of 0.657

LENGTH_DISTRIBUTIONS: dict[str, LengthDistribution] = {
    "githubcode": LengthDistribution(
        "githubcode", 309_000, "lognormal", median=4096 / math.exp(_Z_0657 * 1.6), sigma=1.6,
        source="paper: 65.7% under 4K tokens, longest 309K; log-normal shape assumed",
    ),
    "grch38": LengthDistribution(
        "grch38", 624_000, "loguniform", shortest=16_384,
        source="paper: longest 624K; log-uniform from 16K assumed",
    ),
}  # fmt: skip


def sample_lengths(name: str, count: int, seed: int = 0) -> list[int]:
    """`count` lengths of a named distribution in random order, the data set's longest among
    them; the same for a seed."""
    if name not in LENGTH_DISTRIBUTIONS:
        known = ", ".join(LENGTH_DISTRIBUTIONS)
        raise ValueError(f"unknown length distribution {name!r}; choose from {known}")
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    dist = LENGTH_DISTRIBUTIONS[name]
    rng = np.random.default_rng(seed)
    lengths = np.concatenate(([dist.longest], dist.sample(count - 1, rng)))
    return rng.permutation(lengths).tolist()
