"""Hugging Face adapters (DESIGN 10): Llama-family models and tokenizers from local folders or
GGUF files. Every module here is imported lazily, by configuration; importing this package pulls
in nothing heavy."""
