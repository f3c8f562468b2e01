"""Model shapes for what-if planning (`planners.explain`, the simulation benchmark).

`ModelSpec` has the five fields the cost models read (hidden, heads, kv_heads, head_dim,
ffn_hidden), so it serves as the layer shape, plus the layer count and vocabulary. The presets
are the paper's evaluation shapes in our layer (RMSNorm, RoPE, GQA attention, SwiGLU MLP).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["ModelSpec", "MODEL_PRESETS", "get_model", "swiglu_width"]


def swiglu_width(hidden: int, multiple: int = 256) -> int:
    """The SwiGLU width with the parameters of a 4h GELU MLP: 8h/3, rounded up to `multiple`."""
    return -(-8 * hidden // 3 // multiple) * multiple


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn_hidden: int
    layers: int
    """Decoder layers planned (the paper's truncated models: 8 of 80 or 96)."""
    vocab: int
    note: str = ""

    def __post_init__(self) -> None:
        for key in ("hidden", "heads", "kv_heads", "head_dim", "ffn_hidden", "layers", "vocab"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model {key} must be a positive integer, got {value!r}")
        if self.heads % self.kv_heads:
            raise ValueError(
                f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})"
            )

    def describe(self) -> str:
        return (
            f"{self.name}: {self.layers} layers, H={self.hidden}, heads {self.heads}/"
            f"{self.kv_heads} x {self.head_dim}, F={self.ffn_hidden}, vocab {self.vocab}"
        )


MODEL_PRESETS: dict[str, ModelSpec] = {
    "bert-large": ModelSpec(
        "bert-large", 1024, 16, 16, 64, swiglu_width(1024), 24, 30522,
        "BERT-large's width, heads and depth; SwiGLU at a 4h GELU MLP's parameter count",
    ),
    "llama-7b": ModelSpec(
        "llama-7b", 4096, 32, 32, 128, 11008, 32, 32000,
        "LLaMA-2-7B, all 32 layers (the shape of launch/configs/llama_7b.toml)",
    ),
    "llama-70b": ModelSpec(
        "llama-70b", 8192, 64, 8, 128, 28672, 8, 32000,
        "LLaMA-2-70B layers (GQA 64/8, F=28672), 8 of its 80 layers as in the paper",
    ),
    "gpt3-175b": ModelSpec(
        "gpt3-175b", 12288, 96, 96, 128, swiglu_width(12288), 8, 50257,
        "GPT-3 175B width and heads, 8 of its 96 layers as in the paper; SwiGLU at 4h GELU's"
        " parameter count",
    ),
    # The ParaDySe paper's own shapes (its public code: fused QKV, so multi-head attention with no
    # GQA, a 4h GELU MLP, TransformerConfig's default vocabulary of 50,000), in our layer
    "paper-bert": ModelSpec(
        "paper-bert", 1024, 16, 16, 64, swiglu_width(1024), 24, 50000,
        "the paper's BERT: 24 layers, H=1024, 16 heads; SwiGLU at its GELU MLP's parameter count",
    ),
    "paper-llama-70b": ModelSpec(
        "paper-llama-70b", 8192, 64, 64, 128, swiglu_width(8192), 8, 50000,
        "the paper's LLaMA-70B shape: 8 of 80 layers, H=8192, 64 heads without GQA, a 4h MLP's"
        " parameters",
    ),
    "paper-gpt3-175b": ModelSpec(
        "paper-gpt3-175b", 12288, 96, 96, 128, swiglu_width(12288), 8, 50000,
        "the paper's GPT-3-175B shape: 8 of 96 layers, H=12288, 96 heads, a 4h MLP's parameters",
    ),
    "cpu-tiny": ModelSpec(
        "cpu-tiny", 256, 8, 4, 32, 704, 4, 256,
        "the CPU test model: byte-level vocabulary",
    ),
}  # fmt: skip


def get_model(name: str, **overrides) -> ModelSpec:
    """A preset, with fields replaced by `overrides` (None values ignored); one-line ValueError
    for an unknown name."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model {name!r}; presets: {', '.join(MODEL_PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(MODEL_PRESETS[name], **given) if given else MODEL_PRESETS[name]
