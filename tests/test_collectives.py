"""Collectives, ZeRO/streamed linears, ring attention and byte counting over real gloo groups of
1, 2 and 4 ranks. Every rank regenerates all ranks' inputs from a shared seed and checks its own
results against what the math says.

Inputs are multiples of 1/64 with a few significant bits, so sums and matmuls are exact in float64
whatever the order: results of communication are compared with torch.equal."""

from __future__ import annotations

import pytest
import torch

from parallel_lib import (
    RingExchange,
    ZigzagLayout,
    all_gather_tokens,
    all_to_all,
    count_bytes,
    pad_length,
    reduce_scatter_tokens,
    ring_attention,
    streamed_linear,
    varlen_attention,
    zero_linear,
)

from .harness import run_distributed
from .layer_cases import assert_close, mesh_for

WORLDS = [1, 2, 4]
F64 = 8  # bytes per float64 element


def rnd(shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Random values on a 1/64 grid (exact arithmetic in float64 for these sizes)."""
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(shape, generator=g, dtype=torch.float64) * 64).round() / 64).to(dtype)


def per_rank(shape, seed: int, P: int) -> list[torch.Tensor]:
    """One tensor per rank, the same on every rank that regenerates them."""
    return [rnd(shape, 1000 * seed + q) for q in range(P)]


def expected_bytes(kinds: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in kinds.items() if v}


def group():
    g = mesh_for().sp_group
    return g, g.size, g.rank


# ---------------------------------------------------------------------------- all-gather


def all_gather_case(seed: int) -> None:
    grp, P, r = group()
    N, H = 3, 5
    xs = per_rank((N, H), seed, P)
    dys = per_rank((P * N, H), seed + 1, P)
    x = xs[r].clone().requires_grad_()
    with count_bytes(grp) as fwd:
        y = all_gather_tokens(x, grp)
    assert torch.equal(y, torch.cat(xs)), "forward: rank q's rows at [qN, (q+1)N)"
    with count_bytes(grp) as bwd:
        y.backward(dys[r])
    want = sum(dy[r * N : (r + 1) * N] for dy in dys)  # every rank's gradient for my rows
    assert torch.equal(x.grad, want), "backward: reduce-scatter of the output gradients"
    n = N * H * F64
    assert fwd.snapshot() == expected_bytes({"all_gather": (P - 1) * n})
    assert bwd.snapshot() == expected_bytes({"reduce_scatter": (P - 1) * n})
    assert fwd.calls["all_gather"] == (P > 1) and bwd.calls["reduce_scatter"] == (P > 1)


@pytest.mark.parametrize("world", WORLDS)
def test_all_gather_tokens(world: int) -> None:
    run_distributed(world, all_gather_case, 1)


# ---------------------------------------------------------------------------- reduce-scatter


def reduce_scatter_case(seed: int) -> None:
    grp, P, r = group()
    N, H = 2, 7
    xs = per_rank((P * N, H), seed, P)
    dys = per_rank((N, H), seed + 1, P)
    x = xs[r].clone().requires_grad_()
    with count_bytes(grp) as fwd:
        y = reduce_scatter_tokens(x, grp)
    assert torch.equal(y, sum(t[r * N : (r + 1) * N] for t in xs)), "forward: summed rows of r"
    with count_bytes(grp) as bwd:
        y.backward(dys[r])
    assert torch.equal(x.grad, torch.cat(dys)), "backward: all-gather of the output gradients"
    n = P * N * H * F64  # input bytes
    assert fwd.snapshot() == expected_bytes({"reduce_scatter": (P - 1) * n // P})
    assert bwd.snapshot() == expected_bytes({"all_gather": (P - 1) * N * H * F64})


@pytest.mark.parametrize("world", WORLDS)
def test_reduce_scatter_tokens(world: int) -> None:
    run_distributed(world, reduce_scatter_case, 2)


# ---------------------------------------------------------------------------- all-to-all


def all_to_all_case(seed: int, scatter_dim: int, gather_dim: int) -> None:
    grp, P, r = group()
    shape = [3, 2, 5]
    shape[scatter_dim] *= P  # the scattered dim splits into P chunks
    xs = per_rank(tuple(shape), seed, P)
    x = xs[r].clone().requires_grad_()
    with count_bytes(grp) as fwd:
        y = all_to_all(x, grp, scatter_dim, gather_dim)
    # rank r receives chunk r (along scatter_dim) of every rank q, placed q-th along gather_dim
    want = torch.cat([t.chunk(P, scatter_dim)[r] for t in xs], gather_dim)
    assert torch.equal(y, want), "forward"
    dys = per_rank(tuple(want.shape), seed + 1, P)
    with count_bytes(grp) as bwd:
        y.backward(dys[r])
    # chunk q of my input went to rank q at position r along gather_dim
    want_grad = torch.cat([dy.chunk(P, gather_dim)[r] for dy in dys], scatter_dim)
    assert torch.equal(x.grad, want_grad), "backward"
    n = x.numel() * F64
    assert fwd.snapshot() == expected_bytes({"all_to_all": (P - 1) * n // P})
    assert bwd.snapshot() == expected_bytes({"all_to_all": (P - 1) * n // P})


@pytest.mark.parametrize("dims", [(1, 0), (0, 1), (2, 0)], ids=lambda d: f"s{d[0]}g{d[1]}")
@pytest.mark.parametrize("world", WORLDS)
def test_all_to_all(world: int, dims: tuple[int, int]) -> None:
    run_distributed(world, all_to_all_case, 3, *dims)


# ---------------------------------------------------------------------------- linears


def linear_case(kind: str, input_major: bool, keep: bool, frozen: bool, seed: int) -> None:
    """y = x @ W.T (W (P*rows, in), output rows sharded) or y = x @ W (W (P*rows, out), input
    rows sharded), W assembled from every rank's dim-0 shard."""
    grp, P, r = group()
    N, rows, other = 4, 3, 6
    shards = per_rank((rows, other), seed, P)
    W = torch.cat(shards)  # the whole weight
    in_features = P * rows if input_major else other
    xs = per_rank((N, in_features), seed + 1, P)
    ys = [x @ W if input_major else x @ W.t() for x in xs]
    dys = per_rank(tuple(ys[0].shape), seed + 2, P)

    x = xs[r].clone().requires_grad_()
    shard = shards[r].clone().requires_grad_(not frozen)
    with count_bytes(grp) as fwd:
        if kind == "zero":
            y = zero_linear(x, shard, grp, input_major=input_major, keep_gathered=keep)
        else:
            y = streamed_linear(x, shard, grp, input_major=input_major)
    assert torch.equal(y, ys[r]), "forward"
    with count_bytes(grp) as bwd:
        y.backward(dys[r])
    assert torch.equal(x.grad, dys[r] @ W.t() if input_major else dys[r] @ W), "input grad"
    if frozen:
        assert shard.grad is None
    else:  # the weight is shared by every rank's tokens: its gradient sums all ranks' parts
        dW = sum(x.t() @ dy if input_major else dy.t() @ x for x, dy in zip(xs, dys, strict=True))
        assert torch.equal(shard.grad, dW[r * rows : (r + 1) * rows]), "weight shard grad"

    s = rows * other * F64  # one shard's bytes
    if kind == "zero":
        want_fwd = {"all_gather": (P - 1) * s}
        want_bwd = {
            "all_gather": 0 if keep else (P - 1) * s,
            "reduce_scatter": 0 if frozen else (P - 1) * P * s // P,
        }
    else:  # the shard travels P-1 hops each way; gradient accumulators make P hops
        want_fwd = {"p2p": (P - 1) * s}
        want_bwd = {"p2p": (P - 1) * s + (0 if frozen else P * s)}
    if P == 1:
        want_fwd = want_bwd = {}
    assert fwd.snapshot() == expected_bytes(want_fwd), "forward bytes"
    assert bwd.snapshot() == expected_bytes(want_bwd), "backward bytes"


LINEAR_CASES = [
    ("zero", False, False, False),
    ("zero", True, False, False),
    ("zero", False, True, False),
    ("zero", True, False, True),
    ("streamed", False, False, False),
    ("streamed", True, False, False),
    ("streamed", False, False, True),
]


@pytest.mark.parametrize(
    ("kind", "input_major", "keep", "frozen"),
    LINEAR_CASES,
    ids=[
        f"{k}-{'in' if i else 'out'}{'-keep' if kp else ''}{'-frozen' if f else ''}"
        for k, i, kp, f in LINEAR_CASES
    ],
)
@pytest.mark.parametrize("world", WORLDS)
def test_sharded_linear(world, kind, input_major, keep, frozen) -> None:
    run_distributed(world, linear_case, kind, input_major, keep, frozen, 4)


def linear_bad_input_case() -> None:
    grp, _, _ = group()
    x = rnd((2, 3, 4), 5)
    for fn in (zero_linear, streamed_linear):
        try:
            fn(x, rnd((2, 4), 6), grp, input_major=False)
        except ValueError as e:
            assert "(tokens, features)" in str(e)
        else:
            raise AssertionError(f"{fn.__name__} accepted a 3-D input")


def test_linears_reject_3d_input() -> None:
    run_distributed(1, linear_bad_input_case)


# ---------------------------------------------------------------------------- ring attention


def ring_attention_case(dtype_name: str, backend: str, seed: int) -> None:
    grp, P, r = group()
    dtype = getattr(torch, dtype_name)
    heads, kv_heads, d = 8, 4, 16
    lens = [pad_length(n, P) for n in (2 * P - 1, 4 * P + 3, 37, 16 * P)]
    layout = ZigzagLayout(lens, P, r)
    T = layout.total_tokens
    q_nat = rnd((T, heads, d), seed)
    k_nat, v_nat = rnd((T, kv_heads, d), seed + 1), rnd((T, kv_heads, d), seed + 2)
    dout_nat = rnd((T, heads, d), seed + 3)

    # the same attention over natural order, in float64
    ref = [t.clone().requires_grad_() for t in (q_nat, k_nat, v_nat)]
    ref_out = varlen_attention(*ref, layout.bounds, backend="reference")
    ref_out.backward(dout_nat)

    q, k, v = (layout.shard(t).to(dtype).requires_grad_() for t in (q_nat, k_nat, v_nat))
    with count_bytes(grp) as fwd:
        out = ring_attention(q, k, v, layout.local_bounds, grp, backend=backend)
    with count_bytes(grp) as bwd:
        out.backward(layout.shard(dout_nat).to(dtype))
    rel = 1e-10 if dtype == torch.float64 else 1e-5
    what = f"P={P} {dtype_name} {backend}"
    assert out.dtype == dtype
    assert_close(out, layout.shard(ref_out.detach()), rel, f"{what} out")
    for name, got, want in zip("qkv", (q, k, v), ref, strict=True):
        assert_close(got.grad, layout.shard(want.grad), rel, f"{what} d{name}")

    kv = 2 * layout.local_tokens * kv_heads * d  # K and V travel as one message
    acc = 8 if dtype == torch.float64 else 4  # gradient accumulators are float32 or float64
    if P == 1:
        assert fwd.snapshot() == {} and bwd.snapshot() == {}
    else:
        elem = torch.empty((), dtype=dtype).element_size()
        assert fwd.snapshot() == {"p2p": (P - 1) * kv * elem}
        assert bwd.snapshot() == {"p2p": (P - 1) * kv * elem + P * kv * acc}


@pytest.mark.parametrize(
    ("dtype_name", "backend"), [("float64", "reference"), ("float32", "cpu_flash")]
)
@pytest.mark.parametrize("world", WORLDS)
def test_ring_attention_matches_natural_order(world, dtype_name, backend) -> None:
    run_distributed(world, ring_attention_case, dtype_name, backend, 5)


# ---------------------------------------------------------------------------- ring exchange


def ring_exchange_case() -> None:
    grp, P, r = group()
    groups = [grp]
    if P == 4:
        groups += list(grp.factor(2))  # inner: consecutive ranks; outer: strided
    for tag, g in enumerate(groups, start=1):
        n = g.size
        mine = torch.arange(6, dtype=torch.float32) + 100 * g.ranks[g.rank]
        ring = RingExchange(g, tag=tag)
        with count_bytes(grp) as counter:  # factor groups report to the sp group's counters
            ring.start(mine)
            try:
                ring.start(mine)
            except RuntimeError as e:
                assert "twice" in str(e)
            else:
                raise AssertionError("a second start before wait was accepted")
            got = ring.wait()
        prev = g.ranks[(g.rank - 1) % n]
        assert torch.equal(got, torch.arange(6, dtype=torch.float32) + 100 * prev), g.ranks
        assert counter.snapshot() == {"p2p": 6 * 4}
        assert counter.calls["p2p"] == 1
    try:
        RingExchange(grp).wait()
    except RuntimeError as e:
        assert "before start" in str(e)
    else:
        raise AssertionError("wait before start was accepted")


@pytest.mark.parametrize("world", [2, 4])
def test_ring_exchange_receives_from_previous_rank(world: int) -> None:
    run_distributed(world, ring_exchange_case)


# ---------------------------------------------------------------------------- groups of one


def single_rank_group_case() -> None:
    """A group of one (here the trivial inner factor of the sp group) returns its input and
    sends nothing, even while the sp group's counter is listening."""
    grp, P, r = group()
    one, outer = grp.factor(1)
    assert one.size == 1 and outer is grp
    x = rnd((4, 6), 7).requires_grad_()
    with count_bytes(grp) as counter:
        assert all_gather_tokens(x, one) is x
        assert reduce_scatter_tokens(x, one) is x
        assert all_to_all(x, one, 1, 0) is x
        w = rnd((3, 6), 8).requires_grad_()
        y = zero_linear(x, w, one, input_major=False) + streamed_linear(
            x, w, one, input_major=False
        )
        y.sum().backward()
        assert torch.equal(w.grad, 2 * torch.ones(4, 3, dtype=torch.float64).t() @ x.detach())
    assert counter.snapshot() == {} and counter.total == 0


@pytest.mark.parametrize("world", [1, 4])
def test_group_of_one_sends_nothing(world: int) -> None:
    run_distributed(world, single_rank_group_case)


# ---------------------------------------------------------------------------- gloo algorithms


def algorithms_case() -> None:
    """Each collective on both of gloo's paths (its own ring algorithms and the one-round
    all-to-all forms `parallel_lib.comm` picks by size) gives the same values, every rank the
    same bits of an all-reduce, and the same byte counts."""
    import parallel_lib.comm as comm

    grp, P, r = group()
    xs = per_rank((6, 5), 11, P)
    big = per_rank((P * 4, 5), 12, P)
    direct = comm._direct
    results = {}
    for path in ("direct", "native"):
        comm._direct = direct if path == "direct" else (lambda x, g: False)
        try:
            with count_bytes(grp) as counter:
                gathered = comm.all_gather_dim0(xs[r], grp)
                scattered = comm.reduce_scatter_dim0(big[r], grp)
                summed = comm.all_reduce_(xs[r].clone(), grp)
                largest = comm.all_reduce_(xs[r].clone(), grp, op="max")
        finally:
            comm._direct = direct
        assert torch.equal(gathered, torch.cat(xs))
        assert torch.equal(scattered, sum(b[r * 4 : (r + 1) * 4] for b in big))
        assert torch.equal(summed, sum(xs))
        assert torch.equal(largest, torch.stack(xs).amax(0))
        results[path] = counter.snapshot()
    assert results["direct"] == results["native"]
    # a float32 sum whose rounding depends on the order: every rank still gets the same bits
    odd = torch.tensor([1.0, 1e-8, -1.0, 3.3], dtype=torch.float32) * (r + 1) / 7
    every = comm.all_gather_dim0(comm.all_reduce_(odd, grp).reshape(1, -1), grp)
    assert all(torch.equal(row, every[0]) for row in every)


@pytest.mark.parametrize("world", [2, 4])
def test_gloo_algorithms_agree(world: int) -> None:
    run_distributed(world, algorithms_case)
