"""Analytic memory of one decoder layer on one rank (DESIGN 6): bytes saved for backward in
closed form (`layer_dims`) and the peaks of its forward and backward from a replay of the tensors
each strategy allocates and frees (`replay`). Pure Python."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from .counts import check_config
from .layer_dims import layer_dims, saved_bytes
from .replay import Replay

__all__ = ["LayerMemory", "layer_memory"]


@dataclass(frozen=True)
class LayerMemory:
    """Bytes on one rank for one layer. The layer's input x, the incoming output gradient and the
    parameters with their gradients are outside these numbers (static or another layer's)."""

    saved: int
    """Held from the forward to the backward, the layer input included."""
    forward_peak: int
    """Most bytes live during the forward, the saved ones and the output included."""
    backward_peak: int
    """Most bytes live during the backward (recomputation included), output and saved ones
    included."""
    input_bytes: int
    """The layer input x (= its output), (T/P, H)."""

    @property
    def transient(self) -> int:
        """What the layer needs beyond the saved bytes of every layer, at its worst moment."""
        return max(self.forward_peak, self.backward_peak) - (self.saved - self.input_bytes)


def layer_memory(
    shape,
    strategy: str,
    seq_lens: Sequence[int],
    P: int,
    *,
    dtype="float32",
    recompute: str = "none",
    inner: int | None = None,
    reduce_scatter_copy: bool = False,
    trainable: bool = True,
    weights_free: bool = False,
) -> LayerMemory:
    """Saved, forward-peak and backward-peak bytes of one layer on one rank.

    seq_lens: unpadded lengths (padded to multiples of 2P as the layout does).
    reduce_scatter_copy: the backend copies a reduce-scatter's input (gloo does; nccl not).
    trainable False: a frozen layer (no weight gradients, fewer saved tensors).
    weights_free: the peaks as if gathered or streamed weights and their gradient buffers took no
    memory (the difference from the real peaks is what they add)."""
    check_config(shape, strategy, P, recompute, inner)
    m = layer_dims(shape, strategy, seq_lens, P, dtype, inner, reduce_scatter_copy, trainable)
    m = replace(m, weights_free=weights_free)
    # one rank gathers, circulates and reduces nothing: every strategy runs the local layer
    replayed = m
    if P == 1:
        replayed = layer_dims(shape, "local", seq_lens, 1, dtype, None, False, trainable)
        replayed = replace(replayed, weights_free=weights_free)
    forward_peak, backward_peak = Replay(replayed).run(recompute)
    return LayerMemory(
        saved=saved_bytes(m, recompute),
        forward_peak=int(forward_peak),
        backward_peak=int(backward_peak),
        input_bytes=m.tl * m.H * m.e,
    )
