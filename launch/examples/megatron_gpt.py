"""Train a small megatron-core GPTModel whose attention is ParaDySe's (`paradyse_gpt_layer_spec`)
on the default corpus (the running Python's standard library, byte tokens), with megatron's
DDP, optimizer and forward-backward schedule; packed variable-length micro-batches (THD).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 launch/examples/megatron_gpt.py \
        --tp 2 --steps 10 --save runs/megatron_gpt
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 launch/examples/megatron_gpt.py \
        --cp 2 --steps 10                      # context parallel: the planner picks per batch
    python launch/examples/megatron_gpt.py --load runs/megatron_gpt --steps 0   # tp 1, 1 rank

Ranks = tp x cp x dp (dp: the rest). Each step prints one JSON line on rank 0: the loss (mean
over the step's targets), and how often each attention strategy ran; the last line is the
evaluation loss on a held-out batch (the same text whatever the parallel sizes), which
`--load` of a `--save`d checkpoint (megatron's dist_checkpointing, resharded to any tp/cp)
reproduces. Needs megatron-core: pip install -e '.[megatron]'.

On CPU (gloo) megatron-core needs a few of its CUDA-only calls redirected: the example then
imports the test-only shim `tests.megatron_cpu` (CPU-ONLY WORKAROUNDS for megatron-core, used
only when torch.cuda.is_available() is False; the library, integrations/megatron, patches
nothing), and gradient clipping is off (megatron's clip_grad needs GPU kernels). On GPUs
(NCCL) nothing is redirected and clipping is on; see docs/megatron.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings
from functools import partial

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore", message="Apex is not installed")

from megatron.core import dist_checkpointing  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer.module import Float16Module  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from integrations.megatron import (  # noqa: E402
    StrategyChooser,
    pack_sequences,
    paradyse_gpt_layer_spec,
)
from paradyse.data import GlobalBatches, StdlibCorpus, assign_to_dp, micro_batches  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 256  # byte tokens


def cpu_workarounds():
    """CPU-ONLY WORKAROUNDS for megatron-core (tests/megatron_cpu.py, see the module doc); a
    no-op context where CUDA is available."""
    if torch.cuda.is_available():
        return contextlib.nullcontext()
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    from tests.megatron_cpu import megatron_on_cpu

    return megatron_on_cpu()


def build(args, cuda: bool):
    """The model (wrapped in megatron's DDP) and its optimizer."""
    tp = args.tp
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.kv_heads, ffn_hidden_size=2 * args.hidden,
        normalization="RMSNorm", attention_dropout=0.0, hidden_dropout=0.0,
        tensor_model_parallel_size=tp, context_parallel_size=args.cp,
        sequence_parallel=tp > 1, use_cpu_initialization=True,
        calculate_per_token_loss=True,  # the step's loss is a mean over all its targets
        bf16=args.bf16, params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
    )  # fmt: skip
    spec = paradyse_gpt_layer_spec(normalization="RMSNorm", chooser=StrategyChooser())
    model = GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=args.max_seq_len,
                     position_embedding_type="rope")  # fmt: skip
    wrapped = model
    if cuda:
        model = model.cuda()
        wrapped = Float16Module(config, model) if args.bf16 else model  # as Megatron-LM does
    distributed = args.distributed_optimizer
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=distributed, grad_reduce_in_fp32=args.bf16
    )
    ddp = DistributedDataParallel(config, ddp_config, wrapped)
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=args.lr,
            weight_decay=0.0,
            bf16=args.bf16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=distributed,
            clip_grad=1.0 if cuda else 0.0,  # megatron's clip_grad needs GPU kernels
        ),
        [ddp],
    )
    return model, ddp, optimizer


def my_micro_batches(batch, args, device) -> list:
    """This rank's micro-batches of a global batch: its data-parallel share, packed by a token
    budget per cp rank, cut for its cp rank (the same on every tp rank)."""
    dp, cp = ps.get_data_parallel_world_size(), args.cp
    lens = batch.lengths
    mine = assign_to_dp(lens, dp, cost=float)[ps.get_data_parallel_rank()]
    groups = micro_batches(lens, mine, tokens_per_rank=args.tokens_per_rank, sp=cp)
    multiple = 2 * cp * args.tp  # sequence parallelism splits each cp rank's tokens over tp
    return [
        pack_sequences([batch.sequences[i] for i in g], cp_size=cp,
                       cp_rank=ps.get_context_parallel_rank(), multiple=multiple, device=device)
        for g in groups
    ]  # fmt: skip


def loss_func(loss_mask, output):
    """Megatron's per-token-loss convention: (sum, targets, {name: [sum, targets]})."""
    total = (output.float() * loss_mask).sum()
    count = loss_mask.sum().to(torch.int)
    return total, count, {"lm loss": torch.stack([total.detach(), count.float()])}


def forward_step(data_iterator, model):
    b = next(data_iterator)
    output = model(b.tokens, b.position_ids, None, labels=b.labels,
                   packed_seq_params=b.packed_seq_params)  # fmt: skip
    return output, partial(loss_func, b.loss_mask)


def run(micro, ddp, forward_only: bool) -> float:
    """One pass of megatron's schedule over these micro-batches; the mean loss over the targets
    of every data- and context-parallel rank."""
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro), model=[ddp],
        num_microbatches=len(micro), seq_length=max(b.tokens.shape[1] for b in micro),
        micro_batch_size=1, forward_only=forward_only,
    )  # fmt: skip
    device = micro[0].tokens.device
    total = torch.zeros(2, device=device)
    for item in losses:
        total += item["lm loss"].to(device)
    dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    return float(total[0] / total[1])


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--cp", type=int, default=1, help="context parallel size")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--tokens-per-step", type=int, default=2048)
    p.add_argument("--tokens-per-rank", type=int, default=1024, help="per cp rank, a micro-batch")
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", help="dist_checkpointing folder to save the model to at the end")
    p.add_argument("--load", help="dist_checkpointing folder to load the model from first")
    p.add_argument("--bf16", action="store_true", help="GPUs only: bfloat16, fp32 master weights")
    p.add_argument("--distributed-optimizer", action="store_true",
                   help="GPUs only: megatron's distributed optimizer")  # fmt: skip
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and (args.bf16 or args.distributed_optimizer):
        p.error("--bf16 and --distributed-optimizer need GPUs (megatron-core runs them on CUDA)")
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a plain `python` run: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))  # fmt: skip
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    log = print if dist.get_rank() == 0 else (lambda *a, **k: None)
    with cpu_workarounds():
        ps.initialize_model_parallel(tensor_model_parallel_size=args.tp,
                                     context_parallel_size=args.cp)  # fmt: skip
        try:
            model_parallel_cuda_manual_seed(args.seed)
            torch.manual_seed(args.seed)  # use_cpu_initialization draws on the CPU generator
            model, ddp, optimizer = build(args, cuda)
            chooser = model.decoder.layers[0].self_attention.core_attention.chooser
            if args.load:
                state = dist_checkpointing.load(model.sharded_state_dict(), args.load)
                model.load_state_dict(state)
                log(json.dumps({"loaded": args.load}))
            corpus = StdlibCorpus()
            stream = GlobalBatches(corpus, tokens_per_step=args.tokens_per_step,
                                   max_seq_len=args.max_seq_len, seed=args.seed)  # fmt: skip
            for step in range(args.steps):
                micro = my_micro_batches(stream.next_batch(), args, device)
                ddp.zero_grad_buffer()
                optimizer.zero_grad()
                before = dict(chooser.counts)
                loss = run(micro, ddp, forward_only=False)
                ok, _, _ = optimizer.step()
                ran = {k: v - before.get(k, 0) for k, v in chooser.counts.items()}
                log(json.dumps({"step": step, "loss": round(loss, 5), "updated": bool(ok),
                                "micro_batches": len(micro),
                                "attention": {k: v for k, v in ran.items() if v}}))  # fmt: skip
            if args.save:
                if dist.get_rank() == 0:
                    os.makedirs(args.save, exist_ok=True)
                dist.barrier()
                dist_checkpointing.save(model.sharded_state_dict(), args.save)
                log(json.dumps({"saved": args.save}))
            held_out = GlobalBatches(
                corpus,
                tokens_per_step=args.tokens_per_step,
                max_seq_len=args.max_seq_len,
                seed=args.seed + 1000,
            )
            ddp.eval()
            with torch.no_grad():
                loss = run(my_micro_batches(held_out.next_batch(), args, device), ddp, True)
            log(json.dumps({"eval_loss": loss, "tp": args.tp, "cp": args.cp,
                            "dp": ps.get_data_parallel_world_size()}))  # fmt: skip
            if not math.isfinite(loss):
                raise SystemExit("the evaluation loss is not finite")
            return loss
        finally:
            ps.destroy_model_parallel()


if __name__ == "__main__":
    main()
    dist.destroy_process_group()
