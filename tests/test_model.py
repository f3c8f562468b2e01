"""The decoder model (vocabulary-sharded embedding and head, switchable layers) against an
independent single-process float64 reference: the summed loss and every parameter's gradient, at
P = 1, 2, 4, for every strategy and a mixed plan."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import paradyse
from paradyse import DecoderModel, ModelConfig, PackedBatch, ReferenceDecoderLayer
from paradyse.reference import _rms_norm
from parallel_lib import CommGroup, all_reduce_

from .harness import run_distributed
from .layer_cases import RankStandIn, assert_close, mesh_for, supported

CONFIG = ModelConfig(hidden=64, heads=8, kv_heads=4, head_dim=16, ffn_hidden=128, layers=3,
                     vocab=64)  # fmt: skip
LENGTHS = [1, 7, 29, 64, 3]
SEED = 5


def _tokens() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, CONFIG.vocab, (n,), generator=g).tolist() for n in LENGTHS]


def _whole_weights() -> dict:
    """Whole float64 weights of the model seeded SEED, read off its one-rank build."""
    model = DecoderModel(CONFIG, CommGroup.single(), seed=SEED, dtype=torch.float64)
    return {
        "embedding": model.embedding.weight.detach().clone(),
        "layers": [
            paradyse.full_from_shards([layer.shard_tensors()], CONFIG.shape)
            for layer in model.layers
        ],  # fmt: skip
        "norm": model.norm.weight.detach().clone(),
        "head": model.head.weight.detach().clone(),
    }


def reference_loss_and_grads() -> tuple[float, dict]:
    """Plain torch, one sequence at a time: embedding rows, ReferenceDecoderLayer, RMSNorm,
    logits against the whole head, next-token cross-entropy summed."""
    whole = _whole_weights()
    emb = whole["embedding"].requires_grad_()
    layers = [ReferenceDecoderLayer(CONFIG.shape, w, CONFIG.norm_eps) for w in whole["layers"]]
    norm = whole["norm"].requires_grad_()
    head = whole["head"].requires_grad_()
    total = torch.zeros((), dtype=torch.float64)
    for ids in _tokens():
        h = [emb[torch.tensor(ids)]]
        for layer in layers:
            h = layer(h)
        logits = _rms_norm(h[0], norm, CONFIG.norm_eps) @ head.T
        if len(ids) > 1:
            total = total + F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum")
    total.backward()
    grads = {"embedding": emb.grad, "norm": norm.grad, "head": head.grad,
             "layers": [layer.grads() for layer in layers]}  # fmt: skip
    return float(total.detach()), grads


def _run_model(plan: list[str]) -> dict:
    """One forward and backward of the model on this rank; shards of the gradients."""
    mesh = mesh_for()
    model = DecoderModel(CONFIG, mesh.sp_group, seed=SEED)
    for layer, strategy in zip(model.layers, plan, strict=True):
        layer.set_option(strategy, "selective" if strategy == "ring" else "none")
    batch = PackedBatch.pack(_tokens(), mesh.sp, mesh.sp_rank)
    loss = model(batch)
    loss.backward()
    for p in model.parameters():
        if not paradyse.is_sharded(p):
            all_reduce_(p.grad, mesh.sp_group)
    total = loss.detach().clone()
    all_reduce_(total, mesh.sp_group)
    return {
        "loss": float(total),
        "embedding": model.embedding.weight.grad.clone(),
        "head": model.head.weight.grad.clone(),
        "norm": model.norm.weight.grad.clone(),
        "layers": [layer.shard_tensors(grads=True) for layer in model.layers],
        "rank": mesh.sp_rank,
        "P": mesh.sp,
    }


def _check(result: dict, want_loss: float, want: dict) -> None:
    P, rank = result["P"], result["rank"]
    assert abs(result["loss"] - want_loss) <= 1e-5 * abs(want_loss)
    rows = CONFIG.vocab // P
    for name in ("embedding", "head"):
        assert_close(result[name], want[name][rank * rows : (rank + 1) * rows], 1e-5, name)
    assert_close(result["norm"], want["norm"], 1e-5, "final norm")
    for i, (got, whole) in enumerate(zip(result["layers"], want["layers"], strict=True)):
        expected = paradyse.shard_full_weights(whole, CONFIG.shape, P, rank)
        for key, tensor in got.items():
            assert_close(tensor, expected[key], 1e-5, f"layer {i} {key}")


@pytest.fixture(scope="module")
def reference():
    return reference_loss_and_grads()


@pytest.mark.parametrize("P", [1, 2, 4])
def test_every_strategy_matches_the_reference(P, reference) -> None:
    want_loss, want = reference
    for name in supported(P, CONFIG.shape):
        for result in run_distributed(P, _run_model, [name] * CONFIG.layers):
            _check(result, want_loss, want)


@pytest.mark.parametrize("P", [2, 4])
def test_mixed_plan_matches_the_reference(P, reference) -> None:
    want_loss, want = reference
    names = [n for n in ("tp_sp", "ring", "metp", "ulysses") if n in supported(P, CONFIG.shape)]
    for result in run_distributed(P, _run_model, names[: CONFIG.layers]):
        _check(result, want_loss, want)


def test_weights_do_not_depend_on_the_group_size() -> None:
    whole = _whole_weights()
    other = DecoderModel(CONFIG, CommGroup.single(), seed=SEED + 1, dtype=torch.float64)
    assert not torch.equal(other.embedding.weight, whole["embedding"])
    again = DecoderModel(CONFIG, CommGroup.single(), seed=SEED, dtype=torch.float64)
    assert torch.equal(again.head.weight, whole["head"])
    shards = [
        DecoderModel(CONFIG, RankStandIn(r, 4), seed=SEED, dtype=torch.float64) for r in range(4)
    ]
    assert torch.equal(torch.cat([m.embedding.weight for m in shards]), whole["embedding"])
    for i, layer in enumerate(whole["layers"]):
        got = paradyse.full_from_shards([m.layers[i].shard_tensors() for m in shards], CONFIG.shape)
        for key, tensor in layer.items():
            assert torch.equal(got[key], tensor), (i, key)


def test_sp_problems_name_what_to_change() -> None:
    assert "vocab (250) is not divisible by sp=4" in ModelConfig(vocab=250).sp_problem(4)
    assert "query heads (8)" in ModelConfig().sp_problem(3)
    with pytest.raises(ValueError, match="model.layers must be a positive integer"):
        ModelConfig(layers=0)
