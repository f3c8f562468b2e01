"""`cost_models.model` and `cost_models.profile_data`: datasheet times worked out by hand for every
strategy, the step's memory rule, profiled curves, and the profile file's errors. Pure Python."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from cost_models.counts import layer_counts
from cost_models.hardware import Link, get_preset
from cost_models.model import Cost, CostModel
from cost_models.profile_data import Curve, LinkFit, Profile, ProfileError
from parallel_lib import LayerShape

SHAPE = LayerShape(hidden=64, heads=8, kv_heads=4, head_dim=16, ffn_hidden=128)
P = 4
LENGTHS = {"short": [5, 20], "long": [5, 20, 32_000]}
"""short: communication latency dominates; long: attention dominates every phase."""
PEAK = {"float32": 19.5e12, "bfloat16": 312e12}
HBM, NVLINK, LATENCY = 2.039e12, 300e9, 5e-6
A100 = dataclasses.replace(
    get_preset("a100-80g-nvlink"), intra_node=Link(NVLINK, LATENCY), launch_latency=0.0,
    collective_latency=0.0,
)  # fmt: skip
"""The preset's rates with one latency per hop: the hand times below check the FLOP, byte and
hop terms; the preset's launch and per-call latencies have a test of their own."""


def hand_times(strategy: str, recompute: str, dtype: str, lens: list[int]) -> tuple[float, float]:
    """(forward, backward) seconds of one layer on one rank, from first principles."""
    padded = [-(-n // 8) * 8 for n in lens]  # each sequence padded to a multiple of 2P
    b, a = (4 if dtype == "float32" else 2), 4  # element and accumulator bytes
    H, heads, kvh, d, F = 64, 8, 4, 16, 128
    Q, K, T = heads * d, kvh * d, sum(padded)
    tl = T // P
    degrees = {"tp_sp": (4, 1), "ulysses": (4, 1), "ring": (1, 4), "usp": (2, 2), "metp": (1, 4)}
    u, c = degrees[strategy]  # all-to-all and ring degrees
    # FLOPs per rank: every strategy splits the layer's work evenly (zigzag balances causality)
    features = {"qkv": (H, Q + 2 * K), "out": (Q, H), "gate_up": (H, 2 * F), "down": (F, H)}
    mm = {op: 2 * T * i * o / P for op, (i, o) in features.items()}
    attn = 4 * heads * d * sum(n * (n + 1) / 2 for n in padded) / P  # causal pairs
    mm_rate, peak = PEAK[dtype] * 0.7, PEAK[dtype]
    mm_f = sum(mm.values()) / mm_rate
    again = {"none": 0, "selective": mm["gate_up"] + mm["down"], "full": sum(mm.values())}
    mm_b = (2 * sum(mm.values()) + again[recompute]) / mm_rate
    at_f = attn / (peak * 0.5)
    at_b = 2 * attn / (peak * 0.4) + (at_f if recompute == "full" else 0)
    counts = layer_counts(SHAPE, strategy, lens, P, dtype=dtype, recompute=recompute)
    ew_f, ew_b = counts.elementwise_forward / HBM, counts.elementwise_backward / HBM

    # bytes sent and calls, by kind: {kind: (bytes, calls)}
    def coll(kind, nbytes, calls):
        hops = {"all_gather": P - 1, "reduce_scatter": P - 1, "all_to_all": u - 1, "p2p": 1}
        return calls * hops[kind] * LATENCY + nbytes / NVLINK

    S = (heads + 2 * kvh) * d * H // P + heads * d * H // P + 3 * (F // P) * H  # weight shard
    kv_msg = 2 * tl * kvh * d  # one K/V ring message, elements
    if strategy == "tp_sp":
        v = (P - 1) * tl * H * b
        f = {"all_gather": (2 * v, 2), "reduce_scatter": (2 * v, 2)}
        rs = 3 if recompute == "full" else 2  # full: the attention output's reduce-scatter again
        bw = {"all_gather": (4 * v, 4), "reduce_scatter": (rs * v, rs)}
    elif strategy == "metp":
        fwd_bytes = (P - 1) * S * b + (P - 1) * kv_msg * b
        f = {"p2p": (fwd_bytes, 4 * (P - 1) + P * (P - 1))}
        nbytes, calls = fwd_bytes + P * S * b + P * kv_msg * a, 4 * (2 * P - 1) + P * (2 * P - 1)
        if recompute == "selective":
            nbytes, calls = nbytes + (P - 1) * 3 * (F // P) * H * b, calls + 2 * (P - 1)
        if recompute == "full":
            nbytes, calls = nbytes + fwd_bytes, calls + f["p2p"][1]
        bw = {"p2p": (nbytes, calls)}
    else:  # ZeRO-3 weights, Ulysses all-to-all over u, ring over c
        W = (P - 1) * S * b
        a2a = (u - 1) * tl * (2 * heads + 2 * kvh) * d * b // u
        ring = (c - 1) * kv_msg * b
        full = recompute == "full"
        f = {"all_gather": (W, 4), "all_to_all": (a2a, 2 if u > 1 else 0), "p2p": (ring, c - 1)}
        bw = {
            "all_gather": (W, 4),
            "reduce_scatter": (W, 4),
            "all_to_all": ((2 if full else 1) * a2a, (4 if full else 2) if u > 1 else 0),
            "p2p": (
                ring + (c * kv_msg * a if c > 1 else 0) + (ring if full else 0),
                (2 * c - 1 if c > 1 else 0) + (c - 1 if full else 0),
            ),
        }
    times = []
    for m, at, ew, comm in ((mm_f, at_f, ew_f, f), (mm_b, at_b, ew_b, bw)):
        p2p = coll("p2p", *comm.pop("p2p")) if "p2p" in comm else 0.0
        blocking = sum(coll(kind, n, k) for kind, (n, k) in comm.items() if n)
        if strategy == "metp":
            times.append(max(m + at, p2p) + ew + blocking)
        elif strategy in ("ring", "usp"):
            times.append(m + max(at, p2p) + ew + blocking)
        else:
            times.append(m + at + p2p + ew + blocking)
    return times[0], times[1]


HAND = [
    (s, rc, dt, key)
    for s in ("tp_sp", "ulysses", "ring", "usp", "metp")
    for rc in ("none", "selective", "full")
    for dt in ("float32", "bfloat16")
    for key in LENGTHS
]


@pytest.mark.parametrize(("strategy", "recompute", "dtype", "key"), HAND)
def test_datasheet_layer_cost_by_hand(strategy: str, recompute: str, dtype: str, key: str) -> None:
    lens = LENGTHS[key]
    cost = CostModel(A100).layer_cost(SHAPE, strategy, recompute, lens, P, dtype=dtype)
    forward, backward = hand_times(strategy, recompute, dtype, lens)
    assert cost.forward_s == pytest.approx(forward, rel=1e-9)
    assert cost.backward_s == pytest.approx(backward, rel=1e-9)


def test_launch_and_call_latencies_by_hand() -> None:
    """The preset's latency terms on a batch too short to hide them: tp_sp's forward runs four
    matmuls and one attention call per sequence, every one shorter than a launch (5 us), and four
    collectives over P = 4 (8.4 us a call + 3 hops x 3.4 us on NVLink)."""
    preset = get_preset("a100-80g-nvlink")
    assert (preset.launch_latency, preset.collective_latency) == (5e-6, 8.4e-6)
    assert preset.intra_node.latency == 3.4e-6 and preset.inter_node.latency == 14e-6
    lens = LENGTHS["short"]
    counts = layer_counts(SHAPE, "tp_sp", lens, P, dtype="bfloat16")
    assert [k.count for k in counts.kernels_forward] == [1, 1, 1, 1, 1, 1]  # 4 matmuls, 2 seqs
    assert all(k.flops / (PEAK["bfloat16"] * 0.5) < 5e-6 for k in counts.kernels_forward)
    T = sum(-(-n // 8) * 8 for n in lens)
    volume = (P - 1) * (T // P) * 64 * 2  # bytes of one activation all-gather or reduce-scatter
    collectives = 4 * (8.4e-6 + 3 * 3.4e-6) + 4 * volume / NVLINK
    want = 6 * 5e-6 + counts.elementwise_forward / HBM + collectives
    cost = CostModel(preset).layer_cost(SHAPE, "tp_sp", "none", lens, P, dtype="bfloat16")
    assert cost.forward_s == pytest.approx(want, rel=1e-9)


def test_full_recompute_costs_one_more_forward() -> None:
    """One rank, no communication: recomputing the layer adds exactly its forward time."""
    model = CostModel(A100)
    none, full = (model.layer_cost(SHAPE, "local", rc, [100, 37], 1) for rc in ("none", "full"))
    assert full.backward_s - none.backward_s == pytest.approx(none.forward_s, rel=1e-9)


def test_step_adds_saved_bytes_and_the_largest_transient() -> None:
    model = CostModel(A100)
    cells = (("ring", "none", [300]), ("tp_sp", "full", [9, 70]), ("usp", "selective", [1]))
    layers = [model.layer_cost(SHAPE, s, rc, lens, P) for s, rc, lens in cells]
    step = CostModel.step(layers, static_bytes=12345, extra_s=0.5)
    assert step.peak_bytes == 12345 + sum(c.saved_bytes for c in layers) + max(
        c.transient_bytes for c in layers
    )
    assert step.time_s == pytest.approx(0.5 + sum(c.forward_s + c.backward_s for c in layers))
    made_up = [
        Cost(1, 2, 0, 0, saved, transient, 0, 0, 0, 0) for saved, transient in ((5, 7), (11, 3))
    ]
    assert CostModel.step(made_up, 100).peak_bytes == 100 + 16 + 7
    assert CostModel.step(made_up, 100, head_bytes=9).peak_bytes == 100 + 16 + 9  # logits win
    assert CostModel.step(made_up, 100, head_bytes=6).peak_bytes == 100 + 16 + 7
    assert CostModel.step([], 9).peak_bytes == 9


# ---------------------------------------------------------------- profiles
POINTS = {
    "matmul": [(1e4, 2e-6), (1e6, 1e-5), (1e8, 4e-4)],
    "attention_forward": [(1e3, 3e-6), (1e7, 1e-4)],
    "attention_backward": [(1e3, 5e-6), (1e7, 3e-4)],
}


def make_profile() -> Profile:
    return Profile(
        machine={"device": "test", "dtype": "float32"},
        **{name: Curve(points) for name, points in POINTS.items()},
        elementwise=LinkFit(alpha=1e-6, beta=1e10),
        collectives={"all_gather": {2: LinkFit(1e-5, 1e9), 4: LinkFit(2e-5, 2e9)}},
        calibration={"local": (1.5, 0.5)},
        reduce_scatter_copy=True,
    )


def log_log(points: list[tuple[float, float]], x: float) -> float:
    """The time at x: linear in log-log between points, constant below, constant rate above."""
    if x <= points[0][0]:
        return points[0][1]
    if x >= points[-1][0]:
        return points[-1][1] * x / points[-1][0]
    (x0, t0), (x1, t1) = next((p, q) for p, q in zip(points, points[1:], strict=False) if x <= q[0])
    return t0 * (t1 / t0) ** (math.log(x / x0) / math.log(x1 / x0))


def test_curve_interpolates_log_log_and_keeps_the_last_rate() -> None:
    curve = make_profile().matmul
    assert curve(10**5) == pytest.approx(math.sqrt(2e-6 * 1e-5), rel=1e-12)  # halfway in log
    assert curve(10**7) == pytest.approx(math.sqrt(1e-5 * 4e-4), rel=1e-12)
    assert curve(1e6) == pytest.approx(1e-5, rel=1e-12)
    assert curve(1e10) == pytest.approx(4e-4 * 100, rel=1e-12)  # 4e-4 s per 1e8 FLOPs
    assert curve(10) == pytest.approx(2e-6)  # below the smallest: the call's fixed cost


def test_profiled_layer_cost_uses_the_curves() -> None:
    """local on one rank: every kernel timed by its curve, elementwise by the fit, then the
    calibration's scale x that."""
    lens = [100, 37, 1]
    cost = CostModel(A100, make_profile()).layer_cost(SHAPE, "local", "none", lens, 1)
    counts = layer_counts(SHAPE, "local", lens, 1)
    fits = {"matmul": POINTS["matmul"]}
    want = []
    for direction, kernels, ew, scale in (
        ("forward", counts.kernels_forward, counts.elementwise_forward, 1.5),
        ("backward", counts.kernels_backward, counts.elementwise_backward, 0.5),
    ):
        fits["attention"] = POINTS[f"attention_{direction}"]
        assert any(POINTS["matmul"][0][0] < k.flops < 1e8 for k in kernels if k.kind == "matmul")
        kernel_s = sum(k.count * log_log(fits[k.kind], k.flops) for k in kernels)
        want.append(scale * (kernel_s + ew / 1e10))
    assert cost.forward_s == pytest.approx(want[0], rel=1e-9)
    assert cost.backward_s == pytest.approx(want[1], rel=1e-9)


def write(tmp_path, text: str):
    path = tmp_path / "profile.json"
    path.write_text(text)
    return path


def load_error(path) -> str:
    with pytest.raises(ProfileError) as excinfo:
        Profile.load(path)
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def test_profile_errors_are_one_line(tmp_path) -> None:
    good = make_profile().to_dict()
    assert "version" in load_error(write(tmp_path, json.dumps({**good, "version": 99})))
    text = json.dumps(good)
    assert "corrupt" in load_error(write(tmp_path, text[: len(text) // 2]))
    missing = {k: v for k, v in good.items() if k != "matmul"}
    assert "corrupt" in load_error(write(tmp_path, json.dumps(missing)))
    load_error(write(tmp_path, json.dumps({**good, "schema": "someone.else"})))
    load_error(write(tmp_path, "[1, 2, 3]"))
    load_error(tmp_path / "absent.json")


def test_profile_round_trip(tmp_path) -> None:
    profile = make_profile()
    profile.save(tmp_path / "p.json")
    again = Profile.load(tmp_path / "p.json")
    assert again.to_dict() == profile.to_dict()
    assert again.collective("all_gather", 4) == LinkFit(2e-5, 2e9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]  # no temporary left behind


def test_link_fit_never_promises_a_link_faster_than_measured() -> None:
    flat = [(16e3, 20e-6), (256e3, 19e-6), (2e6, 19.5e-6), (8e6, 19.8e-6)]  # latency-bound noise
    fit = LinkFit.fit(flat)
    assert fit.beta <= 8e6 / 19.8e-6 * (1 + 1e-12)
    assert fit(1e9) >= 1e9 / (8e6 / 19.8e-6)  # 1 GB no faster than the largest transfer seen
    falling = [(1e3, 3e-5), (1e6, 2e-5), (1e7, 1e-5)]  # slope <= 0
    assert 0 < LinkFit.fit(falling).beta <= 1e7 / 1e-5 * (1 + 1e-12)
    with pytest.raises(ProfileError):
        LinkFit.fit([(1e3, 0.0)])


def test_link_fit_recovers_alpha_and_beta() -> None:
    samples = [(n, 1e-4 + n / 1e9) for n in (1e3, 1e5, 1e7, 1e9)]
    fit = LinkFit.fit(samples)
    assert fit.alpha == pytest.approx(1e-4, rel=1e-6)
    assert fit.beta == pytest.approx(1e9, rel=1e-6)
