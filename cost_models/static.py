"""Model-level memory that does not depend on the micro-batch's activations: weights, gradients,
optimizer state, embeddings; and the logits of the loss (DESIGN 6). Pure Python."""

from __future__ import annotations

from dataclasses import dataclass

from .counts import itemsize

__all__ = [
    "StaticMemory", "static_memory", "layer_parameters", "moe_layer_parameters",
    "logits_bytes", "vocab_transient_bytes", "LOGITS_CHUNK",
]  # fmt: skip

LOGITS_CHUNK = 1024
"""Tokens per chunk of the training loss's head and cross-entropy by default (`train.logits_chunk`,
`paradyse.head_loss`): at a 128K vocabulary a chunk's float32 logits are 0.5 GiB."""


def layer_parameters(shape) -> int:
    """Parameters of one whole decoder layer: Q, K, V, O, gate, up, down, two norm weights."""
    H, d = shape.hidden, shape.head_dim
    attention = (shape.heads + 2 * shape.kv_heads) * d * H + shape.heads * d * H
    return attention + 3 * shape.ffn_hidden * H + 2 * H


def moe_layer_parameters(shape, moe) -> tuple[int, int]:
    """(sharded, replicated) parameters of one whole mixture-of-experts decoder layer: Q, K, V,
    O, the E experts' gate, up and down, the shared experts' (width F_s); the router (E, H) and
    the two norm weights, which every rank holds whole."""
    H, d = shape.hidden, shape.head_dim
    attention = (shape.heads + 2 * shape.kv_heads) * d * H + shape.heads * d * H
    experts = moe.experts * 3 * moe.expert_ffn_hidden * H + 3 * moe.shared_ffn_hidden * H
    return attention + experts, moe.experts * H + 2 * H


def _layer_shard(shape, moe, sp: int) -> int:
    """Parameters one rank stores of one layer (dense: moe None)."""
    if moe is None:
        return (layer_parameters(shape) - 2 * shape.hidden) // sp + 2 * shape.hidden
    sharded, replicated = moe_layer_parameters(shape, moe)
    return sharded // sp + replicated


@dataclass(frozen=True)
class StaticMemory:
    """Bytes per rank."""

    weights: int
    gradients: int
    optimizer: int
    """AdamW's two moments (float32, or float64 for float64 weights), plus float32 master
    weights for 16-bit weights."""
    layer_moments: int = 0
    """Of `optimizer`, one switchable layer's AdamW moments: what an optimizer wrapper may keep
    off the device while the layer is frozen (master weights stay with the parameters)."""
    layer_gradients: int = 0
    """Of `gradients`, one switchable layer's gradient buffer, which the engine frees while
    the layer is frozen."""
    moe_layer_moments: int = 0
    """`layer_moments` of one mixture-of-experts layer (0 without one)."""
    moe_layer_gradients: int = 0
    """`layer_gradients` of one mixture-of-experts layer (0 without one)."""

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
    moe=None,
    moe_layers: int = 0,
) -> StaticMemory:
    """Weights are 1/sp shards (layers, vocabulary-sharded embedding and LM head); norms are
    replicated. Gradients have the weights' dtype. Optimizer state is sharded over dp when
    `shard_optimizer`. `moe_layers` of the `layers` are mixture-of-experts layers of `moe`
    (a `parallel_lib.moe.MoeShape` or anything with its fields): E/sp whole experts and
    F_s/sp of the shared experts per rank, the router replicated."""
    H = shape.hidden
    if not 0 <= moe_layers <= layers or (moe_layers and moe is None):
        raise ValueError(f"moe_layers must be in [0, {layers}] with a moe shape, got {moe_layers}")
    per_layer = _layer_shard(shape, None, sp)
    per_moe = _layer_shard(shape, moe, sp) if moe_layers else 0
    embeddings = vocab * H // sp * (1 if tied_embeddings else 2)
    params = (layers - moe_layers) * per_layer + moe_layers * per_moe + embeddings + H
    b = itemsize(dtype)
    # two moments in max(dtype, float32), plus float32 master weights for 16-bit weights
    moments, masters = 2 * max(b, 4), 4 if b < 4 else 0
    shards = dp if shard_optimizer else 1
    optimizer = params * (moments + masters) // shards
    return StaticMemory(
        weights=params * b,
        gradients=params * b,
        optimizer=optimizer,
        layer_moments=per_layer * moments // shards,
        layer_gradients=per_layer * b,
        moe_layer_moments=per_moe * moments // shards,
        moe_layer_gradients=per_moe * b,
    )


def logits_bytes(tokens: int, vocab: int, sp: int, chunk: int = 0) -> int:
    """What the LM head and the loss hold at once on one rank, beside every layer's saved bytes:
    float32 buffers of (rows x vocab), rows out of this rank's T/sp local tokens.

    Whole logits (`chunk` 0): three of all T/sp local tokens (written T x vocab/sp), the peak of
    the cross-entropy's backward: the log-softmax it keeps, its gradient and the logits' gradient
    (the forward holds two: the logits and their log-softmax). Chunked (`paradyse.head_loss`):
    two of one chunk of `chunk` local tokens (all of them, if fewer): a chunk's logits and their
    log-softmax, in the forward and again in the backward's recomputation, whose gradient then
    takes the log-softmax's buffer (in bfloat16 plus half a buffer, its 16-bit copy, once the
    logits are freed). Measured with MemTracker, float32 and bfloat16: 3.0 and 2.0 buffers
    (`tests/test_head_loss.py`)."""
    if chunk <= 0:
        return 3 * tokens * (vocab // sp) * 4
    return 2 * min(chunk, -(-tokens // sp)) * vocab * 4


def vocab_transient_bytes(vocab: int, hidden: int, dtype) -> int:
    """The embedding's and LM head's whole (vocab, hidden) weight, gathered for a micro-batch,
    and its dense gradient before the reduce-scatter: live beside the logits in the head's
    backward, so a planner counts it with the static memory."""
    return 2 * vocab * hidden * itemsize(dtype)
