"""The P = 1 layer on CUDA against the float64 reference (skipped without CUDA).

One GPU cannot run multi-rank NCCL, so the distributed strategies are covered on CPU; here the CUDA
pieces: the varlen flash kernel path (bfloat16) and the reference kernel path (float32) inside a
whole layer, forward and backward, under every recompute mode."""

from __future__ import annotations

import pytest
import torch

from paradyse import PackedBatch, SwitchableDecoderLayer
from parallel_lib import RECOMPUTE_MODES, CommGroup, get_strategy

from .layer_cases import SHAPE, Case, assert_close, uneven_lengths

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(("dtype", "rel"), [(torch.bfloat16, 3e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("recompute", RECOMPUTE_MODES)
def test_layer_on_cuda_matches_reference(dtype: torch.dtype, rel: float, recompute: str) -> None:
    case = Case(uneven_lengths(1), seed=3)
    out, dx, grads = case.reference()
    group = CommGroup.single()
    batch = PackedBatch.pack(case.tokens, device="cuda")
    layer = SwitchableDecoderLayer(SHAPE, group, dtype=dtype, device="cuda")
    layer.load_full_weights({k: v.to(dtype) for k, v in case.full[0].items()})
    x = case.local(batch, case.xs).to("cuda", dtype).requires_grad_()
    y = layer(x, batch, get_strategy("local"), recompute)
    y.backward(case.local(batch, case.dys).to("cuda", dtype))
    real = batch.real_mask()
    assert_close(y[real].cpu(), case.local(batch, out).cuda()[real].cpu(), rel, "output")
    assert_close(x.grad[real].cpu(), case.local(batch, dx).cuda()[real].cpu(), rel, "input grad")
    expected = case.expected_shards(grads[0], 1, 0)
    for name, got in layer.shard_tensors(grads=True).items():
        assert_close(got.cpu(), expected[name], rel, f"grad {name}")
