"""Validate the cost model on this machine: real layer steps against predictions.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 -m cost_models.validate \\
        [--profile profile.json] [--tokens 256,1024,4096,8192] [--strategies all] \\
        [--recompute none,selective,full] [--weights trainable,frozen] [--sequences 2] \\
        [--moe E,K,F_E[,F_S] [--moe-aux-loss 0.01]] [--group-sizes 1,2,4]

For every strategy the group supports x recompute mode x token count x weights (trainable, or
frozen: no weight gradients): one decoder layer's forward + backward on a packed micro-batch
(`--sequences` sequences of uneven lengths), run through `parallel_lib.decoder_layer_step`, time
measured as the slowest rank's median and peak memory (weights, gradients, the input, its
gradient, activations, temporaries; torch's MemTracker on CPU, cuda.max_memory_allocated on
CUDA), beside the model's prediction. Without `--profile` the machine is profiled first (as
`python -m cost_models.profile` does). `--moe` validates a mixture-of-experts layer instead of
the dense one (E experts, top-K routing from a random router, experts of SwiGLU width F_E, shared
experts of width F_S): its prediction uses the routing the step measured (the pairs each rank
sent to each expert), its measured peak is the ranks' largest. `--group-sizes` adds, for each g
below P, the micro-batch dealt to P/g sub-groups of g ranks that each run a strategy at P = g on
their sequences (rows 'gN:STRATEGY', `cost_models.validate_groups`), as the planner may choose per
micro-batch; P itself is the whole group (the plain rows). With both kinds of weights, a
summary line per kind comes first; the last line is exactly:
    time error: median X% worst Y% | memory error: median Z% worst W%
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from functools import partial

import torch
import torch.distributed as dist

from parallel_lib import (
    LayerWeights,
    ZigzagLayout,
    all_gather_dim0,
    decoder_layer_step,
    get_strategy,
    init_mesh,
    pad_length,
)
from parallel_lib.cli import add_shape_arguments, fail, int_list, shape_from, threads_from_env
from parallel_lib.moe import MixtureOfExperts, MoeShape
from parallel_lib.routing import MoeRecorder, RoutingContext

from .counts import RECOMPUTE_MODES, STRATEGIES, dtype_name
from .hardware import detect
from .model import CostModel
from .moe_costs import MoeLoads
from .profile import measure_profile, step_times
from .profile_data import Profile
from .validate_cells import Cell, batch_lengths, largest, measured_peak, predicted_peak
from .validate_groups import validate_sub_groups

__all__ = ["Cell", "validate", "batch_lengths", "main"]

MiB = 1 << 20
WEIGHTS = ("trainable", "frozen")


def _moe_weights(weights: LayerWeights, layout: ZigzagLayout, lens: list[int]) -> LayerWeights:
    """The MoE weights with the micro-batch's routing context (a recorder counting the loads):
    real tokens and each local token's sequence, from the layout."""
    natural = layout.local_natural_index
    seq_index = torch.searchsorted(torch.tensor(layout.bounds[1:], device=natural.device),
                                   natural, right=True)  # fmt: skip
    lengths = torch.tensor(lens, device=natural.device)
    real = layout.positions < lengths.index_select(0, seq_index)
    context = RoutingContext(0, real, seq_index, tuple(lens), recorder=MoeRecorder())
    return dataclasses.replace(weights, mlp=weights.mlp._replace(context=context))


def _moe_loads(step, weights: LayerWeights, dy, group) -> MoeLoads:
    """The routing of one step: every rank's pairs per expert, gathered."""
    recorder = weights.mlp.context.recorder
    recorder.clear()
    recorder.active = True
    y = step()
    recorder.active = False
    y.backward(dy)
    load = recorder.load[0].to(dy.device)[None]  # (1, E) float64
    return MoeLoads([[int(v) for v in row] for row in all_gather_dim0(load, group).tolist()])


def validate(mesh, shape, model: CostModel, strategies, recomputes, token_counts, sequences,
             dtype=torch.float32, repeats: int = 3, weights_kinds=("trainable",),
             moe: MoeShape | None = None) -> list[Cell]:  # fmt: skip
    """Measure and predict every cell (collective: every rank calls it); `moe`: a
    mixture-of-experts layer of that shape, predicted with its measured routing."""
    P = mesh.sp
    g = torch.Generator().manual_seed(0)
    kind_of_mlp = {} if moe is None else {"mlp_kind": MixtureOfExperts(moe)}
    cells = []
    for tokens in token_counts:
        lens = batch_lengths(tokens, sequences)
        layout = ZigzagLayout([pad_length(n, P) for n in lens], P, mesh.sp_rank, mesh.device)
        x = torch.randn(layout.local_tokens, shape.hidden, generator=g, dtype=dtype)
        x = x.to(mesh.device).requires_grad_()
        dy = torch.randn(layout.local_tokens, shape.hidden, generator=g, dtype=dtype)
        dy = dy.to(mesh.device)
        for kind in weights_kinds:
            trainable = kind == "trainable"
            weights = LayerWeights.random(shape, P, dtype=dtype, device=mesh.device,
                                          trainable=trainable, **kind_of_mlp)  # fmt: skip
            extra = {}
            if moe is not None:
                weights = _moe_weights(weights, layout, lens)
                step = partial(decoder_layer_step, x, weights, layout, mesh.sp_group,
                               get_strategy(strategies[0]))  # fmt: skip
                extra = {"moe": moe, "moe_loads": _moe_loads(step, weights, dy, mesh.sp_group)}
            for name in strategies:
                strategy = get_strategy(name)
                for recompute in recomputes:
                    step = partial(decoder_layer_step, x, weights, layout, mesh.sp_group,
                                   strategy, recompute)  # fmt: skip
                    fwd, bwd = step_times(step, dy, repeats)
                    peak = measured_peak(step, weights, x, dy, mesh.device)
                    if moe is not None:
                        peak = largest(peak, mesh.device)
                    cost = model.layer_cost(shape, name, recompute, lens, P, trainable=trainable,
                                            dtype=dtype_name(dtype), **extra)  # fmt: skip
                    cells.append(Cell(name, recompute, tokens, fwd + bwd, cost.time_s, peak,
                                      predicted_peak(cost, weights, x), trainable))  # fmt: skip
    return cells


def moe_from(text: str | None, aux_loss: float) -> MoeShape | None:
    """The MoeShape of `--moe E,K,F_E[,F_S]` (None without it); ValueError, one line."""
    if text is None:
        return None
    values = int_list("--moe", text)
    if len(values) not in (3, 4):
        raise ValueError(f"--moe takes E,K,F_E or E,K,F_E,F_S, got {text!r}")
    try:
        return MoeShape(*values[:3], shared_ffn_hidden=values[3] if len(values) == 4 else 0,
                        aux_loss_coef=aux_loss)  # fmt: skip
    except ValueError as error:
        raise ValueError(f"--moe {text}: {error}") from None


def group_sizes_from(text: str | None, P: int, moe) -> list[int]:
    """The group sizes of `--group-sizes` (default [P]); ValueError, one line, for a size that
    does not divide P and for sub-groups with --moe (MoE layers run on the whole group). A
    size with more sub-groups than `--sequences` leaves the last idle, as the planner does."""
    if text is None:
        return [P]
    sizes = int_list("--group-sizes", text)
    divisors = [d for d in range(1, P + 1) if P % d == 0]
    bad = [g for g in sizes if g not in divisors]
    if bad:
        raise ValueError(f"--group-sizes {bad} do not divide sp={P}; choose among {divisors}")
    if moe is not None and any(g < P for g in sizes):
        raise ValueError("--group-sizes below sp with --moe: MoE layers run on the whole group")
    return sorted(set(sizes), reverse=True)


def format_table(cells: list[Cell]) -> str:
    lines = [
        f"{'strategy':<10} {'recompute':<9} {'weights':<9} {'tokens':>6} {'ms meas':>8} "
        f"{'ms pred':>8} {'err':>6} {'MiB meas':>9} {'MiB pred':>9} {'err':>6}"
    ]
    for c in cells:
        kind = "trainable" if c.trainable else "frozen"
        lines.append(
            f"{c.strategy:<10} {c.recompute:<9} {kind:<9} {c.tokens:>6} {c.measured_s * 1e3:>8.1f} "
            f"{c.predicted_s * 1e3:>8.1f} {100 * c.time_error:>5.1f}% "
            f"{c.measured_bytes / MiB:>9.2f} {c.predicted_bytes / MiB:>9.2f} "
            f"{100 * c.memory_error:>5.1f}%"
        )
    return "\n".join(lines)


def summary(cells: list[Cell]) -> str:
    """The error line over `cells`: median and worst relative error of time and of memory."""
    t = [c.time_error for c in cells]
    m = [c.memory_error for c in cells]
    return (
        f"time error: median {100 * statistics.median(t):.1f}% worst {100 * max(t):.1f}% | "
        f"memory error: median {100 * statistics.median(m):.1f}% worst {100 * max(m):.1f}%"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m cost_models.validate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--profile", help="a profile from python -m cost_models.profile")
    p.add_argument("--tokens", default="256,1024,4096,8192", help="comma-separated token counts")
    p.add_argument("--strategies", default="all", help="comma-separated names, or all")
    p.add_argument(
        "--recompute", default=",".join(RECOMPUTE_MODES), help="comma-separated recompute modes"
    )
    p.add_argument(
        "--weights", default="trainable",
        help="comma-separated: trainable, frozen (a layer whose weights get no gradient)",
    )  # fmt: skip
    p.add_argument("--sequences", type=int, default=2, help="sequences per micro-batch")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per cell (median)")
    p.add_argument(
        "--moe", metavar="E,K,F_E[,F_S]",
        help="validate a mixture-of-experts layer: E experts (a multiple of the group size), "
        "top-K routing, expert SwiGLU width F_E, shared experts' total width F_S (default 0); "
        "predicted with the routing the step measured",
    )  # fmt: skip
    p.add_argument(
        "--moe-aux-loss", type=float, default=0.01,
        help="with --moe: the balance loss coefficient (0: off; on, each forward all-reduces "
        "the per-sequence expert counts)",
    )  # fmt: skip
    p.add_argument(
        "--group-sizes", default=None,
        help="comma-separated sub-group sizes g dividing P (default: P, the whole group only); "
        "each g below P adds rows gN:STRATEGY for a micro-batch run on P/g sub-groups",
    )  # fmt: skip
    add_shape_arguments(p)
    args = p.parse_args(argv)
    try:
        shape = shape_from(args)
        tokens = int_list("--tokens", args.tokens)
        if min(tokens) < args.sequences:
            raise ValueError(
                f"--tokens {min(tokens)} cannot hold --sequences {args.sequences} sequences"
            )
        names = list(STRATEGIES) if args.strategies == "all" else args.strategies.split(",")
        recomputes = args.recompute.split(",")
        kinds = args.weights.split(",")
        for value, known, what in ((names, STRATEGIES, "strategy"),
                                   (recomputes, RECOMPUTE_MODES, "recompute mode"),
                                   (kinds, WEIGHTS, "--weights kind")):  # fmt: skip
            bad = [v for v in value if v not in known]
            if bad:
                raise ValueError(f"unknown {what} {bad}; choose from {', '.join(known)}")
        if min(tokens) < 1 or args.sequences < 1 or args.repeats < 1:
            raise ValueError("--tokens, --sequences and --repeats must be positive")
        moe = moe_from(args.moe, args.moe_aux_loss)
        profile = Profile.load(args.profile) if args.profile else None
        torch.set_num_threads(threads_from_env())
        mesh = init_mesh()
        if profile is not None:
            profile.check_matches(dtype=args.dtype, sp=mesh.sp)
        if moe is not None and moe.layout_problem(mesh.sp):
            raise ValueError(f"--moe: {moe.layout_problem(mesh.sp)}")
        group_sizes = group_sizes_from(args.group_sizes, mesh.sp, moe)
    except ValueError as e:  # ProfileError included
        fail(p.prog, str(e))
    wanted = names
    names = [n for n in names if get_strategy(n).supports(shape, mesh.sp)[0]]
    if not names and mesh.sp in group_sizes:
        fail(p.prog, f"no strategy supports this shape on sp={mesh.sp}")
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    if profile is None:
        if mesh.rank == 0:
            print("no --profile given: profiling this machine first")
        profile = measure_profile(mesh, shape, dtype)
    model = CostModel(detect(), profile)
    cells = []
    if mesh.sp in group_sizes:
        cells = validate(mesh, shape, model, names, recomputes, tokens, args.sequences, dtype,
                         args.repeats, kinds, moe)  # fmt: skip
    cells += validate_sub_groups(mesh, shape, model, wanted, recomputes, tokens, args.sequences,
                                 group_sizes, dtype, args.repeats)  # fmt: skip
    if not cells:
        fail(p.prog, "no strategy supports this shape on the group sizes asked for")
    if mesh.rank == 0:
        mlp = f"F={shape.ffn_hidden}" if moe is None else (
            f"MoE E={moe.experts} top-{moe.top_k} F_e={moe.expert_ffn_hidden} "
            f"F_s={moe.shared_ffn_hidden} aux={moe.aux_loss_coef:g}")  # fmt: skip
        print(
            f"P={mesh.sp} {profile.machine.get('device')} {args.dtype}, one layer "
            f"H={shape.hidden} heads={shape.heads}/{shape.kv_heads} {mlp}, "
            f"{args.sequences} sequences per batch, {time.perf_counter() - start:.0f} s"
        )
        print(format_table(cells))
        if len(kinds) > 1:
            for kind in kinds:
                chosen = [c for c in cells if c.trainable == (kind == "trainable")]
                print(f"{kind + ':':<10} {summary(chosen)}")
        print(summary(cells))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
