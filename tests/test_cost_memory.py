"""`cost_models.memory` against torch's MemTracker on the real switchable layer (bytes saved for
backward and the step's peak, per strategy, recompute mode and batch), and its pure invariants."""

from __future__ import annotations

import gc
import itertools
import time

import pytest
import torch

from cost_models.counts import RECOMPUTE_MODES, STRATEGIES, pad_length
from cost_models.memory import layer_memory
from paradyse import SwitchableDecoderLayer
from paradyse.memory import TotalMemTracker

from .harness import run_distributed
from .layer_cases import SHAPE, mesh_for, problem, rel_error, supported, uneven_lengths

SAVED_TOLERANCE = 0.05
PEAK_UNDER, PEAK_OVER = 0.08, 0.15
"""The replay may overstate a peak (usp's worst-rank ring step: +14% on some ranks). It may
understate one only by what gloo's worker threads sometimes hold a moment past the code's last
use (a ring K/V message or a gathered weight: up to 6% of these small test peaks, depending on
timing)."""
GLOO_HELD_BYTES = 48 << 10
"""Since gloo's collectives run as one all-to-all round (`parallel_lib.comm`), its threads may
hold a whole round's P blocks a moment past the last use: measured up to 43 KiB (11% of the
smallest case's 430 KiB peak, "short" on 4 ranks, ulysses and usp, in full-suite runs; the same
cases alone measured within PEAK_UNDER). An understated peak passes within this or PEAK_UNDER."""
LENGTHS = {"short": uneven_lengths(4), "300": [3, 130, 170], "1500": [700, 500, 250, 50]}
CASES = (
    [(4, n, k, "float32", True) for n in supported(4) for k in LENGTHS]
    + [(2, n, "short", "float32", True) for n in supported(2)]
    + [(1, n, "300", "float32", True) for n in supported(1)]
    + [(4, n, "300", "bfloat16", True) for n in supported(4)]
)
FROZEN_CASES = (  # frozen layers (no weight gradients), judged by the same tolerances
    [(4, n, "1500", "float32", False) for n in supported(4)]
    + [(2, n, "300", "float32", False) for n in supported(2)]
    + [(1, "local", "300", "float32", False), (4, "tp_sp", "300", "bfloat16", False)]
    + [(4, n, "300", "bfloat16", False) for n in ("ulysses", "ring", "usp", "metp")]
)


def settle() -> None:
    gc.collect()
    time.sleep(0.02)


def memory_case(
    name: str, lens: list[int], dtype_name: str = "float32", trainable: bool = True
) -> list[tuple]:
    """Per recompute mode: (recompute, measured saved, measured peak) on this rank; a frozen
    layer (trainable False) has no weight gradients. A frozen layer's step is measured twice and
    the lower peak kept: gloo's threads holding a buffer a moment longer only ever add to it,
    and the same bytes weigh more against a frozen layer's smaller peak."""
    mesh = mesh_for()
    dtype = getattr(torch, dtype_name)
    rows = []
    for rc in RECOMPUTE_MODES:
        batch, x, dy = problem(mesh, lens, dtype)
        layer = SwitchableDecoderLayer(SHAPE, mesh.sp_group, dtype=dtype)
        layer.requires_grad_(trainable)
        layer(x, batch, name, rc).backward(dy)  # warm-up: layout caches, parameter gradients
        measured = [_measure(layer, x, dy, batch, name, rc) for _ in range(1 if trainable else 2)]
        rows.append((rc, measured[0][0], min(peak for _, peak in measured)))
    return rows


def _measure(layer, x, dy, batch, name: str, rc: str) -> tuple[int, int]:
    """(saved bytes, peak bytes) of one step of the layer."""
    settle()
    tracker = TotalMemTracker()  # no gradient hooks: frozen parameters refuse them
    tracker.track_external(layer, x, dy)
    with tracker:
        base = tracker.get_tracker_snapshot("current")[x.device]["Total"]
        y = layer(x, batch, name, rc)
        settle()
        after = tracker.get_tracker_snapshot("current")[x.device]["Total"]
        item = x.element_size()
        saved = after - base - y.numel() * item + x.numel() * item
        y.backward(dy)
        peak = tracker.get_tracker_snapshot("peak")[x.device]["Total"] - base
    return saved, peak


ALL_CASES = CASES + FROZEN_CASES


SLOW_CASES = {
    case for case in FROZEN_CASES
    if case[0] == 4 and (case[2] == "1500" or (case[3] == "bfloat16" and case[1] != "tp_sp"))
}  # fmt: skip
"""Frozen layers on 4 ranks but tp_sp in bfloat16 (make test's time: every strategy's frozen
layer is checked on 2 ranks, and tp_sp's on 4): `pytest -m slow tests/test_cost_memory.py`."""


@pytest.mark.parametrize(
    ("P", "name", "key", "dtype", "trainable"),
    [pytest.param(*c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in ALL_CASES],
    ids=[f"P{P}-{n}-{k}-{d}" + ("" if t else "-frozen") for P, n, k, d, t in ALL_CASES],
)
def test_saved_and_peak_match_mem_tracker(
    P: int, name: str, key: str, dtype: str, trainable: bool
) -> None:
    lens, off = LENGTHS[key], {"saved": [], "peak": []}
    ranks = run_distributed(P, memory_case, name, lens, dtype, trainable)
    for rank, rows in enumerate(ranks):
        for i, (rc, saved, peak) in enumerate(rows):
            m = layer_memory(
                SHAPE, name, lens, P, dtype=dtype, recompute=rc, reduce_scatter_copy=True,
                trainable=trainable,
            )  # fmt: skip
            what = f"{name} P={P} {dtype} rank {rank} lens={key} recompute={rc} {trainable=}"
            if rel_error(saved, m.saved) > SAVED_TOLERANCE:
                off["saved"].append(f"{what}: saved {saved} B, model {m.saved} B")
            model_peak = max(m.forward_peak, m.backward_peak)
            # a frozen layer's peak is its attention backward, whose ring steps differ by rank:
            # the model is the most loaded rank's (what a plan must fit)
            most = peak if trainable else max(r[i][2] for r in ranks)
            if not ((model_peak - peak) >= -max(PEAK_UNDER * peak, GLOO_HELD_BYTES) and
                    (model_peak - most) / most <= PEAK_OVER):  # fmt: skip
                off["peak"].append(f"{what}: peak {peak} B (ranks' most {most} B), model "
                                   f"{model_peak} B")  # fmt: skip
    wrong = off["saved"] + off["peak"]
    assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------- pure invariants
def valid(P: int) -> list[str]:
    return (
        ["local"] if P == 1 else [s for s in STRATEGIES if s != "local" and (s != "usp" or P == 4)]
    )


GRID = [(P, s, dt) for P in (1, 2, 4) for s in valid(P) for dt in ("float32", "bfloat16")]
BATCHES = [[1], [5, 9], [33, 2, 64], [200, 17]]


def memory(P, strategy, lens, dtype="float32", rc="none", **kw):
    return layer_memory(SHAPE, strategy, lens, P, dtype=dtype, recompute=rc, **kw)


@pytest.mark.parametrize(("P", "strategy", "dtype"), GRID)
def test_recompute_modes_order_saved_bytes(P: int, strategy: str, dtype: str) -> None:
    item = 4 if dtype == "float32" else 2
    for lens in BATCHES:
        T = sum(pad_length(n, P) for n in lens)
        m = {rc: memory(P, strategy, lens, dtype, rc) for rc in RECOMPUTE_MODES}
        assert m["full"].saved == T // P * SHAPE.hidden * item
        assert m["full"].saved < m["selective"].saved < m["none"].saved
        for rc, mem in m.items():
            assert mem.transient >= 0, (lens, rc)
            assert mem.input_bytes == T // P * SHAPE.hidden * item


@pytest.mark.parametrize(("P", "strategy", "dtype"), GRID)
def test_bigger_batch_never_needs_less(P: int, strategy: str, dtype: str) -> None:
    for rc, lens in itertools.product(RECOMPUTE_MODES, BATCHES):
        small = memory(P, strategy, lens, dtype, rc)
        for bigger in ([*lens, 7], [lens[0] + 2 * P, *lens[1:]]):
            big = memory(P, strategy, bigger, dtype, rc)
            for field in ("saved", "forward_peak", "backward_peak"):
                assert getattr(big, field) >= getattr(small, field), (rc, lens, bigger, field)


@pytest.mark.parametrize(("P", "strategy", "dtype"), GRID)
def test_reduce_scatter_copy_never_lowers_the_peak(P: int, strategy: str, dtype: str) -> None:
    for rc, lens in itertools.product(RECOMPUTE_MODES, BATCHES):
        plain = memory(P, strategy, lens, dtype, rc)
        copied = memory(P, strategy, lens, dtype, rc, reduce_scatter_copy=True)
        assert copied.saved == plain.saved
        assert copied.forward_peak >= plain.forward_peak, (rc, lens)
        assert copied.backward_peak >= plain.backward_peak, (rc, lens)


def test_unknown_strategy_or_recompute_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="strategy"):
        memory(2, "zigzag", [8])
    with pytest.raises(ValueError, match="recompute"):
        memory(2, "ring", [8], rc="some")
