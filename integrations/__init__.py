"""Optional integrations (GRASS, Alloc-MoE, Megatron-Core, Hugging Face), imported lazily through
configuration; nothing else in the project imports this package."""

__all__: list[str] = []
