"""Pricing a micro-batch run on sub-groups of g ranks (`parallel_lib.group_size`).

Sub-group o runs the strategy at P = g on its own sequences; the sub-groups meet at every layer's
weight gather (each 1/g shard is gathered from the P/g ranks holding its 1/P pieces, one of them
in each sub-group), so a layer costs what its slowest sub-group costs, plus that gather (where
the ranks share fewer cores than there are ranks, as 4 CPU processes on 2 cores do, a sub-group
done early hands its cores to the others: `shared_makespan`):

    forward   all-gather of the layer's weight shards over P/g ranks (sends (P/g - 1) n), one
              call for attention's two shards and one for the MLP's
    backward  reduce-scatter of their gradients (trainable layers only: two calls), and the
              gathers again for what the recompute mode recomputes (full: both; selective: the
              MLP's)

The gathered 1/g shards are held like any operand: saved for the backward where the layer keeps
its matmul inputs (none: all; selective: attention's), a transient otherwise; their gradients are
one more transient before the reduce-scatter.
"""

from __future__ import annotations

from collections.abc import Sequence

from .counts import _projections, attention_flops, layer_flops
from .model import Cost, CostModel
from .units import itemsize

__all__ = [
    "assign_sequences", "calibration_key", "runs_on_sub_groups", "sequence_costs",
    "gather_traffic", "group_layer_cost", "shared_makespan", "IDLE_LENGTHS",
]  # fmt: skip


IDLE_LENGTHS = (1,)
"""What a sub-group dealt no sequence trains: one token with no target, so that its ranks still
take part in the weight gathers and gradient reduce-scatters (`paradyse.Engine.pack`). It adds
nothing to the loss or the gradients, and on ranks that share cores it frees them for the other
sub-groups (`shared_makespan`)."""


def sequence_costs(shape, seq_lens: Sequence[int]) -> list[float]:
    """Per sequence, one layer's forward FLOPs (projections and causal attention): what the
    sequences are dealt to sub-groups by (`assign_sequences`)."""
    per_token = sum(v for k, v in layer_flops(shape, [1])[0].items() if k != "attention")
    return [per_token * n + attention_flops([n], shape.heads, shape.head_dim) for n in seq_lens]


def assign_sequences(costs: Sequence[float], groups: int) -> list[list[int]]:
    """Indices of the sequences each of `groups` groups trains, balanced by predicted cost:
    longest-processing-time greedy (the costliest first, ties by index, each to the least
    loaded group, ties by fewer sequences, then the lower group), so the largest load is within
    4/3 of the optimum and, with at least `groups` sequences, none is empty. Each group's
    indices are sorted. Deterministic: every rank computes the same assignment (the sub-groups
    of a micro-batch, the dp groups of a step). With fewer sequences than groups the last
    groups are empty."""
    if groups < 1:
        raise ValueError(f"need at least one group, got {groups}")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    loads = [0.0] * groups
    members: list[list[int]] = [[] for _ in range(groups)]
    for i in order:
        target = min(range(groups), key=lambda k: (loads[k], len(members[k]), k))
        loads[target] += costs[i]
        members[target].append(i)
    return [sorted(m) for m in members]


def _shard_numels(shape, P: int) -> tuple[int, int]:
    """Elements of one rank's 1/P attention and MLP weight shards (norms are replicated)."""
    sizes = {op: i * o for op, (i, o) in _projections(shape).items()}
    return (sizes["qkv"] + sizes["out"]) // P, (sizes["gate_up"] + sizes["down"]) // P


def _gathered_numels(shape, P: int, g: int) -> tuple[int, int]:
    """Elements of the attention and MLP 1/g shards a rank gathers."""
    attention, mlp = _shard_numels(shape, P)
    return attention * (P // g), mlp * (P // g)


def gather_traffic(shape, P: int, g: int, dtype, recompute: str, trainable: bool = True):
    """(forward, backward) as {kind: (bytes sent, calls)} for the weight gathers of one layer on
    sub-groups of g (the convention of `parallel_lib.CommCounter`)."""
    u = P // g
    if u == 1:
        return {}, {}
    e = itemsize(dtype)
    attention, mlp = _shard_numels(shape, P)
    sent = {"attention": (u - 1) * attention * e, "mlp": (u - 1) * mlp * e}
    forward = {"all_gather": (sent["attention"] + sent["mlp"], 2)}  # one call per half
    regathered = {"full": ("attention", "mlp"), "selective": ("mlp",)}.get(recompute, ())
    backward = {}
    if regathered:
        backward["all_gather"] = (sum(sent[p] for p in regathered), len(regathered))
    if trainable:  # the gathered gradients' reduce-scatter: (u - 1)/u of u n bytes
        backward["reduce_scatter"] = (sent["attention"] + sent["mlp"], 2)
    return forward, backward


def runs_on_sub_groups(strategy: str, g: int) -> bool:
    """Whether `strategy` is offered on sub-groups of g ranks (where its shape allows): `local`
    alone at g = 1, every other strategy but usp above (a sub-group has no 2-D split). The
    planner's options, the profiler's calibration and the validation all follow it."""
    return strategy != "usp" and (g == 1) == (strategy == "local")


def calibration_key(strategy: str, g: int) -> str:
    """The profile's calibration entry of `strategy` run on sub-groups of g ranks."""
    return f"g{g}:{strategy}"


def _max_cost(costs: Sequence[Cost]) -> Cost:
    """The slowest sub-group's time and the largest memory of any (field by field)."""
    return Cost(**{f: max(getattr(c, f) for c in costs) for f in Cost.__dataclass_fields__})


def shared_makespan(times: Sequence[float], g: int, cores: float | None) -> float:
    """When the last of the sub-groups finishes, sub-group o taking `times[o]` with every rank
    of the group busy, when its P = g len(times) ranks share `cores` (fewer than P; None: a
    device each, and the slowest sub-group sets the time). Every busy rank gets an equal share
    of the cores, at most one: each rank of sub-group o has times[o] cores/P core-seconds of
    work, and as sub-groups finish the others speed up (processor sharing). Equal times give
    the time back: the calibration measured every rank busy."""
    P = g * len(times)
    if cores is not None and not cores > 0:
        raise ValueError(f"cores must be positive, got {cores}")
    if cores is None or cores >= P or len(times) < 2:
        return max(times)
    clock = done = 0.0
    for k, work in enumerate(sorted(t * cores / P for t in times)):
        busy = g * (len(times) - k)
        clock += (work - done) / min(1.0, cores / busy)
        done = work
    return clock


def group_layer_cost(
    model: CostModel,
    shape,
    strategy: str,
    recompute: str,
    groups: Sequence[Sequence[int]],
    P: int,
    *,
    dtype="float32",
    inner: int | None = None,
    nodes_spanned: int = 1,
    trainable: bool = True,
    raw: bool = False,
) -> Cost:
    """One layer on one rank when the sp group of P runs as len(groups) sub-groups of
    g = P / len(groups) ranks, sub-group o on the sequences `groups[o]` (unpadded lengths; an
    empty one trains `IDLE_LENGTHS`).
    The time is scaled by the profile's calibration of the strategy on sub-groups of g, and its
    overhead added (`calibration_key`; the strategy's own where the profile has none); `raw`:
    neither (what the profiler fits that calibration against)."""
    if not groups or P % len(groups):
        raise ValueError(f"{len(groups)} sub-groups do not divide sp={P}")
    g = P // len(groups)
    kw = {"dtype": dtype, "inner": inner, "nodes_spanned": nodes_spanned,
          "trainable": trainable, "calibration": "" if g < P else None}  # fmt: skip
    costs = [model.layer_cost(shape, strategy, recompute, lens or IDLE_LENGTHS, g, **kw)
             for lens in groups]  # fmt: skip
    cost = _max_cost(costs)
    if g == P:
        return cost
    cores = model.shared_cores(P, nodes_spanned)
    shared = {d: shared_makespan([getattr(c, d) for c in costs], g, cores)
              for d in ("forward_s", "backward_s")}  # fmt: skip
    forward, backward = gather_traffic(shape, P, g, dtype, recompute, trainable)
    u = P // g
    seconds = {
        d: sum(model.collective_seconds(k, u, b, c, nodes_spanned) for k, (b, c) in t.items())
        for d, t in (("forward", forward), ("backward", backward))
    }
    e = itemsize(dtype)
    attention, mlp = (n * e for n in _gathered_numels(shape, P, g))
    kept = {"none": attention + mlp, "selective": attention}.get(recompute, 0)
    transient = attention + mlp - kept + (attention + mlp if trainable else 0)
    sent = sum(b for t in (forward, backward) for b, _ in t.values())
    key = calibration_key(strategy, g)
    scale = (1.0, 1.0) if raw else model.scales(key, strategy)
    overhead = (0.0, 0.0) if raw else model.overheads(key, strategy)
    return Cost(
        forward_s=scale[0] * (shared["forward_s"] + seconds["forward"]) + overhead[0],
        backward_s=scale[1] * (shared["backward_s"] + seconds["backward"]) + overhead[1],
        compute_s=cost.compute_s,
        comm_s=cost.comm_s + seconds["forward"] + seconds["backward"],
        saved_bytes=cost.saved_bytes + kept,
        transient_bytes=cost.transient_bytes + transient,
        forward_peak_bytes=cost.forward_peak_bytes + attention + mlp,
        backward_peak_bytes=cost.backward_peak_bytes + transient,
        comm_bytes=cost.comm_bytes + sent,
        flops=cost.flops,
    )
