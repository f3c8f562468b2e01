"""The LM head and the token loss over chunks of tokens: the (T/P, V) float32 logits never exist.

`chunked_head_loss(h, shard, labels, group, chunk)` is the summed next-token cross-entropy of
the logits `h @ W.T` of this rank's local tokens, where W is the whole (V, H) head weight
assembled from its vocabulary shards, computed `chunk` tokens at a time:

- forward: all-gather the weight once; per chunk, the float32 logits (chunk, V) and their
  log-softmax, the targets' entries summed into the loss, both freed. It keeps for the backward
  the input, the labels and the gathered weight (the backward follows at once; the planner
  counts that weight with the static memory, `vocab_transient_bytes`): nothing of size T x V.
- backward: per chunk, the log-softmax recomputed and turned,
  in its own buffer, into the logits' gradient (softmax minus the target's one-hot, times the
  loss's gradient: the numbers log_softmax's own backward gives); the input gradient's rows,
  and the weight gradient accumulated in one (V, H) buffer of the weight's dtype (in bfloat16
  that sum is rounded once per chunk); one reduce-scatter of it back to the shards.

So the peak holds one chunk's logits and log-softmax (2 x chunk x V x 4 bytes, what
`cost_models.logits_bytes(tokens, vocab, sp, chunk)` counts) instead of three (T/P, V) float32
buffers, and the head weight is gathered once per micro-batch, as by
`VocabParallelHead.forward`. The price is one more head matmul (the recomputed logits).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from cost_models import LOGITS_CHUNK
from parallel_lib import CommGroup, gather_weight, reduce_scatter_dim0

from .batch import IGNORE_INDEX

__all__ = ["chunked_head_loss"]


def _log_softmax(h: Tensor, weight: Tensor) -> Tensor:
    """(c, H) x (V, H) -> (c, V) float32 log-probabilities: the logits computed in h's dtype
    and made float32, as the whole head does, then freed."""
    logits = (h @ weight.t()).float()
    return torch.log_softmax(logits, dim=1)


class _ChunkedHeadLoss(torch.autograd.Function):
    """forward: all-gather the weight shards, per chunk logits -> summed cross-entropy (logits
    freed), the gathered weight kept; backward: per chunk recomputed logits -> their gradient ->
    input rows and weight gradient, reduce-scatter of the weight gradient along dim 0."""

    @staticmethod
    def forward(ctx, h, shard, labels, group, chunk):
        weight = gather_weight(shard, group)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            target = labels[rows]
            log_probs = _log_softmax(h[rows], weight)  # (c, V)
            picked = log_probs.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)
            del log_probs
            total -= torch.where(target != IGNORE_INDEX, picked, 0.0).sum()
        ctx.group, ctx.chunk = group, chunk
        ctx.save_for_backward(h, weight, labels)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        h, weight, labels = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(h) if want_h else None
        dweight = torch.zeros_like(weight) if want_w else None
        for start in range(0, h.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            x, target = h[rows], labels[rows]
            # (softmax - one-hot of the target) x the loss's gradient, as log_softmax's backward
            # computes it, in the log-probabilities' buffer; rows without a target give 0
            scale = torch.where(target != IGNORE_INDEX, grad.float(), 0.0).unsqueeze(1)
            dlogits = _log_softmax(x, weight).exp_().mul_(scale)
            dlogits.scatter_add_(1, target.clamp(min=0).unsqueeze(1), -scale)
            dlogits = dlogits.to(h.dtype)
            if want_h:
                dh[rows] = dlogits @ weight
            if want_w:
                dweight.addmm_(dlogits.t(), x)
            del dlogits
        dshard = reduce_scatter_dim0(dweight, ctx.group) if want_w else None
        return dh, dshard, None, None, None


def chunked_head_loss(
    h: Tensor, shard: Tensor, labels: Tensor, group: CommGroup, chunk: int = LOGITS_CHUNK
) -> Tensor:
    """Sum over the local tokens that carry loss (labels not IGNORE_INDEX) of the next-token
    cross-entropy of the float32 logits `h @ W.T`, W the (V, H) weight gathered from the
    vocabulary shards `shard` over `group`, `chunk` tokens at a time (recomputed in backward).
    h (T/P, H) and the shard (V/P, H) share a dtype; labels (T/P,) int64."""
    if h.dim() != 2 or labels.shape != h.shape[:1]:
        raise ValueError(
            f"chunked_head_loss expects h (tokens, hidden) and labels (tokens,), got "
            f"{tuple(h.shape)} and {tuple(labels.shape)}"
        )
    if chunk < 1:
        raise ValueError(f"the logits chunk must be a positive number of tokens, got {chunk}")
    return _ChunkedHeadLoss.apply(h, shard, labels, group, int(chunk))
