"""Packed varlen attention kernels (`parallel_lib.attention`) against a plain masked softmax written
here, one sequence and one head at a time, in float64."""

from __future__ import annotations

import math

import pytest
import torch

from parallel_lib import attention_backward, attention_forward, merge_lse, varlen_attention

HEADS, KV_HEADS, D = 8, 4, 16
Q_LENS = [5, 1, 23, 12]  # uneven, one single-token sequence
K_LENS = [9, 4, 17, 12]  # non-causal only: keys per sequence differ from queries
CPU_BACKENDS = ["cpu_flash", "reference"]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2}
"""Tolerance relative to the largest reference entry. bfloat16: 8 significant bits (eps 7.8e-3);
the inputs are exact (the reference reads the same bfloat16 values), probabilities and the output
are rounded: about half an eps is seen, so one eps forward and two for gradients."""


def cumulative(lens: list[int]) -> list[int]:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


def make_qkv(q_lens, k_lens, dtype, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(n, h):
        t = torch.randn(n, h, D, generator=g, dtype=torch.float64).to(dtype)
        return t.requires_grad_(requires_grad)

    return rnd(sum(q_lens), HEADS), rnd(sum(k_lens), KV_HEADS), rnd(sum(k_lens), KV_HEADS)


def plain_attention(q, k, v, cu_q, cu_k, causal, scale=None):
    """out (Tq, h, d) and lse (h, Tq) by the textbook formula, differentiable, in q's dtype.
    Query head h reads key/value head h // (heads / kv_heads)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for i in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        o_heads, l_heads = [], []
        for h in range(q.shape[1]):
            qi, ki, vi = q[q0:q1, h], k[k0:k1, h // group], v[k0:k1, h // group]
            s = (qi @ ki.T) * scale  # (Sq, Sk)
            if causal:
                allowed = torch.arange(k1 - k0)[None, :] <= torch.arange(q1 - q0)[:, None]
                s = s.masked_fill(~allowed, float("-inf"))
            m = s.max(dim=1, keepdim=True).values
            e = torch.exp(s - m)
            o_heads.append((e / e.sum(1, keepdim=True)) @ vi)
            l_heads.append(m[:, 0] + torch.log(e.sum(1)))
        outs.append(torch.stack(o_heads, 1))
        lses.append(torch.stack(l_heads, 0))
    return torch.cat(outs), torch.cat(lses, 1)


def plain_grads(q, k, v, cu_q, cu_k, causal, dout):
    """(out, lse, dq, dk, dv) by float64 autograd through `plain_attention`."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = plain_attention(q, k, v, cu_q, cu_k, causal)
    out.backward(dout.double())
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def assert_close(actual, expected, rel, what):
    expected = expected.double()
    scale = float(expected.abs().max().clamp_min(1e-30))
    torch.testing.assert_close(
        actual.double(), expected, rtol=rel, atol=rel * scale, msg=lambda m: f"{what}: {m}"
    )


def problem(causal: bool):
    q_lens = Q_LENS
    k_lens = Q_LENS if causal else K_LENS
    return q_lens, k_lens, cumulative(q_lens), cumulative(k_lens)


# ---------------------------------------------------------------------------- forward, backward


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_forward_and_backward_match_plain_math(backend, causal, dtype) -> None:
    q_lens, k_lens, cu_q, cu_k = problem(causal)
    q, k, v = make_qkv(q_lens, k_lens, dtype, seed=1)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref_out, ref_lse, dq, dk, dv = plain_grads(q, k, v, cu_q, cu_k, causal, dout)

    out, lse = attention_forward(q, k, v, cu_q, cu_k, causal=causal, backend=backend)
    what = f"{backend} {dtype} causal={causal}"
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.shape == (HEADS, q.shape[0])
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, ref_out, TOL[dtype], f"{what} out")
    assert_close(lse, ref_lse, TOL[dtype], f"{what} lse")

    grads = attention_backward(
        dout.to(dtype), q, k, v, out, lse, cu_q, cu_k, causal=causal, backend=backend
    )
    for name, got, want in zip(("dq", "dk", "dv"), grads, (dq, dk, dv), strict=True):
        assert got.dtype == dtype and got.shape == want.shape, f"{what} {name}"
        assert_close(got, want, TOL[dtype], f"{what} {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_explicit_scale(backend) -> None:
    q_lens, k_lens, cu_q, cu_k = problem(causal=False)
    q, k, v = make_qkv(q_lens, k_lens, torch.float64, seed=3)
    out, lse = attention_forward(q, k, v, cu_q, cu_k, causal=False, scale=0.37, backend=backend)
    ref_out, ref_lse = plain_attention(q, k, v, cu_q, cu_k, False, scale=0.37)
    assert_close(out, ref_out, 1e-10, "out")
    assert_close(lse, ref_lse, 1e-10, "lse")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_bfloat16_cpu_flash(causal) -> None:
    q_lens, k_lens, cu_q, cu_k = problem(causal)
    q, k, v = make_qkv(q_lens, k_lens, torch.bfloat16, seed=4)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    ref_out, ref_lse, dq, dk, dv = plain_grads(q, k, v, cu_q, cu_k, causal, dout)
    out, lse = attention_forward(q, k, v, cu_q, cu_k, causal=causal, backend="cpu_flash")
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert_close(out, ref_out, TOL[torch.bfloat16], "bf16 out")
    assert_close(lse, ref_lse, TOL[torch.bfloat16], "bf16 lse")
    grads = attention_backward(
        dout, q, k, v, out, lse, cu_q, cu_k, causal=causal, backend="cpu_flash"
    )
    for name, got, want in zip(("dq", "dk", "dv"), grads, (dq, dk, dv), strict=True):
        assert got.dtype == torch.bfloat16
        assert_close(got, want, 2 * TOL[torch.bfloat16], f"bf16 {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_varlen_attention_autograd(backend, dtype) -> None:
    cu = cumulative(Q_LENS)
    q, k, v = make_qkv(Q_LENS, Q_LENS, dtype, seed=6, requires_grad=True)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref_out, _, dq, dk, dv = plain_grads(q, k, v, cu, cu, True, dout)
    out = varlen_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), backend=backend)
    assert_close(out, ref_out, TOL[dtype], "varlen out")
    out.backward(dout.to(dtype))
    for name, got, want in (("dq", q.grad, dq), ("dk", k.grad, dk), ("dv", v.grad, dv)):
        assert_close(got, want, TOL[dtype], f"varlen {backend} {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["f64", "f32", "bf16"])  # fmt: skip
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cpu_flash_batches_equal_lengths_bitwise(causal, dtype) -> None:
    """Runs of consecutive sequences of equal lengths are one batched kernel call, whose every
    output and gradient is bitwise the one-call-per-sequence result."""
    import parallel_lib.attention as kernels

    q_lens, k_lens = [7, 7, 7, 3, 12, 12, 1, 1], [7, 7, 7, 3, 12, 12, 1, 1]
    if not causal:
        k_lens = [9, 9, 9, 3, 5, 5, 2, 2]
    cu_q, cu_k = cumulative(q_lens), cumulative(k_lens)
    q, k, v = make_qkv(q_lens, k_lens, dtype, seed=5)
    dout = make_qkv(q_lens, q_lens, dtype, seed=6)[0]
    runs = list(kernels._runs(cu_q, cu_k, causal, True))
    assert [n for *_, n in runs] == [3, 1, 2, 2]
    out, lse = attention_forward(q, k, v, cu_q, cu_k, causal=causal, backend="cpu_flash")
    grads = attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal=causal,
                               backend="cpu_flash")  # fmt: skip
    scale = 1 / math.sqrt(D)
    for i in range(len(q_lens)):
        a, b, c, e = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        o, m = kernels._cpu_forward(q[a:b], k[c:e], v[c:e], causal, scale)
        assert torch.equal(out[a:b], o) and torch.equal(lse[:, a:b], m)
        one = kernels._cpu_backward(dout[a:b], q[a:b], k[c:e], v[c:e], out[a:b], lse[:, a:b],
                                    causal, scale)  # fmt: skip
        for got, want in zip((grads[0][a:b], grads[1][c:e], grads[2][c:e]), one, strict=True):
            assert torch.equal(got, want)


def test_unknown_backend_raises() -> None:
    q, k, v = make_qkv([4], [4], torch.float32, seed=8)
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        attention_forward(q, k, v, [0, 4], [0, 4], causal=True, backend="fast")


def test_causal_needs_equal_lengths() -> None:
    q, k, v = make_qkv([4], [5], torch.float32, seed=9)
    with pytest.raises(ValueError, match="equal query and key lengths"):
        attention_forward(q, k, v, [0, 4], [0, 5], causal=True, backend="reference")


# ---------------------------------------------------------------------------- merge_lse


def split_keys(k_lens: list[int], seed: int):
    """A random partition of every sequence's keys into two sets (one set empty for sequence 1):
    global key indices and cumulative lengths of each block."""
    g = torch.Generator().manual_seed(seed)
    cu = cumulative(k_lens)
    blocks = ([], []), ([], [])  # (indices, lengths) per block
    for i, n in enumerate(k_lens):
        in_a = torch.rand(n, generator=g) < 0.5
        if i == 1:
            in_a[:] = True
        for blk, mask in ((blocks[0], in_a), (blocks[1], ~in_a)):
            idx = (torch.nonzero(mask)[:, 0] + cu[i]).tolist()
            blk[0].extend(idx)
            blk[1].append(len(idx))
    return [(torch.tensor(idx, dtype=torch.int64), cumulative(lens)) for idx, lens in blocks]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_merge_lse_of_disjoint_key_blocks(backend) -> None:
    dtype = torch.float64
    q_lens, k_lens, cu_q, cu_k = problem(causal=False)
    q, k, v = make_qkv(q_lens, k_lens, dtype, seed=10)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(11), dtype=dtype)
    ref_out, ref_lse, dq, dk, dv = plain_grads(q, k, v, cu_q, cu_k, False, dout)

    (idx_a, cu_a), (idx_b, cu_b) = split_keys(k_lens, seed=12)
    assert len(idx_a) > 0 and len(idx_b) > 0
    assert sorted(idx_a.tolist() + idx_b.tolist()) == list(range(k.shape[0]))
    kw = {"causal": False, "backend": backend}
    out_a, lse_a = attention_forward(q, k[idx_a], v[idx_a], cu_q, cu_a, **kw)
    out_b, lse_b = attention_forward(q, k[idx_b], v[idx_b], cu_q, cu_b, **kw)
    assert torch.isinf(lse_b[:, cu_q[1] : cu_q[2]]).all(), "sequence 1 has no keys in block b"

    # start from the empty attention (lse = -inf) as an online softmax does
    out = torch.zeros_like(q)
    lse = torch.full((HEADS, q.shape[0]), float("-inf"), dtype=dtype)
    out, lse = merge_lse(out, lse, out_a, lse_a)
    out, lse = merge_lse(out, lse, out_b, lse_b)
    assert_close(out, ref_out, 1e-10, "merged out")
    assert_close(lse, ref_lse, 1e-10, "merged lse")

    # per-block backward with the MERGED out and lse: exact contributions to the whole gradient
    ga = attention_backward(dout, q, k[idx_a], v[idx_a], out, lse, cu_q, cu_a, **kw)
    gb = attention_backward(dout, q, k[idx_b], v[idx_b], out, lse, cu_q, cu_b, **kw)
    got_dk, got_dv = torch.zeros_like(k), torch.zeros_like(v)
    got_dk[idx_a], got_dk[idx_b] = ga[1], gb[1]
    got_dv[idx_a], got_dv[idx_b] = ga[2], gb[2]
    assert_close(ga[0] + gb[0], dq, 1e-10, "dq")
    assert_close(got_dk, dk, 1e-10, "dk")
    assert_close(got_dv, dv, 1e-10, "dv")


def test_merge_lse_both_empty_rows_stay_empty() -> None:
    out = torch.zeros(3, 2, 4)
    lse = torch.full((2, 3), float("-inf"))
    merged, merged_lse = merge_lse(out, lse, torch.zeros(3, 2, 4), lse.clone())
    assert torch.isneginf(merged_lse).all()
    assert torch.equal(merged, torch.zeros(3, 2, 4))


# ---------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cuda_flash_bfloat16(causal) -> None:
    q_lens, k_lens, cu_q, cu_k = problem(causal)
    q, k, v = (t.cuda() for t in make_qkv(q_lens, k_lens, torch.bfloat16, seed=13))
    dout_cpu = torch.randn(q.shape, generator=torch.Generator().manual_seed(14)).bfloat16()
    ref_out, ref_lse, dq, dk, dv = plain_grads(
        q.cpu(), k.cpu(), v.cpu(), cu_q, cu_k, causal, dout_cpu
    )
    dout = dout_cpu.cuda()
    out, lse = attention_forward(q, k, v, cu_q, cu_k, causal=causal, backend="cuda_flash")
    assert out.dtype == torch.bfloat16 and out.device.type == "cuda"
    assert_close(out.cpu(), ref_out, TOL[torch.bfloat16], "cuda out")
    assert_close(lse.cpu(), ref_lse, TOL[torch.bfloat16], "cuda lse")
    grads = attention_backward(
        dout, q, k, v, out, lse, cu_q, cu_k, causal=causal, backend="cuda_flash"
    )
    for name, got, want in zip(("dq", "dk", "dv"), grads, (dq, dk, dv), strict=True):
        assert got.shape == want.shape, name
        assert_close(got.cpu(), want, 2 * TOL[torch.bfloat16], f"cuda {name}")
    ref_backend = attention_forward(q, k, v, cu_q, cu_k, causal=causal, backend="reference")[0]
    assert_close(out.cpu(), ref_backend.cpu(), TOL[torch.bfloat16], "cuda vs reference backend")
