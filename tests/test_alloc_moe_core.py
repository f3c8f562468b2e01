"""Alloc-MoE's core (integrations.alloc_moe): the layer DP against brute force; Alloc-T, top-p,
NAEE and the budget cap on hand-built probabilities; calibration; on a tiny MoE model, the
activations the experts compute stay within the budget for every method and the full budget
reproduces the original logits bit for bit; bad inputs get one line; per-token hooks give the
same logits at sp = 2 as at sp = 1."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch

import integrations.alloc_moe as am
import parallel_lib.moe
from integrations.alloc_moe import AllocT, BudgetCap, LayerTopK, NAEESkip, TopP
from paradyse import DecoderModel, ModelConfig, PackedBatch, Trainer, load_config
from paradyse.integration import IntegrationError, RunContext
from paradyse.moe import MoeConfig
from parallel_lib import CommGroup
from parallel_lib.routing import RouterRequest, top_k_routing

from .harness import run_distributed
from .layer_cases import mesh_for
from .test_engine import TINY
from .test_moe_train import MOE

CONFIG = ModelConfig(hidden=32, heads=4, kv_heads=2, head_dim=8, ffn_hidden=64, layers=3, vocab=64,
                     moe=MoeConfig(experts=8, top_k=4, expert_ffn_hidden=16,
                                   first_dense_layers=1))  # fmt: skip
LENGTHS = [1, 5, 12, 30]  # padded to even lengths at P = 1: padding is present
T = sum(LENGTHS)
S_FILE = [[9.0, 6.0, 5.0, 4.5], [7.0, 6.4, 6.2, 6.1]]  # MoE layers 1, 2: layer 1 more sensitive


def _refuses(call, message: str, error: type[Exception] = ValueError) -> None:
    """call() raises `error` matching `message`, in one line."""
    with pytest.raises(error, match=message) as info:
        call()
    assert "\n" not in str(info.value), str(info.value)


# ---------------------------------------------------------------- Alloc-L's dynamic program
def brute_force_allocation(S, budget: int) -> list[int]:
    """Every allocation tried; the DP's tie rule: least cost (summed in layer order), fewest
    activations, then the deepest layers the fewest experts."""
    K = len(S[0])
    best = None
    for alloc in itertools.product(range(1, K + 1), repeat=len(S)):
        if sum(alloc) <= budget:
            key = (sum(S[i][k - 1] for i, k in enumerate(alloc)), sum(alloc), alloc[::-1])
            best = key if best is None or key < best else best
    return list(best[2][::-1])


def test_dp_equals_brute_force_on_500_instances() -> None:
    rng = random.Random(2024)
    for case in range(500):
        L, K = rng.randint(1, 6), rng.randint(1, 4)
        if case % 2:  # small integers: many ties, summed exactly
            S = [[float(rng.randint(0, 3)) for _ in range(K)] for _ in range(L)]
        else:
            S = [[rng.uniform(1, 20) for _ in range(K)] for _ in range(L)]
        budget = rng.randint(L, L * K + 1)
        got = am.allocate_layers(S, budget)
        assert got == brute_force_allocation(S, budget), (S, budget)
        assert sum(got) <= budget and all(1 <= k <= K for k in got)


def test_dp_examples_tie_rule_and_bad_input() -> None:
    assert am.allocate_layers(S_FILE, 8) == [4, 4]
    assert am.allocate_layers(S_FILE, 5) == [3, 2]  # 5 + 6.4 beats 4.5 + 7 and 6 + 6.2
    assert am.allocate_layers([[1.0, 1.0], [1.0, 1.0]], 4) == [1, 1]  # fewest activations
    assert am.allocate_layers([[2.0, 1.0], [2.0, 1.0]], 3) == [2, 1]  # the deeper layer gives way
    assert am.uniform_allocation(5, 2, 4) == [3, 2] and am.uniform_allocation(9, 2, 4) == [4, 4]
    bad = [(S_FILE, 1, "budget 1 is below the 2 MoE layers"), ([], 3, "empty"), ([[]], 3, "empty"),
           ([[1.0, 2.0], [1.0]], 3, "ragged"), ([[1.0, float("nan")]], 3, "nan at layer 0, k=2"),
           ([[1.0, float("inf")]], 3, "inf"), ([["a"]], 3, "rows of numbers"),
           (S_FILE, 2.5, "must be an integer")]  # fmt: skip
    for S, budget, message in bad:
        _refuses(lambda S=S, budget=budget: am.allocate_layers(S, budget), message)


# ---------------------------------------------------------------- hooks on hand-built requests
def _request(rows, top_k=4, real=None, seq_index=None, renormalize=True, grad=False, layer=1):
    probs = torch.tensor(rows, dtype=torch.float32, requires_grad=grad)
    n = probs.shape[0]
    real = torch.ones(n, dtype=torch.bool) if real is None else torch.tensor(real)
    seq = torch.zeros(n, dtype=torch.int64) if seq_index is None else torch.tensor(seq_index)
    lens = tuple(int(c) for c in torch.bincount(seq))
    return RouterRequest(layer, probs, probs.detach().log(), top_k, renormalize, real, seq, lens)


def _kept(routing) -> dict[int, list[int]]:
    """token -> its kept experts, in the routing's order."""
    out: dict[int, list[int]] = {}
    for t, e in zip(routing.token.tolist(), routing.expert.tolist(), strict=True):
        out.setdefault(t, []).append(e)
    return out


PEAKED, FLAT, MEDIUM = [0.05, 0.85, 0.05, 0.05], [0.22, 0.2, 0.3, 0.28], [0.1, 0.1, 0.3, 0.5]
SCOPES = ("batch", "sequence")


def test_alloc_t_shares_the_budget_by_score_with_deterministic_ties() -> None:
    routing = AllocT(2)(_request([PEAKED, FLAT, MEDIUM]))
    # 3 first experts, then the best 3 of the rest: 0.3 (token 2), 0.28 and 0.22 (token 1)
    assert _kept(routing) == {0: [1], 1: [2, 3, 0], 2: [3, 2]}
    assert len(routing) == 3 * 2
    sums = torch.zeros(3).index_add(0, routing.token, routing.weight)
    torch.testing.assert_close(sums, torch.ones(3))  # renormalised over the kept experts
    same = [0.4, 0.2, 0.3, 0.1]
    assert _kept(AllocT(2)(_request([PEAKED, same, same]))) == {0: [1], 1: [0, 2, 1], 2: [0, 2]}
    even = [0.4, 0.2, 0.2, 0.2]  # experts 1, 2, 3 tie: the lower index first
    assert _kept(AllocT(2)(_request([even]))) == {0: [0, 1]}
    # four slots for six equal candidates: token 0 takes all three of its own first
    assert _kept(AllocT(3)(_request([even, even]))) == {0: [0, 1, 2, 3], 1: [0, 1]}
    request = _request([PEAKED, MEDIUM, FLAT, FLAT], seq_index=[0, 0, 1, 1])
    by_batch, by_seq = AllocT(2)(request), AllocT(2, scope="sequence")(request)
    # the batch's 4 extra slots: 0.3 (token 1), 0.28 (tokens 2, 3), 0.22 (token 2)
    assert [len(v) for v in _kept(by_batch).values()] == [1, 2, 3, 2]
    # 2 per sequence: sequence 0's go to token 1 (0.3, 0.1), sequence 1's to 0.28 and 0.28
    assert [len(v) for v in _kept(by_seq).values()] == [1, 3, 2, 2]


def test_alloc_t_invariants_on_random_batches() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        n, E, K = 1 + trial % 9, 8, 1 + trial % 4
        probs = torch.softmax(3 * torch.randn(n, E, generator=g), -1)
        real = torch.rand(n, generator=g) > 0.2
        seq = torch.sort(torch.randint(0, 3, (n,), generator=g)).values
        request = RouterRequest(2, probs, probs.log(), K, True, real, seq, (n,) * 3)
        for k_l, k_base, scope in itertools.product(range(1, K + 1), range(K), SCOPES):
            if k_base <= k_l:
                routing = AllocT({2: k_l}, k_base, scope=scope)(request)
                kept = _kept(routing)
                assert len(routing) == int(real.sum()) * k_l  # T * K_l exactly
                assert set(kept) <= set(real.nonzero().squeeze(1).tolist())  # no padding
                assert all(k_base <= len(v) <= K for v in kept.values())
                pairs = set(zip(routing.token.tolist(), routing.expert.tolist(), strict=True))
                assert len(pairs) == len(routing)
    one = _request([FLAT])  # T = 1: top-K_l
    for k in range(1, 5):
        want, got = top_k_routing(one, k), AllocT(k)(one)
        assert torch.equal(got.expert, want.expert) and torch.equal(got.weight, want.weight)


def test_weights_are_differentiable_probabilities() -> None:
    request = _request([FLAT, MEDIUM], grad=True, renormalize=False)
    for hook in (AllocT(2), TopP(0.7), NAEESkip(0.5), LayerTopK(3)):
        routing = hook(request)
        assert torch.equal(routing.weight, request.probs[routing.token, routing.expert])
        routing.weight.sum().backward()
        assert request.probs.grad is not None and request.probs.grad.abs().sum() > 0
        request.probs.grad = None
    renormed, plain = LayerTopK(2, renormalize=True)(request), LayerTopK(2)(request)
    assert not torch.equal(renormed.weight, plain.weight)  # the option overrides the layer's


def test_top_p_naee_and_the_budget_cap_on_hand_built_rows() -> None:
    row = [0.05, 0.3, 0.5, 0.15]  # ranked 0.5 (e2), 0.3 (e1), 0.15 (e3), 0.05 (e0)
    cases = [
        (TopP(0.4), [2]), (TopP(0.75), [2, 1]), (TopP(0.9), [2, 1, 3]), (TopP(0.9, 2), [2, 1]),
        (TopP(1.0), [2, 1, 3, 0]), (TopP(1.0, max_k=3), [2, 1, 3]),
        (NAEESkip(0.0), [2, 1, 3, 0]), (NAEESkip(0.25), [2, 1, 3]), (NAEESkip(0.5), [2, 1]),
        (NAEESkip(0.7), [2]), (NAEESkip(2.0), [2]),
    ]  # fmt: skip
    for hook, experts in cases:
        assert _kept(hook(_request([row]))) == {0: experts}, hook
    assert _kept(NAEESkip(0.0)(_request([row], top_k=2))) == {0: [2, 1]}  # within the top_k
    padded = TopP(1.0)(_request([row, row], real=[False, True]))
    assert set(padded.token.tolist()) == {1}
    request = _request([PEAKED, FLAT, MEDIUM])  # the cap trims as Alloc-T does
    cap = BudgetCap(TopP(1.0, max_k=4), 2)
    capped, alloc_t = cap(request), AllocT(2)(request)
    assert _kept(capped) == _kept(alloc_t) and cap.trimmed == 12 - 6
    assert torch.equal(capped.weight, alloc_t.weight)
    loose = BudgetCap(NAEESkip(0.9), 2)
    assert _kept(loose(request)) == _kept(NAEESkip(0.9)(request)) and loose.trimmed == 0


def test_hooks_refuse_bad_arguments_in_one_line() -> None:
    bad = [
        (lambda: AllocT(2, k_base=3), "k_base 3 exceeds the least layer budget k=2"),
        (lambda: AllocT({1: 3, 2: 1}, k_base=2), "k_base 2 exceeds"),
        (lambda: AllocT([2, 3]), "needs layers="),
        (lambda: LayerTopK(0), "integer >= 1"),
        (lambda: TopP(1.5), r"p must be in \(0, 1\]"),
        (lambda: NAEESkip(-0.1), "beta must be a number >= 0"),
        (lambda: LayerTopK({1: 2})(_request([FLAT], layer=5)), "no k for MoE layer 5"),
        (lambda: AllocT(5)(_request([FLAT])), "exceeds the 4 candidates"),
        (lambda: LayerTopK(9)(_request([FLAT])), "looks at 9 experts"),
    ]  # fmt: skip
    for make, message in bad:
        _refuses(make, message)


def test_calibration_hits_the_target_on_its_data() -> None:
    g = torch.Generator().manual_seed(1)
    probs = {1: torch.softmax(2 * torch.randn(400, 8, generator=g), -1),
             2: [torch.softmax(torch.randn(150, 8, generator=g), -1) for _ in "ab"]}  # fmt: skip
    targets = {1: 2.5, 2: 1.7}
    betas = am.calibrate_naee_beta(probs, 4, targets)
    ps = am.calibrate_top_p(probs, targets, max_k=4)
    for layer, p in probs.items():
        rows = (p if isinstance(p, torch.Tensor) else torch.cat(p)).tolist()
        request = _request(rows)
        want = int((targets[layer] - 1) * len(rows)) + len(rows)  # continuous data: no ties
        assert len(NAEESkip(betas[layer])(request)) == want
        assert len(TopP(ps[layer], 4)(request)) == want
    assert am.calibrate_naee_beta(probs, 4, 4) == {1: 0.0, 2: 0.0}
    assert am.calibrate_top_p(probs, 5, max_k=4) == {1: 1.0, 2: 1.0}


# ---------------------------------------------------------------- a tiny MoE model
def _batch(P: int = 1, rank: int = 0) -> PackedBatch:
    g = torch.Generator().manual_seed(7)
    tokens = [torch.randint(0, CONFIG.vocab, (n,), generator=g).tolist() for n in LENGTHS]
    return PackedBatch.pack(tokens, P, rank)


@pytest.fixture(scope="module")
def model() -> DecoderModel:
    return DecoderModel(CONFIG, CommGroup.single(), seed=3)


def _route(model: DecoderModel, hook) -> None:
    for layer in model.layers:
        if CONFIG.moe_layer(layer.index):
            layer.mlp.hook = hook


def _options(*sets: str) -> am.Options:
    config = load_config(None, [f"integrations.alloc_moe.{s}" for s in sets])
    return config.integrations["alloc_moe"]


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("alloc") / "sensitivity.json"
    am.save_sensitivity(path, S_FILE, [1, 2], 4, {"data": "synthetic"})
    return str(path)


def _computed(model, hook, monkeypatch) -> tuple[torch.Tensor, list[int], list[int]]:
    """Logits, the pairs per MoE layer the recorder saw and the rows the experts computed."""
    rows, run_experts = [], parallel_lib.moe._run_experts

    def counting(chunk, counts, gate_up, down):
        rows.append(sum(counts))
        return run_experts(chunk, counts, gate_up, down)

    monkeypatch.setattr(parallel_lib.moe, "_run_experts", counting)
    _route(model, hook)
    try:
        with torch.no_grad():
            model(_batch())
            logits = model.logits(_batch())
    finally:
        _route(model, None)
    loads = [int(model.moe_recorder.load[i].sum()) for i in (1, 2)]
    return logits, loads, rows[:2]


METHODS = {
    "uniform": [], "alloc_t": [], "alloc_l": ["sensitivity={s}"], "alloc_lt": ["sensitivity={s}"],
    "top_p": ["top_p=0.6"], "naee": ["naee_beta=0.3"],
}  # fmt: skip


def test_every_method_stays_within_the_budget(model, profile, monkeypatch) -> None:
    assert int(_batch().real_mask().sum()) == T < _batch().local_tokens  # padding present
    for method, extra in METHODS.items():
        for budget in (2, 3, 5, 6, 8):
            options = _options(f"method={method}", f"budget={budget}",
                               *(e.format(s=profile) for e in extra))  # fmt: skip
            _, loads, rows = _computed(model, am.build_hook(options, model), monkeypatch)
            assert loads == rows, (method, budget)  # the experts ran exactly the routed pairs
            assert sum(rows) <= budget * T, (method, budget, rows)
            if method in ("uniform", "alloc_t", "alloc_l", "alloc_lt"):  # spends it exactly
                spent = [k * T for k in am.layer_allocation(options, model)]
                assert rows == spent, (method, budget)


def test_full_budget_reproduces_the_original_logits(model, profile, monkeypatch) -> None:
    reference = model.logits(_batch())
    noisy = profile.replace("sensitivity", "noisy")  # a profile favouring k = 3 at layer 1
    am.save_sensitivity(noisy, [[9.0, 6.0, 4.0, 4.5], [7.0, 6.4, 6.2, 6.1]], [1, 2], 4)
    assert am.allocate_layers(am.load_sensitivity(noisy, model).S, 8) == [3, 4]
    cases = [
        ["method=full"], ["method=uniform"], ["method=alloc_t"], ["method=alloc_t", "k_base=4"],
        ["method=alloc_l", f"sensitivity={profile}"], ["method=alloc_l", f"sensitivity={noisy}"],
        ["method=alloc_lt", f"sensitivity={profile}"], ["method=top_p", "top_p=1.0"],
        ["method=naee", "naee_beta=0"], ["method=top_p", "top_p=1.0", "cap=false"],
        ["method=alloc_t", "scope=sequence"],
    ]  # fmt: skip
    for sets in cases:
        logits, loads, _ = _computed(model, am.build_hook(_options(*sets), model), monkeypatch)
        assert torch.equal(logits, reference) and loads == [4 * T, 4 * T], sets
    for hook in (LayerTopK(4), AllocT(4, k_base=0), TopP(1.0, 4), NAEESkip(0.0)):
        assert torch.equal(_computed(model, hook, monkeypatch)[0], reference), hook
    assert not torch.equal(_computed(model, AllocT(2), monkeypatch)[0], reference)
    _route(model, AllocT(2))
    try:
        model(_batch()).backward()  # a reduced budget still trains the router
        assert model.layers[1].mlp.router.grad.abs().sum() > 0
    finally:
        _route(model, None)
        model.zero_grad(set_to_none=True)


def test_files_and_options_refuse_mismatches_in_one_line(model, profile, tmp_path) -> None:
    moe = am.moe_layers_of(model)
    assert (moe.layers, moe.top_k, moe.experts, moe.full_budget) == ((1, 2), 4, 8, 8)
    loaded = am.load_sensitivity(profile, model)
    assert loaded.S == S_FILE and loaded.calibration == {"data": "synthetic"}
    am.save_naee_beta(tmp_path / "beta.json", {2: 0.5, 1: 0.25}, 4)
    assert am.load_naee_beta(tmp_path / "beta.json", model) == {1: 0.25, 2: 0.5}
    record = json.loads(Path(profile).read_text())
    bad = {"other_layers.json": {**record, "layers": [0, 1]},
           "other_k.json": {**record, "top_k": 2, "S": [r[:2] for r in S_FILE]},
           "short.json": {**record, "S": S_FILE[:1]}, "no_s.json": {"layers": [1, 2], "top_k": 4},
           "nan.json": {**record, "S": [[1, 2, 3, float("nan")], [1, 2, 3, 4]]}}  # fmt: skip
    for name, content in [*bad.items(), ("missing.json", None)]:
        if content is not None:
            (tmp_path / name).write_text(json.dumps(content))
        _refuses(lambda name=name: am.load_sensitivity(tmp_path / name, model), name)
    run = RunContext(mesh_for(1), model, CONFIG.layers, 1, 0)
    parts = am.plug_in(_options("method=alloc_lt", "budget=5", f"sensitivity={profile}"), run)
    assert isinstance(parts.router_hook, AllocT) and parts.router_hook.k[1] == 3
    assert am.plug_in(_options("method=full"), run).router_hook is None
    (tmp_path / "mismatch.json").write_text(json.dumps({"layers": [1], "top_k": 4, "S": [[1]]}))
    plugged = [
        (["method=uniform", "budget=1"], r"budget 1 is outside \[2, 8\]"),
        (["method=uniform", "budget=9"], r"budget 9 is outside \[2, 8\]"),
        (["method=alloc_l", f"sensitivity={tmp_path}/mismatch.json"], "profile this model again"),
        (["method=alloc_l", f"sensitivity={tmp_path}/none.json"], "no sensitivity file"),
        (["method=alloc_t", "budget=4", "k_base=3"], "k_base 3 exceeds the 2 experts"),
        (["method=naee", f"naee_beta={tmp_path}/none.json"], "no NAEE beta file"),
    ]
    for sets, message in plugged:
        _refuses(lambda sets=sets: am.plug_in(_options(*sets), run), message, IntegrationError)
    for sets, message in [(["method=alloc_l"], "needs alloc_moe.sensitivity"),
                          (["method=best"], "alloc_moe.method must be"),
                          (["top_p=0"], r"top_p must be in \(0, 1\]")]:  # fmt: skip
        _refuses(lambda sets=sets: _options(*sets), message)


def test_the_config_turns_it_on_in_training() -> None:
    sets = [*TINY, *MOE, "train.steps=2", "parallel.strategy=local",
            "integrations.alloc_moe.method=alloc_t", "integrations.alloc_moe.budget=3"]  # fmt: skip
    trainer = Trainer(load_config(None, sets), mesh=mesh_for(1), log=lambda *_: None)
    for record in trainer.run():  # top-2 model, budget 3: uniform shares [2, 1], spent exactly
        loads = [sum(layer["load"]) for layer in record["moe"]["layers"]]
        assert loads == [2 * record["tokens"], record["tokens"]], (loads, record["tokens"])


# ---------------------------------------------------------------- sp = 2 against sp = 1
def _logits_at(strategy: str | None = None) -> dict:
    """Per hook: ((sequence, position) of this rank's real tokens, their logits, MoE loads)."""
    mesh = mesh_for()
    model, batch = DecoderModel(CONFIG, mesh.sp_group, seed=3), _batch(mesh.sp, mesh.sp_rank)
    for layer in model.layers if strategy else ():
        layer.set_option(strategy)
    out, hooks = {}, {"layer_topk": LayerTopK({1: 2, 2: 3}), "top_p": TopP(0.6, 4),
                      "naee": NAEESkip(0.4), "alloc_t": AllocT(2)}  # fmt: skip
    for name, hook in hooks.items():
        _route(model, hook)
        with torch.no_grad():
            model(batch)
            logits = model.logits(batch)
        loads = [model.moe_recorder.load[i] for i in (1, 2)]
        real, bounds = batch.real_mask(), torch.tensor(batch.layout.bounds[1:])
        seq = torch.searchsorted(bounds, batch.layout.local_natural_index, right=True)
        where = list(zip(seq[real].tolist(), batch.positions[real].tolist(), strict=True))
        out[name] = (where, logits[real], loads)
    return out


@pytest.mark.parametrize("strategy", ["tp_sp", "ulysses"])
def test_per_token_hooks_agree_at_sp2(strategy) -> None:
    one = _logits_at()
    ranks = run_distributed(2, _logits_at, strategy)
    for name, (where, logits, loads) in one.items():
        row = {w: i for i, w in enumerate(where)}
        merged = torch.full_like(logits, float("nan"))
        for rank in ranks:
            merged[[row[w] for w in rank[name][0]]] = rank[name][1]
        summed = [sum(r[name][2][i] for r in ranks) for i in (0, 1)]
        if name == "alloc_t":  # per-rank pools: a different choice, the same total T * K_l
            assert [int(v.sum()) for v in summed] == [2 * T, 2 * T]
            continue
        assert all(map(torch.equal, summed, loads)), name  # the same pairs
        torch.testing.assert_close(merged, logits, rtol=1e-5, atol=1e-5, msg=name)
