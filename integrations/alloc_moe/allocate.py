"""Alloc-L's layer allocation (DESIGN 10): a grouped knapsack over the MoE layers.

Each MoE layer i picks how many experts K_i its tokens keep (1 <= K_i <= K_orig); a budget B
caps the activations per token summed over layers, `sum_i K_i <= B`; the cost of a choice is the
calibration perplexity `S[i][K_i - 1]` measured with layer i alone reduced to K_i (see
`integrations.alloc_moe.files` for the profile's file). The dynamic program

    DP[i, b] = min_{1 <= k <= min(K, b)} DP[i-1, b-k] + S[i][k-1]     (exactly b activations)

is exact and costs O(L B K) additions, nothing like the K^L of trying every allocation.
"""

from __future__ import annotations

import math
import operator

__all__ = ["allocate_layers", "check_budget", "sensitivity_matrix", "uniform_allocation"]


def sensitivity_matrix(S) -> list[list[float]]:
    """S (a list of rows, or anything iterable like one: numpy, torch) as an L x K list of
    floats; ValueError, one line, when it is empty, ragged or holds a non-finite value."""
    try:
        rows = [[float(v) for v in row] for row in S]
    except (TypeError, ValueError) as error:
        raise ValueError(f"the sensitivity matrix must be rows of numbers: {error}") from None
    if not rows or not rows[0]:
        raise ValueError("the sensitivity matrix is empty: it needs one row per MoE layer")
    widths = sorted({len(row) for row in rows})
    if len(widths) > 1:
        raise ValueError(
            f"the sensitivity matrix is ragged (rows of {widths} values): every MoE layer needs "
            "one value per k = 1..K_orig"
        )
    for i, row in enumerate(rows):
        for k, value in enumerate(row, 1):
            if not math.isfinite(value):
                raise ValueError(f"the sensitivity matrix holds {value} at layer {i}, k={k}")
    return rows


def check_budget(budget, layers: int) -> int:
    """`budget` as an int of at least `layers` (every MoE layer keeps one expert at least)."""
    if isinstance(budget, bool):
        raise ValueError(f"the budget must be an integer, got {budget!r}")
    try:
        budget = operator.index(budget)
    except TypeError:
        raise ValueError(f"the budget must be an integer, got {budget!r}") from None
    if budget < layers:
        raise ValueError(
            f"the budget {budget} is below the {layers} MoE layers: every layer keeps one "
            f"expert at least, so the budget must be at least {layers}"
        )
    return budget


def allocate_layers(S, budget: int) -> list[int]:
    """The allocation [K_0, ..., K_{L-1}] minimising `sum_i S[i][K_i - 1]` subject to
    `sum_i K_i <= budget` and `1 <= K_i <= len(S[i])` (S: L rows of K_orig calibration
    perplexities, `S[i][k-1]` with layer i at top-k). A budget above L * K_orig allows every
    layer its K_orig.

    Ties (allocations of equal cost; "equal" in float arithmetic, sums taken in layer order)
    are broken deterministically: first the fewest total activations (a cheaper forward at the
    same quality), then the deepest layers keep the fewest experts, i.e. the lexicographically
    smallest (K_{L-1}, ..., K_0), which leans towards the shallow layers the paper finds more
    sensitive. ValueError, one line: a budget below L, an empty, ragged or non-finite S."""
    rows = sensitivity_matrix(S)
    L, K = len(rows), len(rows[0])
    top = min(check_budget(budget, L), L * K)
    # best[i][b]: least cost of layers 0..i-1 using exactly b activations (inf: impossible)
    best = [[0.0] + [math.inf] * top]
    for row in rows:
        prev, cur = best[-1], [math.inf] * (top + 1)
        for b in range(1, top + 1):
            for k in range(1, min(K, b) + 1):
                cost = prev[b - k] + row[k - 1]
                if cost < cur[b]:
                    cur[b] = cost
        best.append(cur)
    # the least cost at any total b <= budget; among equal costs the fewest activations
    b = min(range(L, top + 1), key=lambda total: (best[L][total], total))
    allocation = [0] * L
    for i in reversed(range(L)):  # deepest first, each taking the fewest experts that stay optimal
        allocation[i] = next(
            k
            for k in range(1, min(K, b) + 1)
            if best[i][b - k] + rows[i][k - 1] == best[i + 1][b]  # the same sum as above: exact
        )
        b -= allocation[i]
    return allocation


def uniform_allocation(budget: int, layers: int, top_k: int) -> list[int]:
    """The uniform reduced top-k under a budget: every layer `budget // layers` experts, and
    the `budget % layers` shallowest layers one more (so the budget is used to the last
    activation when it is no multiple of the layer count); capped at `top_k` per layer."""
    budget = check_budget(budget, layers)
    share, extra = divmod(min(budget, layers * top_k), layers)
    return [share + (i < extra) for i in range(layers)]
