"""The start-up check of a cached profile: re-measure a handful of the coefficients the planner's
choices depend on (one matmul of the layer's shape, an elementwise add, all-gather and all-to-all
latency and a 2 MiB message, point-to-point latency) and compare them with what the profile
predicts, in about a second. A measuring module of `cost_models` (it imports torch and
`parallel_lib`); `paradyse.planning.resolve_profile` calls `startup_check` when it loads a
cached profile.
"""

from __future__ import annotations

import os
from functools import partial

import torch

from parallel_lib import count_bytes, rank0_value

from .counts import dtype_name
from .profile_data import Profile
from .stability import (
    CHECK_THRESHOLD,
    conditions_now,
    drift_warning,
    drifted,
    ranks_here,
    usable_cpus,
)
from .timing import collective_ops, settled_time, tiny_rows

__all__ = ["check_points", "startup_check", "remeasure_command"]

MESSAGE_ELEMENTS = 1 << 19
"""The bandwidth point of the collectives: 2 MiB in float32 (a size the profiler measures)."""


def _time(fn, device) -> float:
    return settled_time(fn, device, cap=5)[0]


def check_points(mesh, profile: Profile, shape, dtype) -> dict[str, tuple[float, float]]:
    """name -> (measured seconds, seconds the profile predicts) for the checked coefficients
    (collective: every rank calls it; the times are the slowest rank's, so every rank gets the
    same numbers)."""
    device, P = mesh.device, mesh.sp
    H, width = shape.hidden, (shape.heads + 2 * shape.kv_heads) * shape.head_dim
    m = 1024  # the QKV projection of m tokens, inside the profile's measured matmul sizes
    while m > 16 and 2.0 * m * H * width > profile.matmul.points[-1][0]:
        m //= 4
    a = torch.randn(m, H, dtype=dtype, device=device)
    b = torch.randn(H, width, dtype=dtype, device=device)
    points = {"matmul": (_time(lambda: a @ b, device), profile.matmul(2.0 * m * H * width))}
    x, y = (torch.randn(MESSAGE_ELEMENTS, dtype=dtype, device=device) for _ in range(2))
    nbytes = 3.0 * MESSAGE_ELEMENTS * x.element_size()
    points["elementwise"] = (_time(lambda: x + y, device), profile.elementwise(nbytes))
    if P == 1:
        return points
    ops, group = collective_ops(), mesh.sp_group
    tiny = torch.randn(P, 1, dtype=dtype, device=device)
    message = torch.randn(tiny_rows(P, MESSAGE_ELEMENTS), 256, dtype=dtype, device=device)
    for kind in ("all_gather", "all_to_all", "p2p"):
        fit, op = profile.collective(kind, P), ops[kind]
        for name, tensor in ((f"{kind}/{P}.alpha", tiny), (f"{kind}/{P} 2MiB", message)):
            if kind == "p2p" and tensor is message:
                continue  # p2p: its latency only, the coefficient that drifts most
            with count_bytes(group) as sent:
                op(group, tensor)
            points[name] = (_time(partial(op, group, tensor), device), fit(float(sent.total)))
    return points


def remeasure_command(path, mesh, shape, dtype, max_tokens: int) -> str:
    """How to measure the profile at `path` again: delete it (the trainer measures a missing
    profile), or, where the run is one node's whole world, the profiler's command line."""
    how = f"rm {path} (the next run measures it again)"
    if mesh.sp == mesh.world == ranks_here(mesh.world):
        threads = os.environ.get("OMP_NUM_THREADS", "1")
        how += (
            f", or OMP_NUM_THREADS={threads} torchrun --standalone --nproc-per-node {mesh.world}"
            f" -m cost_models.profile --out {path} --hidden {shape.hidden} --heads "
            f"{shape.heads} --kv-heads {shape.kv_heads} --head-dim {shape.head_dim} --ffn "
            f"{shape.ffn_hidden} --dtype {dtype_name(dtype)} --max-tokens {max_tokens}"
        )
    return how


def startup_check(mesh, profile: Profile, shape, dtype, *, path, max_tokens: int = 8192,
                  threshold: float = CHECK_THRESHOLD) -> str | None:  # fmt: skip
    """Re-measure the checked coefficients and compare them with `profile` (collective: every
    rank calls it, and every rank gets rank 0's verdict, as with the profile itself). The
    warning line naming the coefficients beyond `threshold` (measured / profiled, either way)
    with how to measure the profile again, or None when it still predicts this machine or
    `threshold` is 0 (the check is off)."""
    if threshold <= 0:
        return None
    points = check_points(mesh, profile, shape, dtype)
    ratios = {name: measured / predicted for name, (measured, predicted) in points.items()}
    far = rank0_value(drifted(ratios, threshold) if mesh.rank == 0 else None, mesh.device)
    if not far:
        return None
    how = remeasure_command(path, mesh, shape, dtype, max_tokens)
    load = conditions_now()["load"]
    return drift_warning(far, path=str(path), threshold=threshold, remeasure=how, load=load,
                         cpus=usable_cpus())  # fmt: skip
