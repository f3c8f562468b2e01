"""Model-level memory that does not depend on the micro-batch's activations: weights, gradients,
optimizer state, embeddings; and the logits of the loss (DESIGN 6). Pure Python."""

from __future__ import annotations

from dataclasses import dataclass

from .counts import itemsize

__all__ = ["StaticMemory", "static_memory", "layer_parameters", "logits_bytes"]


def layer_parameters(shape) -> int:
    """Parameters of one whole decoder layer: Q, K, V, O, gate, up, down, two norm weights."""
    H, d = shape.hidden, shape.head_dim
    attention = (shape.heads + 2 * shape.kv_heads) * d * H + shape.heads * d * H
    return attention + 3 * shape.ffn_hidden * H + 2 * H


@dataclass(frozen=True)
class StaticMemory:
    """Bytes per rank."""

    weights: int
    gradients: int
    optimizer: int
    """AdamW's two moments (float32, or float64 for float64 weights), plus float32 master
    weights for 16-bit weights."""

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


def static_memory(
    shape,
    layers: int,
    vocab: int,
    *,
    sp: int,
    dp: int = 1,
    dtype="float32",
    tied_embeddings: bool = False,
    shard_optimizer: bool = False,
) -> StaticMemory:
    """Weights are 1/sp shards (layers, vocabulary-sharded embedding and LM head); norms are
    replicated. Gradients have the weights' dtype. Optimizer state is sharded over dp when
    `shard_optimizer`."""
    H = shape.hidden
    per_layer = (layer_parameters(shape) - 2 * H) // sp + 2 * H
    embeddings = vocab * H // sp * (1 if tied_embeddings else 2)
    params = layers * per_layer + embeddings + H  # + the final norm
    b = itemsize(dtype)
    # two moments in max(dtype, float32), plus float32 master weights for 16-bit weights
    optimizer_per_param = 2 * max(b, 4) + (4 if b < 4 else 0)
    optimizer = params * optimizer_per_param // (dp if shard_optimizer else 1)
    return StaticMemory(weights=params * b, gradients=params * b, optimizer=optimizer)


def logits_bytes(tokens: int, vocab: int, sp: int) -> int:
    """The vocabulary-sharded LM head's float32 logits and their gradient on one rank: every one
    of the micro-batch's T tokens against this rank's vocab/sp rows."""
    return 2 * tokens * (vocab // sp) * 4
