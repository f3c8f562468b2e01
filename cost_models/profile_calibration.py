"""The profiler's calibration: real layer steps of every option, timed in interleaved rounds.

An option is a strategy on the whole sp group ('tp_sp') or on sub-groups of g ranks
('g2:ulysses', 'g1:local': `cost_models.group_size`). Per option and direction,
time = scale x the analytic time + overhead, fitted on real layer steps in every recompute mode
at the calibration lengths (`fit_calibration`). The scale is what the kernel and link
measurements miss inside a real step: per-op dispatch, contention between ranks sharing cores,
merges and copies that are not plain bandwidth, imperfect overlap, the weight gathers of
sub-groups.

**Interleaved rounds.** Every round times every case of every option once, the options' cases
dealt in turn (one of each option, then the next of each, ...) and the order rotating from round
to round; rounds go on until every option's scales (fitted on that round alone) have a spread
of at most the target, at least 3 and at most CALIBRATION_ROUNDS; the final fit is on each
case's median over the rounds. A machine whose speed wanders from second to
second (a shared virtual machine: one thread's matmul 27% relative IQR between bursts 2 s
apart, `benchmarks/machine_drift.py`) then weighs on every option alike, instead of on
whichever option it measured during a slow spell: the options' times relative to each other,
which the planner's choices depend on, hold.

Imports torch and parallel_lib (it runs `decoder_layer_step`, the function training runs), like
`cost_models.profile`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import zip_longest
from statistics import median

import torch
import torch.distributed as dist

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
from .profile_data import fit_calibration, store_calibration
from .stability import settle, spread
from .timing import slowest, synchronize

__all__ = [
    "CALIBRATION_ROUNDS", "Case", "calibration_cases", "calibrate", "step_once",
    "sub_group_strategies",
]  # fmt: skip

CALIBRATION_ROUNDS = 7
"""At most this many timings of every calibration step (at least 3)."""
DIRECTIONS = ("forward", "backward")


@dataclass
class Case:
    """One calibration step: an option's layer step in one recompute mode on one batch."""

    key: str
    """The calibration entry: 'tp_sp', 'g2:ulysses', ..."""
    recompute: str
    tokens: int
    step: Callable[[], torch.Tensor]
    dy: torch.Tensor
    analytic: tuple[float, float]
    """The unscaled model's forward and backward seconds."""
    times: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))


def step_once(step: Callable[[], torch.Tensor], dy) -> tuple[float, float]:
    """Forward and backward seconds (slowest rank) of one `step()` backpropagated with `dy`."""
    if dist.is_initialized():
        dist.barrier()
    synchronize(dy.device)
    start = time.perf_counter()
    y = step()
    synchronize(dy.device)
    middle = time.perf_counter()
    y.backward(dy)
    synchronize(dy.device)
    end = time.perf_counter()
    return slowest(middle - start, dy.device), slowest(end - middle, dy.device)


def sub_group_strategies(shape, names, g: int) -> list[str]:
    """The strategies of `names` the planner offers on sub-groups of g ranks."""
    return [n for n in names if runs_on_sub_groups(n, g) and get_strategy(n).supports(shape, g)[0]]


def _inputs(lengths, ranks: int, position: int, hidden: int, dtype, device) -> list:
    """(lens, layout, x, dy) per calibration batch on a group of `ranks` ranks at `position`."""
    points = []
    for lens in lengths:
        layout = ZigzagLayout([pad_length(n, ranks) for n in lens], ranks, position, device)
        x = torch.randn(layout.local_tokens, hidden, dtype=dtype, device=device)
        points.append((lens, layout, x.requires_grad_(), torch.randn_like(x)))
    return points


def calibration_cases(mesh, shape, dtype, lengths, raw) -> list[Case]:
    """Every option's cases: each strategy the model supports on the whole sp group, then on
    sub-groups of every g < P dividing P (what the planner offers there; every sub-group the
    same lengths), in every recompute mode at every calibration batch. `raw`: the unscaled
    CostModel."""
    P, dtype_label, cases = mesh.sp, dtype_name(dtype), []
    weights = LayerWeights.random(shape, P, dtype=dtype, device=mesh.device)
    points = _inputs(lengths, P, mesh.sp_rank, shape.hidden, dtype, mesh.device)
    for name in STRATEGIES:
        strategy = get_strategy(name)
        if not strategy.supports(shape, P)[0]:
            continue
        for recompute in RECOMPUTE_MODES:
            for lens, layout, x, dy in points:
                step = partial(decoder_layer_step, x, weights, layout, mesh.sp_group, strategy,
                               recompute)  # fmt: skip
                cost = raw.layer_cost(shape, name, recompute, lens, P, dtype=dtype_label)
                cases.append(Case(name, recompute, sum(lens), step, dy,
                                  (cost.forward_s, cost.backward_s)))  # fmt: skip
    for g in [d for d in range(1, P) if P % d == 0]:
        split = split_group(mesh.sp_group, g)
        points = _inputs(lengths, g, split.position, shape.hidden, dtype, mesh.device)
        for name in sub_group_strategies(shape, STRATEGIES, g):
            strategy = get_strategy(name)
            for recompute in RECOMPUTE_MODES:
                for lens, layout, x, dy in points:
                    step = partial(decoder_layer_step, x, weights, layout, split.compute,
                                   strategy, recompute, split)  # fmt: skip
                    cost = group_layer_cost(raw, shape, name, recompute, [lens] * split.groups,
                                            P, dtype=dtype_label, raw=True)  # fmt: skip
                    cases.append(Case(calibration_key(name, g), recompute, sum(lens), step, dy,
                                      (cost.forward_s, cost.backward_s)))  # fmt: skip
    return cases


def calibrate(cases: list[Case], profile, *, max_rounds: int = CALIBRATION_ROUNDS,
              timer: Callable = step_once) -> None:  # fmt: skip
    """Time `cases` in interleaved rounds (collective: every rank the same cases in the same
    order) and fill `profile.calibration`, its overhead, `calibration_points` and the scales'
    spreads ('calibration/KEY.forward', '.backward'). No cases: nothing to calibrate."""
    if not cases:
        return
    for case in cases:
        case.step().backward(case.dy)  # warm-up
    keys = list(dict.fromkeys(c.key for c in cases))
    by_key = [[c for c in cases if c.key == key] for key in keys]
    dealt = [c for turn in zip_longest(*by_key) for c in turn if c is not None]
    stride, rounds = max(1, len(dealt) // max(max_rounds, 1)), [0]

    def one_round() -> dict[str, float]:
        shift = rounds[0] * stride % len(dealt)
        rounds[0] += 1
        for case in dealt[shift:] + dealt[:shift]:
            for phase, seconds in enumerate(timer(case.step, case.dy)):
                case.times[phase].append(seconds)
        scales = {}
        for key, own in zip(keys, by_key, strict=True):
            for phase, direction in enumerate(DIRECTIONS):
                pairs = [(c.times[phase][-1], c.analytic[phase]) for c in own]
                scales[f"{key}.{direction}"] = fit_calibration(pairs)[0]
        return scales

    history = settle(one_round, target=profile.spread_target, max_rounds=max_rounds)
    for key in keys:
        rows = []
        for recompute in RECOMPUTE_MODES:
            own = [c for c in cases if c.key == key and c.recompute == recompute]
            part = [[c.tokens, median(c.times[0]), median(c.times[1]), *c.analytic] for c in own]
            if part:
                profile.calibration_points[f"{key}/{recompute}"] = part
                rows += part
        store_calibration(profile, key, rows)
    for name, scales in history.items():
        profile.spread[f"calibration/{name}"] = spread(scales)
