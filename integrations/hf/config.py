"""A Hugging Face Llama config (config.json) as a ParaDySe `ModelConfig`, and back.

Every field that changes the function the model computes is mapped or refused: a field the
model lacks (biases, another activation, another RoPE scaling, dropout, sliding windows) is an
`HFError` naming it, never silently ignored."""

from __future__ import annotations

from typing import Any

from paradyse.model import ModelConfig

from .files import HFError

__all__ = ["model_config_from_hf", "hf_config_from_model", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("llama",)
ARCHITECTURE = "LlamaForCausalLM"

_REFUSED = (  # (field, the value the model computes with, what the model lacks)
    ("attention_bias", False, "biases in the attention projections"),
    ("mlp_bias", False, "biases in the MLP"),
    ("hidden_act", "silu", "activations other than silu (SwiGLU)"),
    ("attention_dropout", 0.0, "attention dropout"),
    ("sliding_window", None, "sliding-window attention"),
)


def _rope_scaling(value: Any, where: str) -> tuple[float, float, float, float] | None:
    """None for plain RoPE, or Llama 3's (factor, low, high, original context)."""
    if value is None:
        return None
    kind = value.get("rope_type", value.get("type")) if isinstance(value, dict) else None
    if kind == "default":
        return None
    if kind != "llama3":
        raise HFError(f"{where}: rope_scaling {value!r} is not supported; the model implements "
                      "plain RoPE and rope_type 'llama3'")  # fmt: skip
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in value]
    if missing:
        raise HFError(f"{where}: rope_scaling of type llama3 lacks {', '.join(missing)}")
    return tuple(float(value[k]) for k in keys)


def model_config_from_hf(hf: dict[str, Any], init: str, where: str = "config.json") -> ModelConfig:
    """The ModelConfig of a Llama config dict; `init` is recorded as the model's `init`."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFError(f"{where}: model_type {model_type!r} is not supported; integrations.hf "
                      f"loads {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints")  # fmt: skip
    for key, wanted, lacks in _REFUSED:
        value = hf.get(key, wanted)
        if value != wanted and not (key == "attention_dropout" and value == 0):
            raise HFError(f"{where}: {key} = {value!r} is not supported (the model has no "
                          f"{lacks}); only {key} = {wanted!r} loads")  # fmt: skip
    try:
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // heads
        return ModelConfig(
            hidden=hidden,
            heads=heads,
            kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            ffn_hidden=int(hf["intermediate_size"]),
            layers=int(hf["num_hidden_layers"]),
            vocab=int(hf["vocab_size"]),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(hf.get("rope_scaling"), where),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init=init,
        )
    except KeyError as error:
        raise HFError(f"{where} lacks {error.args[0]!r}: it is not a Llama config") from None
    except (TypeError, ValueError) as error:
        raise HFError(f"{where}: {error}") from None


def hf_config_from_model(config: ModelConfig, base: dict[str, Any] | None = None) -> dict:
    """A Llama config.json dict for `config`; fields of `base` (the source's config, e.g. its
    token ids and context length) are kept where the shape does not set them."""
    if config.moe is not None:
        raise HFError(
            "the model has [model.moe] layers; integrations.hf exports Llama-family (dense) "
            "models only, so an MoE checkpoint stays a ParaDySe checkpoint"
        )
    out = dict(base or {})
    for key in (
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "quantization_config",
    ):
        out.pop(key, None)
    scaling = config.rope_scaling
    out.update(
        architectures=[ARCHITECTURE],
        model_type="llama",
        hidden_size=config.hidden,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim,
        intermediate_size=config.ffn_hidden,
        num_hidden_layers=config.layers,
        vocab_size=config.vocab,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        rope_scaling=None if scaling is None else {
            "rope_type": "llama3", "factor": scaling[0], "low_freq_factor": scaling[1],
            "high_freq_factor": scaling[2], "original_max_position_embeddings": int(scaling[3]),
        },
        tie_word_embeddings=config.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )  # fmt: skip
    out.setdefault(
        "max_position_embeddings", 8192 if scaling is None else int(scaling[3] * scaling[0])
    )
    return out
