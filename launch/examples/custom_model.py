"""Train your own nn.Module under the ParaDySe engine: a decoder with tied embeddings and a
learned per-layer residual gate, built from the switchable blocks.

    python launch/examples/custom_model.py [--steps 30]
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 launch/examples/custom_model.py

The engine needs two things of a model: `switchable_layers()` (the layers it plans a strategy
and recompute mode for) and `forward(batch)` returning the summed token loss of this rank's
local tokens. Parameters marked with `paradyse.mark_sharded` are 1/P shards; every other
parameter (here the gates and the norm) is replicated over the sp group and its gradient is
summed over it by the engine.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import paradyse
from paradyse import (
    Engine,
    ModelConfig,
    OptimConfig,
    SwitchableDecoderLayer,
    VocabParallelEmbedding,
    chunked_head_loss,
)
from paradyse.data import GlobalBatches, StdlibCorpus, assign_to_dp, micro_batches
from planners import PlanningSetup


class GatedTiedDecoder(nn.Module):
    """Embedding -> [x + gate_i * (layer_i(x) - x)] -> RMSNorm -> tied head -> loss."""

    def __init__(self, config: ModelConfig, group, seed: int = 0) -> None:
        super().__init__()
        self.group = group
        self.embedding = VocabParallelEmbedding(config.vocab, config.hidden, group, seed=seed)
        self.blocks = nn.ModuleList(
            SwitchableDecoderLayer(config.shape, group, seed=seed + 1 + i)
            for i in range(config.layers)
        )
        self.gates = nn.Parameter(torch.ones(config.layers))  # replicated over sp
        self.norm = nn.RMSNorm(config.hidden)

    def switchable_layers(self) -> list[SwitchableDecoderLayer]:
        return list(self.blocks)

    def forward(self, batch: paradyse.PackedBatch) -> torch.Tensor:
        x = self.embedding(batch.input_ids)  # (T/P, H)
        for gate, block in zip(self.gates, self.blocks, strict=True):
            x = x + gate * (block(x, batch) - x)
        # tied head: the embedding's vocabulary shards, gathered once; the loss over chunks of
        # 1,024 local tokens, so the (T/P, V) logits never exist whole (the planner counts a chunk)
        return chunked_head_loss(self.norm(x), self.embedding.weight, batch.labels, self.group)


def train(mesh: paradyse.Mesh, steps: int, tokens_per_step: int = 4096, log=print) -> list:
    """Train the model `steps` steps on the default corpus; the per-step losses."""
    config = ModelConfig(hidden=128, heads=4, kv_heads=4, head_dim=32, ffn_hidden=256, layers=3)
    model = GatedTiedDecoder(config, mesh.sp_group).to(mesh.device)
    planner = PlanningSetup(config, sp=mesh.sp, dp=mesh.dp).planner()  # exact, device memory
    engine = Engine(model, mesh, planner, OptimConfig(lr=3e-3), total_steps=steps)
    batches = GlobalBatches(StdlibCorpus(), tokens_per_step=tokens_per_step, max_seq_len=1024)
    losses = []
    for step in range(steps):
        batch = batches.next_batch()
        lens = batch.lengths
        mine = assign_to_dp(lens, mesh.dp, cost=float)[mesh.dp_rank]  # balance by length
        groups = micro_batches(lens, mine, tokens_per_rank=1024, sp=mesh.sp)
        result = engine.step([[batch.sequences[i] for i in g] for g in groups],
                             loss_tokens=sum(n - 1 for n in lens))  # fmt: skip
        losses.append(result.loss)
        if mesh.rank == 0:
            plans = " ; ".join(str(m.plan) for m in result.micro_batches)
            log(f"step {step:>3} loss {result.loss:.4f} {result.step_s:.2f} s | {plans}")
    if mesh.rank == 0:
        log(f"gates after training: {[round(g, 3) for g in model.gates.tolist()]}")
    return losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--tokens-per-step", type=int, default=4096)
    args = p.parse_args()
    torch.set_num_threads(1)
    mesh = paradyse.init_mesh()
    train(mesh, args.steps, args.tokens_per_step)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
