"""`cost_models.static`: parameters counted against the real layers, and the per-rank bytes of
weights, gradients and optimizer state worked out by hand."""

from __future__ import annotations

import torch

from cost_models.static import layer_parameters, logits_bytes, static_memory
from paradyse import ReferenceDecoderLayer, SwitchableDecoderLayer, init_full_weights
from parallel_lib import CommGroup

from .layer_cases import SHAPE


def test_layer_parameters_match_the_reference_layer() -> None:
    full = init_full_weights(SHAPE, torch.Generator().manual_seed(0))
    reference = ReferenceDecoderLayer(SHAPE, full)
    assert layer_parameters(SHAPE) == sum(p.numel() for p in reference.parameters())


def test_one_rank_weights_match_the_switchable_layer() -> None:
    layer = SwitchableDecoderLayer(SHAPE, CommGroup.single())
    stored = sum(p.numel() * p.element_size() for p in layer.parameters())
    model = static_memory(SHAPE, layers=1, vocab=0, sp=1)
    assert model.weights == stored + SHAPE.hidden * 4  # + the final norm


def test_static_memory_by_hand() -> None:
    H, V, L = SHAPE.hidden, 1000, 3
    per_layer = layer_parameters(SHAPE) - 2 * H  # sharded part
    params = L * (per_layer // 4 + 2 * H) + 2 * V * H // 4 + H  # sp=4, untied embeddings
    bf16 = static_memory(SHAPE, L, V, sp=4, dp=2, dtype="bfloat16", shard_optimizer=True)
    assert bf16.weights == bf16.gradients == 2 * params
    assert bf16.optimizer == params * 12 // 2  # two fp32 moments + fp32 master, over dp=2
    fp32 = static_memory(SHAPE, L, V, sp=4, dp=2, dtype="float32", tied_embeddings=True)
    tied = params - V * H // 4
    assert fp32.weights == 4 * tied and fp32.optimizer == 8 * tied  # not sharded over dp
    assert fp32.total == fp32.weights + fp32.gradients + fp32.optimizer
    # whole logits: three float32 (T/sp, V) buffers; chunked: two of one chunk (all local tokens
    # if fewer)
    assert logits_bytes(256, V, 4) == 3 * 256 * (V // 4) * 4 == 3 * (256 // 4) * V * 4
    assert logits_bytes(256, V, 4, chunk=16) == 2 * 16 * V * 4
    one_chunk = 2 * 64 * V * 4  # a chunk as long as the 64 local tokens, or longer
    assert logits_bytes(256, V, 4, chunk=64) == logits_bytes(256, V, 4, chunk=1000) == one_chunk
    f64 = static_memory(SHAPE, L, V, sp=4, dtype="float64")
    assert f64.optimizer == 16 * params  # two float64 moments, no master copy
