"""Tiny random Hugging Face Llama checkpoints for the integration's tests (nothing downloaded)."""

from __future__ import annotations

import os

import torch

VOCAB = 128
LENGTHS = [1, 7, 29, 64, 3, 40]
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}  # fmt: skip
"""Llama 3 scaling with a short original context, so the test lengths reach every band."""


def tiny_llama(folder: str, *, tied: bool, rope_scaling=None, seed: int = 0, **overrides):
    """A random LlamaForCausalLM (8 heads, 4 kv heads: sp = 1, 2, 4) saved to `folder`;
    returns the float32 model in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(
        hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=16,
        intermediate_size=128, num_hidden_layers=3, vocab_size=VOCAB, rms_norm_eps=1e-5,
        rope_theta=500.0, tie_word_embeddings=tied, rope_scaling=rope_scaling,
        max_position_embeddings=256,
    )  # fmt: skip
    config = LlamaConfig(**{**fields, **overrides})
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # norms away from 1, so that a missed norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    return model


def tokens() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


@torch.no_grad()
def hf_logits(model, sequences) -> list[torch.Tensor]:
    """Each sequence alone through transformers: (n, V) float32 logits."""
    return [model(torch.tensor([s])).logits[0].float() for s in sequences]
