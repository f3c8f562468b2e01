"""Hugging Face adapters: Llama-family models in (`model.init = "hf:PATH"`: a config.json +
safetensors folder or a GGUF file), models and checkpoints out (`python -m integrations.hf.export`),
tokenizers and instruction data. transformers, safetensors and gguf are imported only when used.
"""

from .config import hf_config_from_model, model_config_from_hf
from .files import HFError, Pretrained, open_pretrained
from .load import load_pretrained, pretrained_model_config

CONFIGURED_BY = 'model.init = "hf:PATH" (or --init hf:PATH)'
"""How a run turns this package on (it is no [integrations.NAME] table)."""

__all__ = [
    "CONFIGURED_BY",
    "HFError",
    "Pretrained",
    "hf_config_from_model",
    "load_pretrained",
    "model_config_from_hf",
    "open_pretrained",
    "pretrained_model_config",
]
