"""Measuring a routing: perplexity on held-out text, the expert loads counted in the MoE layers,
the experts each token got against its routing entropy, and forward tokens/s; and the data:
held-out and calibration text of the run's own corpus that the checkpoint never trained on.

Everything runs in one process at sp = 1 (`load_checkpoint_model`), without gradients.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from paradyse import DecoderModel, PackedBatch, token_loss_sum
from paradyse.checkpoint_state import ModelState
from paradyse.config import Config
from parallel_lib import CommGroup
from parallel_lib.routing import RouterRequest, Routing

__all__ = [
    "Measurement",
    "RoutingTap",
    "load_checkpoint_model",
    "unseen_sequences",
    "measure",
    "forward_tokens_per_s",
    "spearman",
    "js_divergence",
]


class _OneProcess:
    sp = 1


def load_checkpoint_model(checkpoint: str) -> tuple[DecoderModel, int]:
    """(the checkpoint's model in one process at sp = 1, float32, eval mode; its step).
    ValueError, one line, when it cannot be read."""
    import json

    from integrations.hf.export import read_checkpoint_model
    from paradyse.checkpoint import MANIFEST, find_checkpoint

    config, whole = read_checkpoint_model(checkpoint)
    if config.moe is None:
        raise ValueError(f"{checkpoint} is a dense model: Alloc-MoE needs [model.moe] layers")
    model = DecoderModel(config, CommGroup.single(), random_init=False)
    ModelState.copy_into(ModelState(model, _OneProcess(), None)._targets(), whole)
    step = json.loads((find_checkpoint(checkpoint, "checkpoint") / MANIFEST).read_text())["step"]
    return model.eval(), int(step)


def unseen_sequences(
    config: Config, trained_steps: int, tokens: int, seq_len: int, skip_tokens: int = 0
) -> list[np.ndarray]:
    """Sequences of at most `seq_len` tokens, `tokens` in all, from the documents of the run's
    data stream (its source, seed and batch size) that come after the `trained_steps` batches
    the model trained on, in the stream's own order: text the model never saw. The first
    `skip_tokens` of them are passed over (so that calibration and evaluation do not overlap)."""
    from paradyse.data import run_stream

    stream = run_stream(config.data, config.model.vocab, config.train.seed)
    for _ in range(trained_steps):
        stream.next_batch()
    position = stream.state_dict()
    order = stream._order(position["epoch"])
    index = position["index"] + (1 if position["start"] or position["cut"] else 0)
    out: list[np.ndarray] = []
    taken = -skip_tokens
    while taken < tokens:
        if index >= len(order):
            raise ValueError(
                f"the corpus has fewer than {tokens + skip_tokens} unseen tokens after step "
                f"{trained_steps}: ask for fewer evaluation or calibration tokens"
            )
        doc = np.asarray(stream.source.tokens(int(order[index])), dtype=np.int64)
        index += 1
        for start in range(0, len(doc) - 1, seq_len):
            piece = doc[start : start + seq_len]
            if len(piece) < 2:
                continue
            if taken >= 0:
                out.append(piece[: tokens - taken])
            taken += len(piece)
            if taken >= tokens:
                break
    return [s for s in out if len(s) >= 2]


@dataclass
class RoutingTap:
    """A router hook around another (None: the model's own top-k) that records, per MoE layer,
    each real token's routing entropy (nats) and how many experts it kept."""

    inner: Callable[[RouterRequest], Routing] | None = None
    entropy: dict[int, list[Tensor]] = field(default_factory=dict)
    kept: dict[int, list[Tensor]] = field(default_factory=dict)

    def __call__(self, request: RouterRequest) -> Routing:
        from parallel_lib.routing import top_k_routing

        routing = (self.inner or top_k_routing)(request)
        if request.recording:
            real = request.real
            p = request.probs.detach()
            entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
            kept = torch.bincount(routing.token, minlength=len(real))
            self.entropy.setdefault(request.layer, []).append(entropy[real].cpu())
            self.kept.setdefault(request.layer, []).append(kept[real].cpu())
        return routing

    def entropy_correlation(self) -> float:
        """Per MoE layer, the Spearman correlation over its tokens of the experts a token kept
        with its routing entropy, averaged over the layers where the count varies (NaN where
        it varies in none: every token of a layer keeps the same number)."""
        rhos = [spearman(torch.cat(self.entropy[layer]).tolist(),
                         torch.cat(self.kept[layer]).double().tolist())
                for layer in self.entropy]  # fmt: skip
        rhos = [r for r in rhos if not math.isnan(r)]
        return statistics.fmean(rhos) if rhos else float("nan")


@dataclass
class Measurement:
    perplexity: float
    loss: float
    tokens: int
    load: dict[int, list[int]]
    """Pairs each expert computed, per MoE layer, counted in the layer."""
    activations_per_token: float
    """Pairs computed per real token, summed over the MoE layers."""


@contextlib.contextmanager
def routed(model: DecoderModel, hook):
    """Every MoE layer of `model` routes through `hook` (None: its own top-k) inside the block."""
    layers = [layer for layer in model.switchable_layers() if getattr(layer.mlp, "moe", None)]
    for layer in layers:
        layer.mlp.hook = hook
    try:
        yield
    finally:
        for layer in layers:
            layer.mlp.hook = None


def _batches(sequences: Sequence[np.ndarray], batch_tokens: int) -> list[list[np.ndarray]]:
    batches, current, size = [], [], 0
    for seq in sequences:
        if current and size + len(seq) > batch_tokens:
            batches.append(current)
            current, size = [], 0
        current.append(seq)
        size += len(seq)
    return batches + ([current] if current else [])


@torch.no_grad()
def measure(
    model: DecoderModel, sequences: Sequence[np.ndarray], hook, batch_tokens: int = 4096
) -> Measurement:
    """Perplexity of `sequences` under router hook `hook` (None: the model's top-k), and the
    expert loads the MoE layers counted."""
    loss = 0.0
    targets = real = 0
    load: dict[int, Tensor] = {}
    with routed(model, hook):
        for batch_seqs in _batches(sequences, batch_tokens):
            batch = PackedBatch.pack(batch_seqs)
            loss += float(token_loss_sum(model.logits(batch), batch))
            targets += batch.num_loss_tokens
            real += sum(batch.seq_lens)
            for index, counts in model.moe_recorder.load.items():
                load[index] = load.get(index, 0) + counts
    loads = {i: [int(v) for v in counts.tolist()] for i, counts in sorted(load.items())}
    return Measurement(
        perplexity=math.exp(loss / targets),
        loss=loss / targets,
        tokens=targets,
        load=loads,
        activations_per_token=sum(sum(v) for v in loads.values()) / real,
    )


@torch.no_grad()
def forward_tokens_per_s(
    model: DecoderModel, sequences: Sequence[np.ndarray], hook, repeats: int = 5
) -> tuple[float, float]:
    """(the full routing's, `hook`'s) median tokens/s of the forward (logits) of `sequences`
    as one micro-batch, timed interleaved (full, hook, full, hook, ...) so that the machine's
    load weighs on both alike."""
    batch = PackedBatch.pack(list(sequences))
    tokens = sum(batch.seq_lens)
    times: dict[int, list[float]] = {0: [], 1: []}
    for repeat in range(repeats + 1):  # the first round warms up
        for which, routing in enumerate((None, hook)):
            with routed(model, routing):
                start = time.perf_counter()
                model.logits(batch)
                if repeat:
                    times[which].append(time.perf_counter() - start)
    return tokens / statistics.median(times[0]), tokens / statistics.median(times[1])


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get mean ranks); NaN when either side is constant."""
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx and vy else float("nan")


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence (nats) between two load vectors, each normalised."""
    sp, sq = sum(p), sum(q)
    p = [v / sp for v in p]
    q = [v / sq for v in q]

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)

    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    return (kl(p, m) + kl(q, m)) / 2
