"""Alloc-MoE on transformers MoE models (integrations.alloc_moe.hf), on tiny random Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V2 models (nothing downloaded): at the full budget every
hook gives the model's own logits bit for bit; a reduced budget computes at most T * K_l expert
rows per layer (counted in the patched block and, independently, at the experts' inputs) and
changes the logits; generation works with a hook on; remove() restores the model; the request
carries each family's conventions; bad inputs are refused in one line."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import integrations.alloc_moe as am  # noqa: E402
from integrations.alloc_moe import AllocT, LayerTopK, allocate_layers  # noqa: E402
from integrations.alloc_moe.hf import (  # noqa: E402
    TESTED_TRANSFORMERS,
    apply_router_hook,
    hf_moe_blocks,
    moe_layers_of_hf,
)
from parallel_lib.routing import Routing, top_k_routing  # noqa: E402

from .alloc_hf_cases import (  # noqa: E402
    FAMILIES,
    NAMES,
    VOCAB,
    Recorder,
    assert_counts_agree,
    build,
    logits,
    made_up_sensitivity,
    reduced_budget,
    run_counted,
    tiny,
    token_ids,
)


@pytest.mark.parametrize("name", NAMES)
def test_an_expert_without_pairs_runs_no_matmul(name: str) -> None:
    """Only the experts a hook keeps run, each once, on exactly its pairs' rows."""
    model, ids = tiny(name), token_ids()
    T = ids.numel()

    def two_experts(request) -> Routing:  # even tokens to expert 5, odd ones to 2; none to others
        token = request.real.nonzero().squeeze(1)
        expert = torch.where(token % 2 == 0, 5, 2)
        return Routing(token, expert, request.probs[token, expert])

    reference = logits(model, ids)
    out, handle, spy = run_counted(model, two_experts, ids)
    assert_counts_agree(handle, spy)
    assert [c.calls for c in handle.counts] == [2] * len(handle.blocks)
    assert [c.rows for c in handle.counts] == [T] * len(handle.blocks)
    assert all(seen == {2, 5} for seen in spy.experts.values())
    assert (out - reference).abs().max() > 1e-4


def dense_reference(name: str, block, hidden: torch.Tensor) -> torch.Tensor:
    """Every expert weighted by its probability (the family's scale, shared experts, groups),
    written out independently of the adapter, in float64."""
    x = hidden.reshape(-1, hidden.shape[-1])
    if name == "deepseek_v2":
        gate = block.gate
        p = torch.softmax(x @ gate.weight.T, -1).view(len(x), gate.num_group, -1)
        best = p.max(-1).values.topk(gate.topk_group, dim=-1).indices
        allowed = torch.zeros(p.shape[:2], dtype=torch.bool).scatter(1, best, True)
        p = (p * allowed[..., None]).reshape(len(x), -1) * gate.routed_scaling_factor
    else:
        p = torch.softmax(block.gate(x), -1)
    out = sum(p[:, e, None].double() * expert(x).double() for e, expert in enumerate(block.experts))
    if name == "qwen2_moe":
        out = out + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    if name == "deepseek_v2":
        out = out + block.shared_experts(x)
    return out.reshape(hidden.shape)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_a_hook_may_keep_more_than_top_k(name: str) -> None:
    """Pairs beyond the family's top-k (here every expert) are computed and combined as the
    family combines its own: each weighted by its probability."""
    model = tiny(name)
    block = hf_moe_blocks(model)[0].module
    hidden = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    with apply_router_hook(model, LayerTopK(8, renormalize=False)) as handle:
        out = block(hidden)
    out = out[0] if isinstance(out, tuple) else out
    assert handle.counts[0].rows == 10 * 8
    torch.testing.assert_close(out.double(), dense_reference(name, block, hidden))


def test_config_methods_run_on_a_hf_model(tmp_path) -> None:
    """`moe_layers_of_hf` stands in for a ParaDySe model in the core's `build_hook`, profile
    files included: every method keeps within the budget; `full` is the model."""
    model, ids = tiny("qwen3_moe"), token_ids()
    moe, T = moe_layers_of_hf(model), ids.numel()
    profile = tmp_path / "sensitivity.json"
    am.save_sensitivity(profile, made_up_sensitivity(len(moe.layers), moe.top_k), moe.layers,
                        moe.top_k)  # fmt: skip
    budget = reduced_budget(moe)
    reference = logits(model, ids)
    for method in am.METHODS:
        options = am.Options(method=method, budget=budget, sensitivity=str(profile), top_p=0.5,
                             naee_beta=0.5)  # fmt: skip
        hook = am.build_hook(options, moe)
        out, handle, spy = run_counted(model, hook, ids)
        assert_counts_agree(handle, spy)
        rows = sum(c.rows for c in handle.counts)
        if method == "full":
            assert hook is None and torch.equal(out, reference)
        else:
            assert rows <= T * budget, (method, rows)
            assert (out - reference).abs().max() > 1e-4, method


def test_pinned_version() -> None:
    assert transformers.__version__ == TESTED_TRANSFORMERS


@pytest.mark.parametrize("name", NAMES)
def test_full_budget_is_the_model_exactly(name: str) -> None:
    model, ids = tiny(name), token_ids()
    moe = moe_layers_of_hf(model)
    L, K, T = len(moe.layers), moe.top_k, ids.numel()
    reference = logits(model, ids)
    hooks = {
        "none": None,
        "top_k_routing": top_k_routing,
        "LayerTopK(K)": LayerTopK(K),
        "AllocT(K)": AllocT([K] * L, layers=moe.layers),
        "AllocT(K, k_base=0)": AllocT(K, k_base=0),
    }
    for label, hook in hooks.items():
        out, handle, spy = run_counted(model, hook, ids)
        assert torch.equal(out, reference), (label, (out - reference).abs().max().item())
        assert [c.rows for c in handle.counts] == [T * K] * L, label
        assert [c.tokens for c in handle.counts] == [T] * L, label
        assert_counts_agree(handle, spy)
    for block in hf_moe_blocks(model):
        assert "forward" not in block.module.__dict__  # the class's own forward again
    assert torch.equal(logits(model, ids), reference)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("deepseek_v2", dict(topk_method="greedy", n_group=None, topk_group=None)),  # V2-Lite
        ("deepseek_v2", dict(norm_topk_prob=True)),  # read, and ignored, by transformers 4.57.3
        ("mixtral", dict(router_jitter_noise=0.2)),  # training: the input jitter
        ("qwen2_moe", dict(norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[])),
    ],
)
def test_family_variants_at_full_budget(name: str, overrides: dict) -> None:
    """Other settings of a family reproduce the model too (in training mode: the same random
    draws, the same outputs)."""
    model, ids = build(name, **overrides).train(), token_ids(batch=2, length=9)
    K = moe_layers_of_hf(model).top_k
    torch.manual_seed(7)
    reference = logits(model, ids)
    for hook in (LayerTopK(K), AllocT(K)):
        torch.manual_seed(7)
        with apply_router_hook(model, hook):
            assert torch.equal(logits(model, ids), reference)


@pytest.mark.parametrize("name", NAMES)
def test_reduced_budget_computes_at_most_the_budget(name: str) -> None:
    model, ids = tiny(name), token_ids()
    moe = moe_layers_of_hf(model)
    L, K, T = len(moe.layers), moe.top_k, ids.numel()
    reference = logits(model, ids)
    budget = reduced_budget(moe)
    ks = allocate_layers(made_up_sensitivity(L, K), budget)
    assert sum(ks) <= budget and ks != [K] * L
    alloc_lt = Recorder(AllocT(ks, layers=moe.layers))
    alloc_t0 = Recorder(AllocT(ks, k_base=0, layers=moe.layers))
    for label, hook, per_layer in (
        ("LayerTopK(1)", LayerTopK(1), [1] * L),
        ("Alloc-L", LayerTopK(ks, moe.layers), ks),
        ("Alloc-L + Alloc-T", alloc_lt, ks),
        ("Alloc-L + Alloc-T, k_base=0", alloc_t0, ks),
    ):
        out, handle, spy = run_counted(model, hook, ids)
        assert_counts_agree(handle, spy)
        rows = [c.rows for c in handle.counts]
        assert all(c.tokens == T for c in handle.counts)
        assert all(r <= T * k for r, k in zip(rows, per_layer, strict=True)), (label, rows)
        assert rows == [T * k for k in per_layer], (label, rows)  # these spend all of it
        assert sum(rows) <= T * budget < T * L * K
        assert (out - reference).abs().max() > 1e-4, label
    # Alloc-T shares a layer's budget unevenly among tokens, each within k_base..K
    uneven = False
    for recorder, k_base in ((alloc_lt, 1), (alloc_t0, 0)):
        for routing in recorder.routings:
            per_token = torch.bincount(routing.token, minlength=T)
            assert k_base <= int(per_token.min()) and int(per_token.max()) <= K
            uneven |= int(per_token.min()) < int(per_token.max())
    assert uneven


@pytest.mark.parametrize("name", NAMES)
def test_request_follows_the_family(name: str) -> None:
    model, ids = tiny(name), token_ids(batch=2, length=5)
    renormalize, fields = FAMILIES[name][2], FAMILIES[name][3]
    recorder = Recorder()
    with apply_router_hook(model, recorder) as handle:
        logits(model, ids)
    L = len(handle.blocks)
    assert [r.layer for r in recorder.requests] == list(range(L))
    E = fields.get("num_local_experts") or fields.get("num_experts") or fields["n_routed_experts"]
    for request in recorder.requests:
        assert request.top_k == fields["num_experts_per_tok"]
        assert request.renormalize is renormalize
        assert request.probs.shape == request.logits.shape == (10, E)
        assert request.probs.dtype == torch.float32
        assert bool(request.real.all())
        assert request.seq_index.tolist() == [0] * 5 + [1] * 5 and request.seq_lens == (5, 5)
        if name != "deepseek_v2":  # DeepSeek-V2's groups zero some probabilities (below)
            torch.testing.assert_close(request.probs, torch.softmax(request.logits, -1))


def test_deepseek_v2_group_limited_routing_and_numbering() -> None:
    model, ids = tiny("deepseek_v2"), token_ids()
    blocks = hf_moe_blocks(model)
    assert [(b.index, b.decoder_layer) for b in blocks] == [(0, 1), (1, 2)]  # layer 0 is dense
    assert moe_layers_of_hf(model, numbering="decoder").layers == (1, 2)
    recorder = Recorder(LayerTopK({1: 3, 2: 2}))
    with apply_router_hook(model, recorder, numbering="decoder") as handle:
        logits(model, ids)
    assert [c.layer for c in handle.counts] == [1, 2]
    assert [c.rows for c in handle.counts] == [ids.numel() * 3, ids.numel() * 2]
    for request, routing in zip(recorder.requests, recorder.routings, strict=True):
        allowed = request.probs.view(-1, 4, 2) > 0  # (n, n_group, experts per group)
        assert allowed.any(-1).sum(-1).eq(2).all()  # exactly topk_group groups per token
        p = torch.softmax(request.logits, -1).view(-1, 4, 2)
        best = p.max(-1).values.topk(2, dim=-1).indices  # the two groups of highest best p
        assert torch.equal(allowed.any(-1), torch.zeros_like(allowed.any(-1)).scatter(1, best, 1))
        assert allowed.view(-1, 8)[routing.token, routing.expert].all()  # kept inside them


@pytest.mark.parametrize("name", NAMES)
def test_padding_is_not_routed(name: str) -> None:
    """Padding (attention mask 0) gets no expert row. The real tokens' logits then differ from
    the model's, which routes padding too, by float rounding only: a CPU matmul's result for a
    row depends on the other rows of its batch, and the experts' batches lose the padding."""
    model, ids = tiny(name), token_ids(batch=2, length=9)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    reference = logits(model, ids, mask)
    out, handle, spy = run_counted(model, None, ids, mask)
    assert_counts_agree(handle, spy)
    real = mask.bool()
    assert all(c.tokens == int(mask.sum()) for c in handle.counts)
    torch.testing.assert_close(out[real], reference[real], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_generate_with_a_hook(name: str) -> None:
    model, ids = tiny(name), token_ids(batch=2, length=6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    new = 4
    settings = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                    pad_token_id=0)  # fmt: skip
    with torch.no_grad():
        reference = model.generate(ids, **settings)
        moe = moe_layers_of_hf(model)
        ks = allocate_layers(made_up_sensitivity(len(moe.layers), moe.top_k), reduced_budget(moe))
        with apply_router_hook(model, LayerTopK(moe.top_k)):
            full = model.generate(ids, **settings)
        with apply_router_hook(model, AllocT(ks, layers=moe.layers)) as handle:
            reduced = model.generate(ids, **settings)
        restored = model.generate(ids, **settings)
    assert torch.equal(full, reference)
    assert torch.equal(restored, reference)
    assert reduced.shape == (2, 6 + new) and torch.equal(reduced[:, :6], ids)
    assert int(reduced.min()) >= 0 and int(reduced.max()) < VOCAB
    T = int(mask.sum()) + 2 * (new - 1)  # the prompt's real tokens, then one per row and step
    assert [c.tokens for c in handle.counts] == [T] * len(ks)
    assert [c.rows for c in handle.counts] == [T * k for k in ks]


@pytest.mark.parametrize("name", ["olmoe", "deepseek_v2"])
def test_gradients_flow_through_the_hook(name: str) -> None:
    """The hook's weights are functions of the router's probabilities: at the full budget the
    gradients are the model's own."""
    ids = token_ids(batch=2, length=7)
    grads = []
    for patched in (False, True):
        model = build(name).train()
        handle = (
            apply_router_hook(model, AllocT(moe_layers_of_hf(model).top_k)) if patched else None
        )
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if "gate" in n})
        if handle:
            handle.remove()
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n, g in grads[0].items():
        assert g is not None and g.abs().sum() > 0, n
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7)


def _refused(call, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value), str(info.value)


def test_bad_inputs_are_refused_in_one_line() -> None:
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=16,
            num_attention_heads=2,
            num_hidden_layers=1,
            intermediate_size=32,
            vocab_size=VOCAB,
        )  # fmt: skip
    )
    _refused(lambda: apply_router_hook(llama, None), "no sparse MoE block found in Llama")
    _refused(lambda: moe_layers_of_hf(llama), "no sparse MoE block")
    model = tiny("olmoe")
    _refused(lambda: apply_router_hook(model, None, numbering="global"), "numbering must be")
    with apply_router_hook(model, None):
        _refused(lambda: apply_router_hook(model, None), "already has a router hook")

    def bad(request) -> Routing:  # an expert index past the 8 experts
        routing = top_k_routing(request)
        return Routing(routing.token, routing.expert + 8, routing.weight)

    with apply_router_hook(model, bad):
        _refused(lambda: logits(model, token_ids()), r"MoE layer 0 \(model.layers.0.mlp\)")
    assert "forward" not in model.model.layers[0].mlp.__dict__
    _refused(
        lambda: apply_router_hook(build("deepseek_v2", num_experts_per_tok=6), None),
        "cannot choose top_k=6",
    )
    _refused(
        lambda: moe_layers_of_hf(build("deepseek_v2", topk_method="noaux_tc")),
        "topk_method='noaux_tc' is not implemented",
    )
