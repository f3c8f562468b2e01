"""A LLaMA-style decoder from switchable layers, with a vocabulary-sharded embedding and LM head.

Every rank of the switchable group holds 1/P of the embedding and LM head rows (the vocabulary
axis) and 1/P of every layer's weights (the unified layout). The embedding and the head gather
their rows for the micro-batch (forward all-gather, backward reduce-scatter, like a ZeRO-3
linear), so both work on this rank's local tokens: the loss is the sum over local tokens. The
training loss runs the head and the cross-entropy over chunks of `logits_chunk` tokens
(`paradyse.head_loss`, recomputed in backward), so the (T/P, V) float32 logits never exist at
once; `DecoderModel.logits` still returns them whole for evaluation. `cost_models.logits_bytes`
counts what the loss holds: one chunk's logits and log-softmax (three whole (T/P, V) float32
buffers with `logits_chunk` 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cost_models import LOGITS_CHUNK
from parallel_lib import CommGroup, LayerShape, all_gather_tokens, zero_linear

from .batch import IGNORE_INDEX, PackedBatch
from .head_loss import chunked_head_loss
from .layer import SwitchableDecoderLayer
from .moe import MoeConfig, MoeRecorder
from .sharding import is_sharded, mark_sharded

__all__ = [
    "ModelConfig",
    "DecoderModel",
    "VocabParallelEmbedding",
    "VocabParallelHead",
    "mark_sharded",
    "is_sharded",
    "layer_seed",
    "token_loss_sum",
]


def layer_seed(seed: int, index: int) -> int:
    """The weight seed of layer `index` of a model seeded `seed` (distinct per layer and seed)."""
    return (seed * 1_000_003 + 7919 * (index + 1)) % (1 << 62)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a LLaMA-style decoder (RMSNorm, RoPE, GQA attention, SwiGLU MLP)."""

    hidden: int = 256
    """Model width H."""
    heads: int = 8
    """Query heads."""
    kv_heads: int = 4
    """Key/value heads (a divisor of heads)."""
    head_dim: int = 32
    """Width of one head."""
    ffn_hidden: int = 704
    """SwiGLU intermediate width."""
    layers: int = 4
    """Decoder layers."""
    vocab: int = 256
    """Vocabulary size (256: byte-level tokens)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    rope_scaling: tuple[float, float, float, float] | None = None
    """Llama 3 rotary scaling: factor, low_freq_factor, high_freq_factor, original context length
    (None: plain RoPE)."""
    tie_embeddings: bool = False
    """One weight for the embedding and the LM head (sharded, trained and stored once)."""
    init: str = ""
    """Where the weights come from: '' draws them from train.seed; 'hf:PATH' loads a Hugging Face
    Llama-family folder or GGUF file (`integrations.hf`), whose config then sets the shape."""
    moe: MoeConfig | None = None
    """`[model.moe]`: mixture-of-experts MLPs (`paradyse.moe.MoeConfig`); None: all dense."""

    def __post_init__(self) -> None:
        for key in ("hidden", "heads", "kv_heads", "head_dim", "ffn_hidden", "layers", "vocab"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{key} must be a positive integer, got {value!r}")
        if self.rope_scaling is not None:
            scaling = self.rope_scaling
            if isinstance(scaling, str):  # from --set model.rope_scaling=8,1,4,8192
                scaling = scaling.split(",")
            try:
                scaling = tuple(float(v) for v in scaling)
            except (TypeError, ValueError):
                scaling = ()
            if len(scaling) != 4:
                raise ValueError(
                    "model.rope_scaling must be 4 numbers (factor, low_freq_factor, "
                    f"high_freq_factor, original context length), got {self.rope_scaling!r}"
                )
            object.__setattr__(self, "rope_scaling", scaling)
        if self.init and not self.init.startswith("hf:"):
            raise ValueError(
                f"model.init must be '' (random from train.seed) or 'hf:PATH', got {self.init!r}"
            )
        if isinstance(self.moe, str) and self.moe.lower() in ("", "none"):  # --set model.moe=
            object.__setattr__(self, "moe", None)
        if isinstance(self.moe, dict):  # from a checkpoint's manifest or a plain dict
            object.__setattr__(self, "moe", MoeConfig.from_table(self.moe))
        if self.moe is not None and self.moe.first_dense_layers > self.layers:
            raise ValueError(
                f"model.moe.first_dense_layers ({self.moe.first_dense_layers}) exceeds "
                f"model.layers ({self.layers})"
            )
        self.shape  # noqa: B018  (validates heads, kv_heads, head_dim, rope_scaling)

    def moe_layer(self, index: int) -> bool:
        """Whether layer `index` has the mixture-of-experts MLP."""
        return self.moe is not None and index >= self.moe.first_dense_layers

    @property
    def shape(self) -> LayerShape:
        return LayerShape(
            hidden=self.hidden,
            heads=self.heads,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            ffn_hidden=self.ffn_hidden,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
        )

    def sp_problem(self, sp: int) -> str | None:
        """Why a switchable group of `sp` ranks cannot hold this model, or None."""
        problem = self.shape.layout_problem(sp)
        if problem:
            return problem
        if self.moe is not None and self.moe.first_dense_layers < self.layers:
            problem = self.moe.shape.layout_problem(sp)
            if problem:
                return problem
        if self.vocab % sp:
            sizes = [p for p in self.shape.valid_group_sizes() if self.vocab % p == 0]
            fix = "" if self.init else " or set model.vocab to a multiple of sp"
            return f"vocab ({self.vocab}) is not divisible by sp={sp}; choose sp among {sizes}{fix}"
        return None


class _VocabSharded(nn.Module):
    """A (vocab, hidden) weight stored as this rank's 1/P block of rows (vocabulary order),
    drawn whole in float64 from `seed` so that every P starts from the same weight (left
    uninitialised with `random_init=False`, for weights loaded next)."""

    def __init__(
        self,
        vocab: int,
        hidden: int,
        group: CommGroup,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        random_init: bool = True,
    ) -> None:
        super().__init__()
        if vocab % group.size:
            raise ValueError(f"vocab ({vocab}) is not divisible by the group size {group.size}")
        self.group = group
        rows = vocab // group.size
        if random_init:
            generator = torch.Generator().manual_seed(seed)
            whole = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64)
            shard = whole[group.rank * rows : (group.rank + 1) * rows] / math.sqrt(hidden)
            shard = shard.to(dtype=dtype, device=device)
        else:
            shard = torch.empty(rows, hidden, dtype=dtype, device=device)
        self.weight = mark_sharded(nn.Parameter(shard))


class VocabParallelEmbedding(_VocabSharded):
    """Token embedding whose rows (the vocabulary) are split over the group; looks up local
    tokens. forward: all-gather the rows, backward: reduce-scatter their gradient."""

    def forward(self, input_ids: Tensor) -> Tensor:
        # (V/P, H) -> (V, H): every rank's rows, in vocabulary order
        weight = all_gather_tokens(self.weight, self.group)
        return F.embedding(input_ids, weight)  # (T/P,) -> (T/P, H)


class VocabParallelHead(_VocabSharded):
    """The LM head, rows split over the vocabulary like the embedding; logits of local tokens
    over the whole vocabulary, in float32. The gathered weight is kept for the backward, which
    follows at once (only the loss runs between): one all-gather per micro-batch, not two; the
    planner counts the gathered weight with the static memory (`vocab_transient_bytes`)."""

    def forward(self, h: Tensor) -> Tensor:
        # (T/P, H) x whole (V, H) gathered from (V/P, H) shards -> (T/P, V)
        return zero_linear(h, self.weight, self.group, input_major=False,
                           keep_gathered=True).float()  # fmt: skip

    def loss_sum(self, h: Tensor, labels: Tensor, chunk: int = LOGITS_CHUNK) -> Tensor:
        """The summed next-token cross-entropy of the local tokens' logits: `chunk` tokens at a
        time, recomputed in backward (`paradyse.head_loss`); 0: the whole logits at once."""
        if chunk <= 0:
            return F.cross_entropy(self(h), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return chunked_head_loss(h, self.weight, labels, self.group, chunk)


def token_loss_sum(logits: Tensor, batch: PackedBatch) -> Tensor:
    """Sum of next-token cross-entropy over this rank's local tokens that carry loss, from their
    whole logits (`DecoderModel.logits`); the training loss avoids them (`VocabParallelHead.
    loss_sum`)."""
    return F.cross_entropy(logits, batch.labels, ignore_index=IGNORE_INDEX, reduction="sum")


class DecoderModel(nn.Module):
    """Embedding -> switchable decoder layers -> RMSNorm -> LM head -> summed token loss.

    Weights are drawn as whole tensors from `seed` and then sharded, so every sp (and P = 1)
    starts from the same model; `random_init=False` leaves them uninitialised for a loader
    (`integrations.hf`, a checkpoint) to fill, drawing nothing. With `config.tie_embeddings`
    the head's weight is the embedding's parameter (one shard, one gradient, one optimizer
    state). `forward(batch)` returns the sum of the loss over this rank's local tokens, its head
    and cross-entropy run `logits_chunk` tokens at a time (0: the whole logits at once); each
    layer runs the strategy and recompute mode the engine set on it."""

    def __init__(
        self,
        config: ModelConfig,
        group: CommGroup,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        random_init: bool = True,
        logits_chunk: int = LOGITS_CHUNK,
    ) -> None:
        super().__init__()
        problem = config.sp_problem(group.size)
        if problem:
            raise ValueError(f"cannot shard the model over sp={group.size}: {problem}")
        if not isinstance(logits_chunk, int) or logits_chunk < 0:
            raise ValueError(f"logits_chunk must be a number of tokens >= 0, got {logits_chunk!r}")
        self.config, self.group = config, group
        self.logits_chunk = logits_chunk
        """Tokens per chunk of the training loss's head and cross-entropy (0: whole logits)."""
        kw = {"dtype": dtype, "device": device, "random_init": random_init}
        H, V = config.hidden, config.vocab
        self.embedding = VocabParallelEmbedding(V, H, group, seed=layer_seed(seed, -1), **kw)
        moe = config.moe.shape if config.moe is not None else None
        self.layers = nn.ModuleList(
            SwitchableDecoderLayer(
                config.shape,
                group,
                norm_eps=config.norm_eps,
                seed=layer_seed(seed, i),
                moe=moe if config.moe_layer(i) else None,
                index=i,
                **kw,
            )  # fmt: skip
            for i in range(config.layers)
        )
        self.moe_recorder = MoeRecorder()
        """The MoE layers' auxiliary losses and expert loads of the last forward."""
        for layer in self.layers:
            if config.moe_layer(layer.index):
                layer.mlp.recorder = self.moe_recorder
        self.norm = nn.RMSNorm(H, eps=config.norm_eps, dtype=dtype, device=device)
        tied = config.tie_embeddings
        head_kw = {**kw, "random_init": random_init and not tied}
        self.head = VocabParallelHead(V, H, group, seed=layer_seed(seed, config.layers), **head_kw)
        if tied:
            self.head.weight = self.embedding.weight

    def switchable_layers(self) -> list[SwitchableDecoderLayer]:
        """The layers the planner chooses a strategy and recompute mode for, in order."""
        return list(self.layers)

    def hidden_states(self, batch: PackedBatch) -> Tensor:
        """(T/P, H) final-normed hidden states of this rank's local tokens, the head's input
        (MoE layers record their auxiliary losses and loads on the side: `moe_recorder`)."""
        recorder = self.moe_recorder
        recorder.clear()
        recorder.active = True
        try:
            x = self.embedding(batch.input_ids)  # (T/P, H)
            for layer in self.layers:
                x = layer(x, batch)
        finally:
            recorder.active = False  # a recomputation in the backward records nothing
        return self.norm(x)

    def logits(self, batch: PackedBatch) -> Tensor:
        """(T/P, V) float32 logits of this rank's local tokens, in the batch's layout order, all
        at once (for evaluation; the training loss never holds them: `forward`)."""
        return self.head(self.hidden_states(batch))

    def forward(self, batch: PackedBatch) -> Tensor:
        """The summed token loss of this rank's local tokens, the head and cross-entropy run
        `logits_chunk` tokens at a time (`auxiliary_loss()`: the MoE layers' balance and z-loss
        terms of the same forward)."""
        h = self.hidden_states(batch)
        return self.head.loss_sum(h, batch.labels, self.logits_chunk)

    def auxiliary_loss(self) -> Tensor | None:
        """The MoE layers' summed balance and z-loss terms of the last forward (with their
        graph), to add to the summed token loss before dividing by the step's loss tokens;
        None for a dense model."""
        losses = self.moe_recorder.losses
        return torch.stack(losses).sum() if losses else None
