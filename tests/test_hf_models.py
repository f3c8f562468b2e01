"""Hugging Face Llama checkpoints in and out (`integrations.hf`), against transformers itself:
logits and loss per sequence of a packed batch at sp = 1, 2, 4 for every strategy and a mixed
plan, tied and untied (one with Llama 3 RoPE scaling); each rank reading only its own slices;
export -> transformers -> the same logits; export -> import -> export byte for byte."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from integrations.hf import load_pretrained, pretrained_model_config  # noqa: E402
from integrations.hf.export import export_model  # noqa: E402
from paradyse import DecoderModel, PackedBatch  # noqa: E402
from parallel_lib import CommGroup  # noqa: E402

from .harness import run_distributed  # noqa: E402
from .hf_cases import LLAMA3, hf_logits, tiny_llama, tokens  # noqa: E402
from .layer_cases import RankStandIn, mesh_for, supported  # noqa: E402

CASES = {"untied-llama3": {"tied": False, "rope_scaling": LLAMA3}, "tied": {"tied": True}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (folder, transformers model, its logits per sequence)."""
    out = {}
    for name, kwargs in CASES.items():
        folder = str(tmp_path_factory.mktemp(name))
        model = tiny_llama(folder, **kwargs)
        out[name] = (folder, model, hf_logits(model, tokens()))
    return out


def _plans(P: int, layers: int = 3) -> list[list[str]]:
    names = supported(P)
    plans = [[n] * layers for n in names]
    if P > 1:
        mixed = [n for n in ("ring", "tp_sp", "ulysses", "metp") if n in names]
        plans.append(mixed[:layers])
    return plans


def _logits_on_rank(folder: str, plans: list[list[str]]) -> dict:
    """Load the folder at this sp and run the packed batch under every plan: this rank's
    logits with their natural indices, and the group's summed loss."""
    from paradyse.model import token_loss_sum
    from parallel_lib import all_reduce_

    mesh = mesh_for()
    config, source = pretrained_model_config(f"hf:{folder}")
    model = DecoderModel(config, mesh.sp_group, random_init=False)
    load_pretrained(model, source)
    batch = PackedBatch.pack(tokens(), mesh.sp, mesh.sp_rank)
    out = {"index": batch.layout.local_natural_index.clone(), "bounds": batch.layout.bounds,
           "logits": [], "loss": []}  # fmt: skip
    with torch.no_grad():
        for plan in plans:
            for layer, strategy in zip(model.layers, plan, strict=True):
                layer.set_option(strategy, "none")
            logits = model.logits(batch)
            loss = token_loss_sum(logits, batch)
            all_reduce_(loss, mesh.sp_group)
            out["logits"].append(logits.clone())
            out["loss"].append(float(loss))
    return out


def _natural(results: list[dict], k: int, total: int) -> torch.Tensor:
    """Plan k's logits of every rank put back in natural (packed) order."""
    V = results[0]["logits"][k].shape[1]
    whole = torch.full((total, V), float("nan"))
    for r in results:
        whole[r["index"]] = r["logits"][k]
    return whole


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("P", [1, 2, 4])
def test_logits_and_loss_match_transformers(P, case, models) -> None:
    folder, model, want = models[case]
    plans = _plans(P)
    results = run_distributed(P, _logits_on_rank, folder, plans)
    bounds = results[0]["bounds"]
    total = sum(r["logits"][0].shape[0] for r in results)
    want_loss = sum(
        F.cross_entropy(w[:-1], torch.tensor(s[1:]), reduction="sum")
        for w, s in zip(want, tokens(), strict=True) if len(s) > 1
    )  # fmt: skip
    for k, plan in enumerate(plans):
        got = _natural(results, k, total)
        for i, (w, start) in enumerate(zip(want, bounds, strict=False)):
            mine = got[start : start + len(w)]
            error = (mine - w).abs().max() / w.abs().max()
            assert error < 1e-4, f"{plan} sequence {i} (length {len(w)}): {error:.2e}"
        assert abs(results[0]["loss"][k] - float(want_loss)) < 1e-4 * float(want_loss), plan


def test_tied_model_holds_one_shared_parameter(models) -> None:
    folder, hf, _ = models["tied"]
    config, source = pretrained_model_config(f"hf:{folder}")
    assert config.tie_embeddings
    model = DecoderModel(config, CommGroup.single(), random_init=False)
    load_pretrained(model, source)
    assert model.head.weight is model.embedding.weight
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
    batch = PackedBatch.pack(tokens(), 1, 0)
    model(batch).backward()  # both uses' gradients land in the one parameter
    alone = DecoderModel(config, CommGroup.single(), random_init=False)
    load_pretrained(alone, source)
    alone.head.weight = torch.nn.Parameter(alone.embedding.weight.detach().clone())
    alone(batch).backward()
    torch.testing.assert_close(
        model.embedding.weight.grad, alone.embedding.weight.grad + alone.head.weight.grad
    )


class _CountingSource:
    """Wraps a source and counts the elements each read returns."""

    def __init__(self, source) -> None:
        self.source, self.elements = source, 0

    def __getattr__(self, name):
        return getattr(self.source, name)

    def read(self, name, index=slice(None)):
        tensor = self.source.read(name, index)
        self.elements += tensor.numel()
        return tensor


def test_each_rank_reads_only_its_own_slices(models) -> None:
    folder, hf, _ = models["untied-llama3"]
    config, source = pretrained_model_config(f"hf:{folder}")
    H = config.hidden
    replicated = (2 * config.layers + 1) * H  # norm weights, read whole by every rank
    sharded = sum(p.numel() for p in hf.parameters()) - replicated
    for P in (1, 2, 4):
        for rank in range(P):
            counting = _CountingSource(source)
            model = DecoderModel(config, RankStandIn(rank, P), random_init=False)
            load_pretrained(model, counting)
            assert counting.elements == sharded // P + replicated, (P, rank)


def _export_on_rank(folder: str, out: str) -> None:
    mesh = mesh_for()
    config, source = pretrained_model_config(f"hf:{folder}")
    model = DecoderModel(config, mesh.sp_group, random_init=False)
    load_pretrained(model, source)
    export_model(model, out, rank=mesh.rank)


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_reimport_export_is_byte_identical(case, models, tmp_path) -> None:
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    folder, hf, want = models[case]
    first, second = tmp_path / "first", tmp_path / "second"
    run_distributed(2, _export_on_rank, folder, str(first))
    run_distributed(4, _export_on_rank, str(first), str(second))
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    names = set(hf.state_dict()) - ({"lm_head.weight"} if hf.config.tie_word_embeddings else set())
    assert set(a) == set(b) == names
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.float32
        assert a[name].numpy().tobytes() == b[name].numpy().tobytes(), name
    again = LlamaForCausalLM.from_pretrained(second).eval()
    assert again.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert again.config.rope_scaling == hf.config.rope_scaling
    for got, w in zip(hf_logits(again, tokens()), want, strict=True):
        # the same weights, bit for bit; float32 kernels may still round a few values apart
        assert (got - w).abs().max() <= 1e-6 * w.abs().max()


def test_sharded_folders_both_ways(models, tmp_path) -> None:
    """A folder transformers saved in several safetensors files with an index loads; an export
    past --shard-size writes one that transformers loads."""
    import json

    from transformers import LlamaForCausalLM

    from integrations.hf.export import _export_pretrained

    folder, hf, want = models["untied-llama3"]
    theirs = tmp_path / "theirs"
    hf.save_pretrained(theirs, max_shard_size="100KB")
    assert len(json.loads((theirs / "model.safetensors.index.json").read_text())["weight_map"])
    ours = tmp_path / "ours"
    _export_pretrained(f"hf:{theirs}", ours, shard_bytes=100_000)
    index = json.loads((ours / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = LlamaForCausalLM.from_pretrained(ours).eval()
    for got, w in zip(hf_logits(again, tokens()), want, strict=True):
        assert (got - w).abs().max() <= 1e-6 * w.abs().max()
    config, source = pretrained_model_config(f"hf:{ours}")
    model = DecoderModel(config, CommGroup.single(), random_init=False)
    load_pretrained(model, source)
    batch = PackedBatch.pack(tokens(), 1, 0)
    with torch.no_grad():
        logits = model.logits(batch)
    for w, start in zip(want, batch.layout.bounds, strict=False):
        assert (logits[start : start + len(w)] - w).abs().max() < 1e-4 * w.abs().max()
