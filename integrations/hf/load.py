"""Loading a Hugging Face Llama model into `paradyse.DecoderModel` at any dp x sp.

`model.init = "hf:PATH"`: `pretrained_model_config` reads the source's config (the model's shape
comes from it), the trainer builds the model with `random_init=False` (nothing is drawn), and
`load_pretrained` copies each rank's shards in: from a safetensors folder every rank reads only
its own rows and columns (its heads of Q, K, V and O, its rows of the MLP, its block of the
vocabulary), so host memory and reading time do not grow with the whole model.

Hugging Face's Llama and the switchable layer compute the same function with the same weight
conventions (rotate-half RoPE, GQA, SwiGLU, RMSNorm), so the tensors map by name alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from paradyse.model import DecoderModel, ModelConfig

from .config import model_config_from_hf
from .files import HFError, Pretrained, open_pretrained

__all__ = ["LAYER_NAMES", "pretrained_model_config", "load_pretrained", "hf_name", "source_of"]

LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}
"""The switchable layer's whole weights (`paradyse.layer.shard_full_weights`) -> HF names."""

EMBEDDING, HEAD, NORM = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"


def hf_name(layer: int, key: str) -> str:
    return f"model.layers.{layer}.{LAYER_NAMES[key]}"


def source_of(init: str) -> str:
    """PATH of a `model.init` of the form 'hf:PATH'."""
    if not init.startswith("hf:") or not init[3:]:
        raise HFError(f"model.init {init!r} names no Hugging Face model: write hf:PATH")
    return init[3:]


def pretrained_model_config(init: str, *, whole: bool = False) -> tuple[ModelConfig, Pretrained]:
    """The model config of the 'hf:PATH' source and the opened source (HFError, one line)."""
    source = open_pretrained(source_of(init), whole=whole)
    where = str(source.path if source.path.is_file() else source.path / "config.json")
    return model_config_from_hf(source.config, init, where), source


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    H, V, F, d = config.hidden, config.vocab, config.ffn_hidden, config.head_dim
    q, kv = config.heads * d, config.kv_heads * d
    layer = {"attn_norm": (H,), "wq": (q, H), "wk": (kv, H), "wv": (kv, H), "wo": (H, q),
             "mlp_norm": (H,), "w_gate": (F, H), "w_up": (F, H), "w_down": (H, F)}  # fmt: skip
    shapes = {EMBEDDING: (V, H), NORM: (H,)}
    if not config.tie_embeddings:
        shapes[HEAD] = (V, H)
    for i in range(config.layers):
        shapes.update({hf_name(i, key): shape for key, shape in layer.items()})
    return shapes


def check_shapes(source: Pretrained, config: ModelConfig) -> None:
    """Every tensor the model needs is in `source` with the shape its config implies."""
    for name, shape in _expected_shapes(config).items():
        found = source.shape(name)
        if found != shape:
            raise HFError(
                f"{source.path}: {name} has shape {list(found)}, but its config implies "
                f"{list(shape)}: the checkpoint and config.json disagree"
            )


class _Rows:
    """A whole tensor of the source that reads only what it is indexed with."""

    def __init__(self, source: Pretrained, name: str) -> None:
        self.source, self.name = source, name

    def __getitem__(self, index: Any) -> Tensor:
        return self.source.read(self.name, index)


@torch.no_grad()
def load_pretrained(model: DecoderModel, source: Pretrained) -> None:
    """Copy this rank's shards of every weight of `source` into `model` (converted to the
    model's dtype); the model's config must be the source's (`pretrained_model_config`)."""
    config, group = model.config, model.group
    check_shapes(source, config)
    rows = config.vocab // group.size
    mine = slice(group.rank * rows, (group.rank + 1) * rows)
    model.embedding.weight.copy_(source.read(EMBEDDING, mine))
    if not config.tie_embeddings:
        model.head.weight.copy_(source.read(HEAD, mine))
    model.norm.weight.copy_(source.read(NORM))
    for i, layer in enumerate(model.layers):
        full = {key: _Rows(source, hf_name(i, key)) for key in LAYER_NAMES}
        for norm in ("attn_norm", "mlp_norm"):  # replicated: read whole
            full[norm] = source.read(hf_name(i, norm))
        layer.load_full_weights(full)
