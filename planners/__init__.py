"""Layer-wise strategy and recompute selection per micro-batch (DESIGN 7). Pure Python/numpy."""

__all__: list[str] = []
