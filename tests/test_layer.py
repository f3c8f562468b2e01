"""The switchable layer's weight layout: sharding whole weights and reassembling them."""

from __future__ import annotations

import pytest
import torch

from paradyse import full_from_shards, init_full_weights, shard_full_weights

from .layer_cases import SHAPE


@pytest.mark.parametrize("P", [1, 2, 4])
def test_shards_reassemble_to_the_whole_weights(P: int) -> None:
    full = init_full_weights(SHAPE, torch.Generator().manual_seed(P), torch.float64)
    shards = [shard_full_weights(full, SHAPE, P, r) for r in range(P)]
    d, H = SHAPE.head_dim, SHAPE.hidden
    for r, shard in enumerate(shards):  # sizes of the unified layout
        assert shard["attn_qkv"].shape == ((SHAPE.heads + 2 * SHAPE.kv_heads) // P * d, H)
        assert shard["attn_out"].shape == (SHAPE.heads // P * d, H)
        assert shard["mlp_gate_up"].shape == (2 * SHAPE.ffn_hidden // P, H)
        assert shard["mlp_down"].shape == (SHAPE.ffn_hidden // P, H)
        # rank r's query rows are heads r*heads/P .. of W_q, taken straight from the whole weight
        rows = SHAPE.heads // P * d
        assert torch.equal(shard["attn_qkv"][:rows], full["wq"][r * rows : (r + 1) * rows])
    rebuilt = full_from_shards(shards, SHAPE)
    assert rebuilt.keys() == full.keys()
    for name, value in full.items():
        assert torch.equal(rebuilt[name], value), name
