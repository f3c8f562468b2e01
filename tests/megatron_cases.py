"""Cases for tests/test_megatron.py, run on gloo ranks by tests.harness (each rank a spawned
process with torchrun's environment) inside the test-only CPU shim (`tests.megatron_cpu`).

Every case initialises megatron's parallel state for its tensor and context parallel sizes and
destroys it at the end, so the shared worker pool serves the next case clean. Errors are
relative: max |ours - reference| / max |reference|, per tensor.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist

from .megatron_cpu import megatron_on_cpu

warnings.filterwarnings("ignore", message="Apex is not installed")

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.models.common.embeddings.rotary_pos_embedding import (  # noqa: E402
    RotaryEmbedding,
)
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.spec_utils import build_module  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from cost_models import get_preset  # noqa: E402
from integrations.megatron import (  # noqa: E402
    ParaDySeCoreAttention,
    StrategyChooser,
    pack_sequences,
    paradyse_gpt_layer_spec,
    reset_groups,
)
from integrations.megatron.attention import _padded_lengths  # noqa: E402
from parallel_lib import varlen_attention  # noqa: E402

SEED = 1234
VOCAB = 64
CPU = get_preset("cpu")
"""The planner's rates in these cases: fixed, so that its choices do not depend on the host."""


def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| (float64)."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@contextlib.contextmanager
def megatron_world(tp: int = 1, cp: int = 1) -> Iterator[None]:
    """Megatron's parallel state on this pool's ranks (CPU shim on), torn down afterwards."""
    with megatron_on_cpu():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
        try:
            model_parallel_cuda_manual_seed(SEED)
            yield
        finally:
            ps.destroy_model_parallel()
            reset_groups()


def config(tp: int = 1, cp: int = 1, **overrides) -> TransformerConfig:
    """A tiny GQA model: 4 query heads, 2 key/value heads of 8, RMSNorm, no dropout."""
    fields = dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=64, use_cpu_initialization=True, attention_dropout=0.0,
        hidden_dropout=0.0, tensor_model_parallel_size=tp, context_parallel_size=cp,
        normalization="RMSNorm",
    )  # fmt: skip
    fields.update(overrides)
    return TransformerConfig(**fields)


def thd_params(lengths, device="cpu"):
    """PackedSeqParams of sequences of these lengths (no padding)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0).to(torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))  # fmt: skip


# ------------------------------------------------------------ 1. parity with DotProductAttention

LENGTHS = (7, 16, 1, 11)


def _core_parity(cfg: TransformerConfig, tp_rank: int) -> dict[str, float]:
    """ParaDySeCoreAttention on packed q/k/v vs DotProductAttention sequence by sequence."""
    tp = cfg.tensor_model_parallel_size
    h, kv, d = cfg.num_attention_heads // tp, cfg.num_query_groups // tp, cfg.kv_channels
    T = sum(LENGTHS)
    g = torch.Generator().manual_seed(10 + tp_rank)
    q, k, v = (torch.randn(T, n, d, generator=g) for n in (h, kv, kv))
    dout = torch.randn(T, h * d, generator=g)
    ours = ParaDySeCoreAttention(cfg, 1, AttnMaskType.causal)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ours(*leaves, None, attn_mask_type=AttnMaskType.causal,
               packed_seq_params=thd_params(LENGTHS))  # fmt: skip
    (out * dout).sum().backward()

    dpa = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    pieces, start = [], 0
    for n in LENGTHS:
        s = slice(start, start + n)
        o = dpa(*(t[s].unsqueeze(1) for t in refs), None)  # (n, 1, h*d)
        (o[:, 0] * dout[s]).sum().backward()
        pieces.append(o[:, 0])
        start += n
    errors = {"core.out": rel(out, torch.cat(pieces))}
    for name, a, b in zip(("q", "k", "v"), leaves, refs, strict=True):
        errors[f"core.d{name}"] = rel(a.grad, b.grad)
    # a plain (s, b, heads, d) batch, no PackedSeqParams: both take it whole
    s, b = 9, 2
    q, k, v = (torch.randn(s, b, n, d, generator=g) for n in (h, kv, kv))
    errors["core.sbhd"] = rel(ours(q, k, v, None), dpa(q, k, v, None))
    return errors


def _attention_parity(cfg: TransformerConfig) -> dict[str, float]:
    """Megatron's SelfAttention (TP-sharded QKV and output projections, RoPE) with ParaDySe's
    core attention on packed sequences vs with DotProductAttention sequence by sequence."""
    ours_spec = paradyse_gpt_layer_spec(normalization="RMSNorm").submodules.self_attention
    ref_spec = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.self_attention
    ours = build_module(ours_spec, config=cfg, layer_number=1)
    ref = build_module(ref_spec, config=cfg, layer_number=1)
    ref.load_state_dict(ours.state_dict())
    rope = RotaryEmbedding(kv_channels=cfg.kv_channels, rotary_percent=1.0,
                           use_cpu_initialization=True)  # fmt: skip
    T, H = sum(LENGTHS), cfg.hidden_size
    g = torch.Generator().manual_seed(20)  # the same on every tensor-parallel rank
    x, w = torch.randn(T, 1, H, generator=g), torch.randn(T, 1, H, generator=g)

    xa = x.clone().requires_grad_()
    out, bias = ours(xa, None, rotary_pos_emb=rope(max(LENGTHS), packed_seq=True),
                     packed_seq_params=thd_params(LENGTHS))  # fmt: skip
    ((out + bias) * w).sum().backward()
    xb = x.clone().requires_grad_()
    pieces, start = [], 0
    for n in LENGTHS:
        s = slice(start, start + n)
        o, b = ref(xb[s], None, rotary_pos_emb=rope(n))
        ((o + b) * w[s]).sum().backward()
        pieces.append(o + b)
        start += n
    errors = {"attn.out": rel(out + bias, torch.cat(pieces)), "attn.dx": rel(xa.grad, xb.grad)}
    grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        errors[f"attn.d{name}"] = rel(p.grad, grads[name].grad)
    return errors


def dpa_parity(tp: int) -> dict[str, float]:
    """Both parity checks at tensor parallel `tp` (the pool's other ranks are data parallel)."""
    with megatron_world(tp=tp):
        cfg = config(tp)
        errors = _core_parity(cfg, ps.get_tensor_model_parallel_rank())
        errors.update(_attention_parity(cfg))
        return errors


# ---------------------------------------------------------------- 2. cp 2 equals cp 1


class CpBlindAttention(ParaDySeCoreAttention):
    """Negative control: attends within this rank's tokens only, as if there were no cp group
    (each sequence's local segment taken for the whole sequence)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):  # fmt: skip
        P = ps.get_context_parallel_world_size()
        local = [n // P for n in _padded_lengths(packed_seq_params)]
        bounds = torch.tensor([0, *local]).cumsum(0).tolist()
        q, k, v = (t.squeeze(1) if t.dim() == 4 else t for t in (query, key, value))
        return varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), bounds,
                                scale=self.scale).flatten(1)  # fmt: skip


def _blind_spec():
    spec = paradyse_gpt_layer_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = CpBlindAttention
    return spec


BATCHES = {
    "many short": [11, 6, 3, 9, 14, 5, 2, 8, 12, 7, 10, 4, 13, 6, 9, 3] * 2,
    "few long": [61, 118],
}
"""Two micro-batches; the planner (CPU rates) runs the first as ulysses, the second as ring."""


def _batches(cp: int, cp_rank: int, multiple: int = 4):
    g = torch.Generator().manual_seed(30)
    out = {}
    for name, lengths in BATCHES.items():
        seqs = [torch.randint(0, VOCAB, (n + 1,), generator=g) for n in lengths]
        out[name] = pack_sequences(seqs, cp_size=cp, cp_rank=cp_rank, multiple=multiple)
    return out


def _gpt(cfg: TransformerConfig, spec) -> GPTModel:
    return GPTModel(cfg, spec, vocab_size=VOCAB, max_sequence_length=256,
                    position_embedding_type="rope")  # fmt: skip


def _loss_and_grads(model: GPTModel, batch, cp_group) -> tuple[torch.Tensor, dict]:
    """Sum of the token losses over the whole batch and its parameter gradients (summed over
    the cp group, as megatron's DDP reduces them over data x context parallel ranks)."""
    model.zero_grad(set_to_none=True)
    loss = model(batch.tokens, batch.position_ids, None, labels=batch.labels,
                 packed_seq_params=batch.packed_seq_params)  # fmt: skip
    total = (loss * batch.loss_mask).sum()
    total.backward()
    total = total.detach().clone()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    if cp_group is not None:
        dist.all_reduce(total, group=cp_group)
        for grad in grads.values():
            dist.all_reduce(grad, group=cp_group)
    return total, grads


VARIANTS = {
    # name: (key/value heads, cp_comm_type, spec)
    "planner": (4, None, "planner"),  # MHA: the planner's choice differs between the batches
    "planner_gqa": (2, None, "planner"),
    "p2p": (2, "p2p", "paradyse"),  # forced ring, GQA
    "a2a": (2, "a2a", "paradyse"),  # forced Ulysses, GQA
    "cp_blind": (2, None, "blind"),  # negative control
}


def _spec(kind: str):
    if kind == "blind":
        return _blind_spec()
    chooser = StrategyChooser(hardware=CPU) if kind == "planner" else None
    return paradyse_gpt_layer_spec(normalization="RMSNorm", chooser=chooser)


def cp_equivalence(names: tuple[str, ...] = tuple(VARIANTS)) -> dict:
    """cp 1 (the reference, per key/value head count) and cp 2 with each variant of `VARIANTS`
    on the same weights and batches: relative errors of the loss and of the worst gradient."""
    references = {}
    for kv in sorted({VARIANTS[n][0] for n in names}):
        with megatron_world(cp=1):
            model = _gpt(config(num_query_groups=kv), _spec("paradyse"))
            batches = _batches(1, 0).items()
            references[kv] = (
                model.state_dict(),
                {n: _loss_and_grads(model, b, None) for n, b in batches},
            )
    results: dict = {}
    for name in names:
        kv, comm_type, kind = VARIANTS[name]
        state, want = references[kv]
        with megatron_world(cp=2):
            cfg = config(cp=2, cp_comm_type=comm_type, num_query_groups=kv)
            model = _gpt(cfg, _spec(kind))
            model.load_state_dict(state)
            cp_group = ps.get_context_parallel_group()
            for batch_name, batch in _batches(2, ps.get_context_parallel_rank()).items():
                loss, grads = _loss_and_grads(model, batch, cp_group)
                ref_loss, ref_grads = want[batch_name]
                core = model.decoder.layers[0].self_attention.core_attention
                choice = getattr(core, "last_choice", None)
                results[(name, batch_name)] = {
                    "loss": rel(loss, ref_loss),
                    "grads": max(rel(grads[n], ref_grads[n]) for n in ref_grads),
                    "loss_value": float(loss),
                    "choice": choice.name if choice is not None else None,
                }
    return results


# ---------------------------------------------------------------- 3. the layout is megatron's


def layout_matches_megatron() -> dict[str, bool]:
    """pack_sequences cuts a cp rank's tokens as megatron does: one sequence as
    `get_batch_on_this_cp_rank` (its sbhd splitter), and THD positions as its THD RoPE reads
    them (`_get_thd_freqs_on_this_cp_rank`, per sequence)."""
    from megatron.core.models.common.embeddings.rope_utils import _get_thd_freqs_on_this_cp_rank
    from megatron.core.utils import get_batch_on_this_cp_rank

    with megatron_world(cp=2):
        group, rank = ps.get_context_parallel_group(), ps.get_context_parallel_rank()
        seq = torch.arange(101)  # 100 inputs: padded to 100 (a multiple of 4) exactly
        ours = pack_sequences([seq], cp_size=2, cp_rank=rank)
        theirs = get_batch_on_this_cp_rank({"tokens": seq[:-1].unsqueeze(0).clone()}, group)
        lengths = (13, 30, 7)
        seqs = [torch.arange(n + 1) for n in lengths]
        packed = pack_sequences(seqs, cp_size=2, cp_rank=rank)
        freqs = torch.arange(64.0)[:, None, None, None]  # "frequency" = position
        pieces = []
        for x in packed.position_ids[0].split([n // 2 for n in packed.padded]):
            pieces.append(_get_thd_freqs_on_this_cp_rank(rank, 2, x, freqs).flatten())
        return {
            "sbhd": torch.equal(ours.tokens, theirs["tokens"]),
            "thd_rope": torch.equal(torch.cat(pieces).long(), packed.position_ids[0]),
            "cu_padded": packed.packed_seq_params.cu_seqlens_q_padded.tolist() == [0, 16, 48, 56],
        }


# ---------------------------------------------------------------- 4. the example, reloaded


def example_eval(argv: list[str]) -> float:
    """launch/examples/megatron_gpt.py's main on this pool's ranks; its evaluation loss."""
    import importlib.util

    from .harness import REPO_ROOT

    path = f"{REPO_ROOT}/launch/examples/megatron_gpt.py"
    spec = importlib.util.spec_from_file_location("megatron_gpt_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.main(argv)
    finally:
        reset_groups()


# ---------------------------------------------------------------- 5. cp 4: usp (slow)


def cp4_equivalence() -> dict:
    """cp 4 (with usp's groups) against cp 1 on 4 ranks, MHA (4 heads of 8): the planner's
    choices and each forced strategy (ring, Ulysses over 4, usp 2 x 2)."""
    from integrations.megatron import init_usp_groups

    kv = 4
    with megatron_world(cp=1):
        model = _gpt(config(num_query_groups=kv), _spec("paradyse"))
        state = model.state_dict()
        want = {n: _loss_and_grads(model, b, None) for n, b in _batches(1, 0, 8).items()}
    results: dict = {}
    for name in ("planner", "p2p", "a2a", "a2a+p2p"):
        comm_type = None if name == "planner" else name
        with megatron_world(cp=4):
            init_usp_groups()
            cfg = config(cp=4, cp_comm_type=comm_type, num_query_groups=kv)
            model = _gpt(cfg, _spec("planner" if comm_type is None else "paradyse"))
            model.load_state_dict(state)
            cp_group = ps.get_context_parallel_group()
            for batch_name, batch in _batches(4, ps.get_context_parallel_rank(), 8).items():
                loss, grads = _loss_and_grads(model, batch, cp_group)
                ref_loss, ref_grads = want[batch_name]
                choice = model.decoder.layers[0].self_attention.core_attention.last_choice
                results[(name, batch_name)] = {
                    "loss": rel(loss, ref_loss),
                    "grads": max(rel(grads[n], ref_grads[n]) for n in ref_grads),
                    "choice": choice.name,
                }
    return results


def main() -> None:
    """The parity and cp checks under torchrun, figures printed:
    `torchrun --standalone --nproc-per-node 2 -m tests.megatron_cases` (from the repository)."""
    dist.init_process_group("gloo")
    try:
        for tp in (1, 2):
            errors = dpa_parity(tp)
            worst = max(errors, key=errors.get)
            print(f"rank {dist.get_rank()} tp {tp}: DotProductAttention parity, worst of "
                  f"{len(errors)} tensors {worst} {errors[worst]:.1e}", flush=True)  # fmt: skip
        results = cp_equivalence()
        if dist.get_rank() == 0:
            for (variant, batch), r in results.items():
                print(f"cp 2 vs cp 1, {variant:11} {batch:10}: loss {r['loss']:.1e} "
                      f"gradients {r['grads']:.1e} ran {r['choice']}")  # fmt: skip
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
