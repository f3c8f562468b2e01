"""The profiler's calibration of strategies run on sub-groups of g ranks (`parallel_lib`'s
group_size).

For every g dividing P (g < P) and every strategy that runs on g ranks, real layer steps of a
micro-batch dealt to the P/g sub-groups (each sub-group the same calibration lengths) are timed
against `group_layer_cost`'s unscaled prediction, and the scale is stored as the profile's
calibration entry 'gN:STRATEGY'. It captures what sub-groups do differently from the whole group
on this machine: P/g sub-groups computing at once on shared cores, the weight gathers.
Imports torch and parallel_lib (it runs `decoder_layer_step`), like `cost_models.profile`.
"""

from __future__ import annotations

from functools import partial

import torch

from parallel_lib import (
    RECOMPUTE_MODES,
    LayerWeights,
    ZigzagLayout,
    decoder_layer_step,
    get_strategy,
    pad_length,
    split_group,
)

from .counts import STRATEGIES, dtype_name
from .group_size import calibration_key, group_layer_cost, runs_on_sub_groups
from .profile_data import store_calibration

__all__ = ["calibrate_sub_groups"]


def calibrate_sub_groups(mesh, shape, dtype, profile, lengths, raw, step_times) -> None:
    """Fill `profile.calibration['gN:NAME']`, its overhead (`store_calibration`) and its points
    for every g < P: `lengths` are the calibration batches of one sub-group, `raw` the
    unscaled CostModel, `step_times(step, dy)` the profiler's timer."""
    P = mesh.sp
    weights = LayerWeights.random(shape, P, dtype=dtype, device=mesh.device)
    for g in [d for d in range(1, P) if P % d == 0]:
        split = split_group(mesh.sp_group, g)
        points = []
        for lens in lengths:
            layout = ZigzagLayout([pad_length(n, g) for n in lens], g, split.position,
                                  mesh.device)  # fmt: skip
            x = torch.randn(layout.local_tokens, shape.hidden, dtype=dtype, device=mesh.device)
            points.append((lens, layout, x.requires_grad_(), torch.randn_like(x)))
        for name in STRATEGIES:
            strategy = get_strategy(name)
            if not (runs_on_sub_groups(name, g) and strategy.supports(shape, g)[0]):
                continue  # what the planner offers on sub-groups
            rows = []
            for recompute in RECOMPUTE_MODES:
                for lens, layout, x, dy in points:
                    step = partial(decoder_layer_step, x, weights, layout, split.compute,
                                   strategy, recompute, split)  # fmt: skip
                    fwd, bwd = step_times(step, dy)
                    cost = group_layer_cost(raw, shape, name, recompute, [lens] * split.groups,
                                            P, dtype=dtype_name(dtype), raw=True)  # fmt: skip
                    rows.append([sum(lens), fwd, bwd, cost.forward_s, cost.backward_s])
                key = calibration_key(name, g)
                profile.calibration_points[f"{key}/{recompute}"] = rows[-len(points) :]
            store_calibration(profile, calibration_key(name, g), rows)
