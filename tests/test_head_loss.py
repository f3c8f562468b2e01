"""The loss's LM head over chunks of tokens (`paradyse.head_loss`): the summed loss and every
gradient equal the whole logits' within 1e-6 (float32) for chunks that divide the local tokens,
that do not, and one larger than them, at P = 1 and P = 2; and the peak memory of a long
micro-batch, measured with MemTracker, drops by the logits term."""

from __future__ import annotations

import pytest
import torch

import paradyse
from cost_models import logits_bytes
from paradyse import DecoderModel, ModelConfig, PackedBatch
from paradyse.head_loss import chunked_head_loss
from paradyse.memory import PeakMemory
from parallel_lib import CommGroup, all_reduce_

from .harness import run_distributed
from .layer_cases import assert_close, mesh_for

CONFIG = ModelConfig(hidden=32, heads=4, kv_heads=2, head_dim=8, ffn_hidden=64, layers=2,
                     vocab=128)  # fmt: skip
LENGTHS = [1, 8, 57, 30]  # 96 local tokens at P = 1, 52 per rank at P = 2 (padded to 4s)
CHUNKS = (7, 32, 4096)  # 32 divides 96; 7 divides neither; 4096: one chunk


def _tokens() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, CONFIG.vocab, (n,), generator=g).tolist() for n in LENGTHS]


def _loss_and_grads(model: DecoderModel, batch: PackedBatch, chunk: int) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    model.logits_chunk = chunk
    loss = model(batch)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


def _compare(
    config: ModelConfig = CONFIG,
    dtype: torch.dtype = torch.float32,
    rel: float = 1e-6,
    loss_rel: float = 1e-6,
) -> list[int]:
    """On this rank: each chunk size's loss (summed over the group) and every parameter's
    gradient against the whole logits', within `rel` of the tensor's scale (`assert_close`);
    the chunk sizes checked."""
    mesh = mesh_for()
    model = DecoderModel(config, mesh.sp_group, seed=7, dtype=dtype)
    for layer in model.layers:
        layer.set_option("local" if mesh.sp == 1 else "tp_sp", "none")
    batch = PackedBatch.pack(_tokens(), mesh.sp, mesh.sp_rank)
    want_loss, want = _loss_and_grads(model, batch, 0)
    for chunk in CHUNKS:
        loss, grads = _loss_and_grads(model, batch, chunk)
        total = torch.tensor([loss - want_loss, want_loss], dtype=torch.float64)
        all_reduce_(total, mesh.sp_group)
        assert abs(float(total[0])) <= loss_rel * abs(float(total[1])), (chunk, total)
        for name, grad in grads.items():
            assert grad.dtype == want[name].dtype, (name, grad.dtype)
            assert_close(grad, want[name], rel, f"chunk {chunk}: {name}")
    return list(CHUNKS)


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_and_gradients_equal_the_whole_logits(tied) -> None:
    assert _compare(ModelConfig(**{**CONFIG.__dict__, "tie_embeddings": tied})) == list(CHUNKS)


def test_chunked_loss_at_two_ranks() -> None:
    assert run_distributed(2, _compare) == [list(CHUNKS)] * 2


def test_chunked_loss_in_bfloat16_keeps_float32_logits() -> None:
    """bfloat16 weights: the same float32 loss (logits computed alike), gradients to bfloat16
    rounding (the chunked weight gradient is summed chunk by chunk in bfloat16)."""
    _compare(dtype=torch.bfloat16, rel=3e-2, loss_rel=1e-5)


def test_the_function_refuses_bad_input_and_skips_a_frozen_weight() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 4, generator=g, requires_grad=True)
    weight = torch.randn(6, 4, generator=g)  # frozen: no weight gradient is computed
    labels = torch.tensor([0, 1, 2, 3, 4, 5, -100, 0, 1, 2])
    loss = chunked_head_loss(h, weight, labels, CommGroup.single(), 3)
    loss.backward()
    loss = loss.detach()
    want = torch.nn.functional.cross_entropy(h.detach() @ weight.t(), labels, reduction="sum")
    assert abs(float(loss) - float(want)) <= 1e-6 * float(want) and h.grad.shape == h.shape
    with pytest.raises(ValueError, match="positive number of tokens"):
        chunked_head_loss(h, weight, labels, CommGroup.single(), 0)
    with pytest.raises(ValueError, match="labels"):
        chunked_head_loss(h, weight, labels[:5], CommGroup.single(), 3)
    with pytest.raises(ValueError, match="logits_chunk"):
        DecoderModel(CONFIG, CommGroup.single(), logits_chunk=-1)


def test_a_long_micro_batch_peaks_lower_by_the_logits_term() -> None:
    """One 3,072-token sequence, vocabulary 4,096, a tiny model: the logits dominate. MemTracker's
    peak of a forward and backward with the whole logits and in chunks of 256 tokens: the drop is
    most of the whole logits' bytes (the float32 (T, V) buffers the whole loss holds: three at
    its backward's peak) and the cost model's `logits_bytes` predicts it; the losses are equal."""
    config = ModelConfig(hidden=16, heads=2, kv_heads=2, head_dim=8, ffn_hidden=32, layers=1,
                         vocab=4096)  # fmt: skip
    T, chunk = 3072, 256
    ids = torch.randint(0, config.vocab, (T,), generator=torch.Generator().manual_seed(0))
    batch = PackedBatch.pack([ids.tolist()], 1, 0)
    peaks, losses = {}, {}
    for size in (0, chunk):
        model = DecoderModel(config, CommGroup.single(), seed=1, logits_chunk=size)
        with PeakMemory(torch.device("cpu"), model) as memory:
            loss = model(batch)
            loss.backward()
        peaks[size], losses[size] = memory.peak_bytes, float(loss.detach())
    logits = T * config.vocab * 4  # the whole float32 logits, one buffer
    drop = peaks[0] - peaks[chunk]
    assert drop >= 0.7 * logits, (peaks, logits)
    predicted = logits_bytes(T, config.vocab, 1) - logits_bytes(T, config.vocab, 1, chunk)
    assert abs(drop - predicted) <= 0.1 * predicted, (drop, predicted)
    assert abs(losses[chunk] - losses[0]) <= 1e-6 * abs(losses[0]), losses
    assert paradyse.DecoderModel(config, CommGroup.single()).logits_chunk == 1024  # the default
