"""Validation of the group size per micro-batch: real layer steps on sub-groups of g ranks beside
`group_layer_cost`'s prediction (`python -m cost_models.validate --group-sizes ...`).

The micro-batch of `cost_models.validate.batch_lengths` is dealt to the P/g sub-groups as the
planner deals it (`assign_sequences` over `sequence_costs`), each sub-group runs the strategy at
P = g on its share with the layer's weights gathered from the P/g ranks holding their 1/P pieces
(`parallel_lib.decoder_layer_step(..., split)`), and the slowest rank's median time and the
largest rank's peak memory are set beside the prediction. What the planner offers on sub-groups
is what is measured: `local` alone at g = 1, every other strategy but usp where it supports g.
Imports torch and parallel_lib, like `cost_models.validate`.
"""

from __future__ import annotations

from functools import partial

import torch

from parallel_lib import (
    LayerWeights,
    ZigzagLayout,
    decoder_layer_step,
    get_strategy,
    pad_length,
    split_group,
)

from .counts import dtype_name
from .group_size import (
    IDLE_LENGTHS,
    assign_sequences,
    group_layer_cost,
    sequence_costs,
)
from .profile import step_times
from .profile_calibration import sub_group_strategies
from .validate_cells import Cell, batch_lengths, largest, measured_peak, predicted_peak

__all__ = ["validate_sub_groups"]


def validate_sub_groups(
    mesh,
    shape,
    model,
    strategies,
    recomputes,
    token_counts,
    sequences,
    group_sizes,
    dtype=torch.float32,
    repeats: int = 3,
) -> list:
    """Cells named 'gN:STRATEGY' for every g < P of `group_sizes` (collective: every rank calls
    it); the strategies offered on g ranks among `strategies`."""
    P = mesh.sp
    generator = torch.Generator().manual_seed(0)
    weights = LayerWeights.random(shape, P, dtype=dtype, device=mesh.device)
    cells = []
    for g in [g for g in group_sizes if g < P]:
        split = split_group(mesh.sp_group, g)
        for tokens in token_counts:
            lens = batch_lengths(tokens, sequences)
            dealt = assign_sequences(sequence_costs(shape, lens), split.groups)
            groups = [[lens[i] for i in share] for share in dealt]
            mine = groups[split.index] or list(IDLE_LENGTHS)  # one token, as the engine
            layout = ZigzagLayout([pad_length(n, g) for n in mine], g, split.position,
                                  mesh.device)  # fmt: skip
            x = torch.randn(layout.local_tokens, shape.hidden, generator=generator, dtype=dtype)
            x = x.to(mesh.device).requires_grad_()
            dy = torch.randn(layout.local_tokens, shape.hidden, generator=generator, dtype=dtype)
            dy = dy.to(mesh.device)
            for name in sub_group_strategies(shape, strategies, g):
                strategy = get_strategy(name)
                for recompute in recomputes:
                    step = partial(decoder_layer_step, x, weights, layout, split.compute,
                                   strategy, recompute, split)  # fmt: skip
                    fwd, bwd = step_times(step, dy, repeats)
                    cost = group_layer_cost(model, shape, name, recompute, groups, P,
                                            dtype=dtype_name(dtype))  # fmt: skip
                    peak = largest(measured_peak(step, weights, x, dy, mesh.device), mesh.device)
                    predicted = largest(predicted_peak(cost, weights, x), mesh.device)
                    cells.append(Cell(f"g{g}:{name}", recompute, tokens, fwd + bwd, cost.time_s,
                                      peak, predicted))  # fmt: skip
    return cells
