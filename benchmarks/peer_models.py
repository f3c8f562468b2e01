"""What a PyTorch user would run instead of ParaDySe, on ParaDySe's own model and weights.

`PlainDecoder` is a plain `nn.Module` LLaMA-style decoder (RMSNorm, RoPE, GQA attention, SwiGLU,
torchtitan's module names) loaded with the whole weights `paradyse.DecoderModel` draws from a
seed, so its losses match ParaDySe's. It runs packed micro-batches: sequences sorted by length,
one (1, T) row, attention per run of equal-length sequences (one `scaled_dot_product_attention`
call each, causal, GQA). Three ways to train it, each an optimizer step per global batch with
ParaDySe's AdamW settings (decay on matrices, the same schedule and global-norm clipping, the
loss summed over tokens and divided by the batch's target count):

- `SinglePeer`: one process (rank 0) trains every sequence; the other ranks wait.
- `Fsdp2Peer`: FSDP2 (`fully_shard` on every block, then the root), data parallel: the batch's
  sequences dealt to the ranks balanced by tokens (`paradyse.data.assign_to_dp`); a rank with no
  sequence runs a two-token dummy with zero loss (FSDP's collectives need every rank).
- `TensorParallelPeer`: DTensor tensor + sequence parallel with torchtitan's plan
  (`parallelize_module`: Rowwise embedding to Shard(1), SequenceParallel norms, Colwise Q/K/V,
  w1 and w3, Rowwise wo and w2 back to Shard(1), Colwise head with `loss_parallel`); every rank
  on the whole micro-batch, padded to a multiple of the ranks.

`rank_tokens` (None: no limit) is the most tokens one rank may hold: micro-batches are cut to it
(gradient accumulation) and a sequence that cannot fit it alone makes the batch unfit (for
DTensor TP+SP a rank holds 1/P of every sequence).

`timed_step(method, batch, mesh)` times one optimizer step of any of them (collective: the
slowest rank's seconds from a barrier).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from paradyse import DecoderModel, ModelConfig
from paradyse.data import assign_to_dp, micro_batches
from paradyse.layer import full_from_shards
from paradyse.optim import OptimConfig, decays, learning_rate
from parallel_lib import CommGroup, pad_length

IGNORE = -100


# ------------------------------------------------------------------------------ the model
def paradyse_weights(config: ModelConfig, seed: int) -> dict[str, Tensor]:
    """ParaDySe's initial weights, whole, in float64 draws cast to float32: a `DecoderModel` on a
    group of one (its P = 1 shards are whole weights), read back in `PlainDecoder`'s names."""
    model = DecoderModel(config, CommGroup.single(), seed=seed)
    whole = {"tok_embeddings.weight": model.embedding.weight, "norm.weight": model.norm.weight,
             "output.weight": model.head.weight}  # fmt: skip
    names = {"attn_norm": "attention_norm.weight", "wq": "attention.wq.weight",
             "wk": "attention.wk.weight", "wv": "attention.wv.weight",
             "wo": "attention.wo.weight", "mlp_norm": "ffn_norm.weight",
             "w_gate": "feed_forward.w1.weight", "w_up": "feed_forward.w3.weight",
             "w_down": "feed_forward.w2.weight"}  # fmt: skip
    for i, layer in enumerate(model.switchable_layers()):
        full = full_from_shards([layer.shard_tensors()], config.shape, layer.mlp)
        whole |= {f"layers.{i}.{names[k]}": v for k, v in full.items()}
    return {k: v.detach().clone() for k, v in whole.items()}


def check_plain(config: ModelConfig) -> None:
    """The peers implement the plain dense LLaMA decoder only."""
    if config.moe is not None or config.rope_scaling is not None or config.tie_embeddings:
        raise ValueError("the peers run the dense model with plain RoPE and an untied head only")


@dataclass(frozen=True)
class Packed:
    """One micro-batch packed into a (1, T) row."""

    tokens: Tensor
    labels: Tensor
    cos: Tensor
    sin: Tensor
    runs: tuple[tuple[int, int, int], ...]
    """(first token, sequences, length) of every run of equal-length sequences."""


def pack(sequences: Sequence[np.ndarray], config: ModelConfig, multiple: int = 1) -> Packed:
    """Sequences sorted by length (equal lengths adjacent), padded at the end to a multiple of
    `multiple` tokens with a masked segment; RoPE tables by position inside each sequence."""
    seqs = sorted((np.asarray(s, dtype=np.int64) for s in sequences), key=len)
    total = sum(len(s) for s in seqs)
    pad = -total % multiple
    if pad:
        seqs.append(np.zeros(pad, dtype=np.int64))
    tokens = np.concatenate(seqs)
    labels = np.concatenate([np.append(s[1:], IGNORE) for s in seqs])
    if pad:
        labels[total:] = IGNORE
    runs, start = [], 0
    for s in seqs:
        if runs and runs[-1][2] == len(s) and start == runs[-1][0] + runs[-1][1] * len(s):
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, len(s))
        else:
            runs.append((start, 1, len(s)))
        start += len(s)
    d = config.head_dim
    positions = np.concatenate([np.arange(len(s)) for s in seqs])
    freqs = config.rope_theta ** (-np.arange(0, d // 2, dtype=np.float64) * 2 / d)
    angles = np.outer(positions, freqs)
    cos, sin = (torch.from_numpy(np.concatenate([f(angles)] * 2, axis=1)).float()
                for f in (np.cos, np.sin))  # fmt: skip
    return Packed(torch.from_numpy(tokens)[None], torch.from_numpy(labels)[None], cos, sin,
                  tuple(runs))  # fmt: skip


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (1, T, h, d): rotate each pair (x_i, x_{i + d/2}) (ParaDySe's convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[None, :, None] + torch.cat([-x2, x1], dim=-1) * sin[None, :, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        H, d = config.hidden, config.head_dim
        self.head_dim = d
        self.wq = nn.Linear(H, config.heads * d, bias=False)
        self.wk = nn.Linear(H, config.kv_heads * d, bias=False)
        self.wv = nn.Linear(H, config.kv_heads * d, bias=False)
        self.wo = nn.Linear(config.heads * d, H, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, runs) -> Tensor:
        """x (1, T, H) -> (1, T, H); under tensor parallelism the projections give this rank's
        heads and the views below count them (-1)."""
        T, d = x.shape[1], self.head_dim
        q = rope(self.wq(x).view(1, T, -1, d), cos, sin)
        k = rope(self.wk(x).view(1, T, -1, d), cos, sin)
        v = self.wv(x).view(1, T, -1, d)
        outs = []
        for start, count, n in runs:
            part = [t[0, start : start + count * n].view(count, n, -1, d).transpose(1, 2)
                    for t in (q, k, v)]  # fmt: skip
            y = F.scaled_dot_product_attention(*part, is_causal=True, enable_gqa=True)
            outs.append(y.transpose(1, 2).reshape(count * n, -1))
        return self.wo(torch.cat(outs)[None])


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden, config.ffn_hidden, bias=False)
        self.w2 = nn.Linear(config.ffn_hidden, config.hidden, bias=False)
        self.w3 = nn.Linear(config.hidden, config.ffn_hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.hidden, eps=config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.hidden, eps=config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, runs) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, runs)
        return h + self.feed_forward(self.ffn_norm(h))


class PlainDecoder(nn.Module):
    """Embedding -> blocks -> RMSNorm -> head; forward(packed) -> (1, T, V) logits."""

    def __init__(self, config: ModelConfig, weights: dict[str, Tensor]) -> None:
        super().__init__()
        check_plain(config)
        self.tok_embeddings = nn.Embedding(config.vocab, config.hidden)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.RMSNorm(config.hidden, eps=config.norm_eps)
        self.output = nn.Linear(config.hidden, config.vocab, bias=False)
        self.load_state_dict(weights)

    def forward(self, packed: Packed) -> Tensor:
        x = self.tok_embeddings(packed.tokens)
        for block in self.layers:
            x = block(x, packed.cos, packed.sin, packed.runs)
        return self.output(self.norm(x))


# ------------------------------------------------------------------------------ the peers
def _loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                           reduction="sum")  # fmt: skip


class Peer:
    """A model and its AdamW (ParaDySe's settings). `step(sequences, targets)` is collective
    and returns the batch's mean token loss (every rank, the single process's on rank 0)."""

    name = ""

    def __init__(self, model: nn.Module, optim: OptimConfig, total_steps: int,
                 rank_tokens: int | None) -> None:  # fmt: skip
        self.model, self.optim, self.total_steps = model, optim, total_steps
        self.rank_tokens, self.step_index = rank_tokens, 0
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if decays(p)], "weight_decay": optim.weight_decay},
            {"params": [p for p in params if not decays(p)], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas,
                                           eps=optim.eps, foreach=True)  # fmt: skip

    def fits(self, lengths: Sequence[int]) -> bool:
        return self.rank_tokens is None or max(lengths) <= self.rank_tokens

    def update(self) -> None:
        """Clip by the global norm, step AdamW at this step's learning rate, zero gradients."""
        if self.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip)
        lr = learning_rate(self.optim, self.step_index, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1

    def _chunks(self, sequences, sp: int = 1) -> list[list[np.ndarray]]:
        """Micro-batches of at most rank_tokens tokens per rank (all in one without a limit)."""
        if self.rank_tokens is None:
            return [list(sequences)]
        lens = [len(s) for s in sequences]
        groups = micro_batches(lens, range(len(lens)), tokens_per_rank=self.rank_tokens, sp=sp)
        return [[sequences[i] for i in g] for g in groups]


class SinglePeer(Peer):
    name = "single"

    def __init__(self, config, weights, optim, total_steps, rank_tokens, rank: int) -> None:
        self.rank, self.config = rank, config
        super().__init__(PlainDecoder(config, weights), optim, total_steps, rank_tokens)

    def step(self, sequences, targets: int) -> float | None:
        if self.rank != 0:
            return None
        loss = 0.0
        for chunk in self._chunks(sequences):
            packed = pack(chunk, self.config)
            part = _loss_sum(self.model(packed), packed.labels)
            (part / targets).backward()
            loss += float(part.detach())
        self.update()
        return loss / targets


class Fsdp2Peer(Peer):
    name = "fsdp2"

    def __init__(self, config, weights, optim, total_steps, rank_tokens, device_mesh) -> None:
        from torch.distributed.fsdp import fully_shard

        self.config, self.mesh = config, device_mesh
        self.world, self.rank = device_mesh.size(), device_mesh.get_local_rank()
        model = PlainDecoder(config, weights)
        for block in model.layers:
            fully_shard(block, mesh=device_mesh)
        fully_shard(model, mesh=device_mesh)
        model.set_gradient_divide_factor(1.0)  # the loss is already divided by the global count
        model.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
        super().__init__(model, optim, total_steps, rank_tokens)

    def deal(self, sequences) -> list[list[np.ndarray]]:
        """This rank's micro-batches: the sequences dealt to world x m bins balanced by tokens,
        m the fewest micro-batches that keep every bin within rank_tokens; bin r + k x world is
        rank r's k-th micro-batch."""
        lens = [len(s) for s in sequences]
        m = 1
        while True:
            bins = assign_to_dp(lens, self.world * m, cost=float)
            if self.rank_tokens is None or max(sum(lens[i] for i in b) for b in bins) <= (
                self.rank_tokens
            ):
                break
            m += 1
        return [[sequences[i] for i in bins[r]] for r in range(self.rank, len(bins), self.world)]

    def step(self, sequences, targets: int) -> float:
        mine = self.deal(sequences)
        loss = torch.zeros(())
        for k, chunk in enumerate(mine):
            self.model.set_requires_gradient_sync(k == len(mine) - 1)
            dummy = not chunk
            packed = pack(chunk or [np.zeros(2, dtype=np.int64)], self.config)
            part = _loss_sum(self.model(packed), packed.labels) * (0.0 if dummy else 1.0)
            (part / targets).backward()
            loss += part.detach()
        self.update()
        dist.all_reduce(loss, group=self.mesh.get_group())
        return float(loss) / targets


class TensorParallelPeer(Peer):
    name = "dtensor_tp"

    def __init__(self, config, weights, optim, total_steps, rank_tokens, device_mesh) -> None:
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            PrepareModuleInput,
            RowwiseParallel,
            SequenceParallel,
            parallelize_module,
        )

        self.config, self.world = config, device_mesh.size()
        model = PlainDecoder(config, weights)
        parallelize_module(model, device_mesh, {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1),
                                      use_local_output=False),
        })  # fmt: skip
        rest = (None, None, None)  # cos, sin and runs: plain, every rank the same
        for block in model.layers:
            parallelize_module(block, device_mesh, {
                "attention_norm": SequenceParallel(),
                "attention": PrepareModuleInput(input_layouts=(Shard(1), *rest),
                                                desired_input_layouts=(Replicate(), *rest)),
                "attention.wq": ColwiseParallel(),
                "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(),
                "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
                "ffn_norm": SequenceParallel(),
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),),
                                                   desired_input_layouts=(Replicate(),)),
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
                "feed_forward.w3": ColwiseParallel(),
            })  # fmt: skip
        super().__init__(model, optim, total_steps, rank_tokens)

    def fits(self, lengths: Sequence[int]) -> bool:
        limit, P = self.rank_tokens, self.world
        return limit is None or max(pad_length(n, P) for n in lengths) // P <= limit

    def step(self, sequences, targets: int) -> float:
        from torch.distributed.tensor.parallel import loss_parallel

        loss = 0.0
        for chunk in self._chunks(sequences, self.world):
            packed = pack(chunk, self.config, multiple=self.world)
            with loss_parallel():
                part = _loss_sum(self.model(packed), packed.labels)
                (part / targets).backward()
            loss += float(part.detach().full_tensor())
        self.update()
        return loss / targets


def timed_step(method, batch, mesh) -> tuple[float, float | None]:
    """One optimizer step of `method` on `batch` (collective): the slowest rank's seconds from
    a barrier, and the loss (rank 0's)."""
    targets = sum(len(s) - 1 for s in batch)
    if mesh.world > 1:
        dist.barrier()
    start = time.perf_counter()
    loss = method.step(batch, targets)
    seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    if mesh.world > 1:
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return float(seconds), loss
