"""The mixture-of-experts layer against an independent float64 reference (tests/moe_cases.py):
every strategy at P = 1, 2, 4 for outputs, input, router, expert and shared-expert gradients with
the balance and z-losses in the backward; mixed plans over MoE layers move no parameter; a router
hook that keeps fewer experts skips exactly the dropped work (refusals: test_moe_refusals.py)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from paradyse import SwitchableDecoderLayer
from paradyse.moe import MoeMLP
from parallel_lib import RECOMPUTE_MODES, STRATEGY_NAMES, get_strategy
from parallel_lib.moe import MoeShape
from parallel_lib.routing import MoeRecorder, RouterRequest, Routing

from .harness import run_distributed
from .layer_cases import assert_close, mesh_for
from .moe_cases import SHAPE, MoeCase, ReferenceMoe, expected_shards, swiglu_expert, to_local

REL = 1e-5
"""float32 run vs float64 reference, relative to the largest reference entry (as for the dense
layer)."""

CONFIGS = {
    # top-2, renormalised, shared experts, balance loss and z-loss in the backward
    "top2-renorm-shared-aux": (MoeShape(8, 2, 16, 16, True, 0.05, 0.01), False),
    # top-3 raw softmax weights, no shared experts, no auxiliary loss
    "top3-raw": (MoeShape(8, 3, 16, 0, False, 0.0, 0.0), False),
    # top-1 where one expert gets every token and the seven others none
    "top1-one-expert": (MoeShape(8, 1, 16, 16, False, 0.05, 0.01), True),
}
ALL_RECOMPUTE = ("top2-renorm-shared-aux", "top1-one-expert")
"""Configs run under every recompute mode (the other runs recompute='none')."""


def lengths(P: int) -> list[int]:
    """Uneven packed sequences: a single token, one shorter than 2P, one not a multiple of 2P."""
    return [1, max(2, 2 * P - 1), 4 * P + 3, 13]


def supported(P: int) -> list[str]:
    return [n for n in STRATEGY_NAMES if get_strategy(n).supports(SHAPE, P)[0]]


def _sum_over_group(t: torch.Tensor, mesh) -> torch.Tensor:
    t = t.detach().double().clone()
    if mesh.sp > 1:
        dist.all_reduce(t, group=mesh.sp_group.pg)
    return t


def _layers(case: MoeCase, mesh) -> list[SwitchableDecoderLayer]:
    out = []
    for i, full in enumerate(case.full):
        layer = SwitchableDecoderLayer(
            SHAPE, mesh.sp_group, moe=case.moe, index=i, random_init=False
        )
        layer.load_full_weights({k: v.float() for k, v in full.items()})
        out.append(layer)
    return out


def _run(case, batch, layers, strategies, recomputes, hook=None):
    """Forward the stack (recorder on), backward sum(y * dy) + auxiliary terms, reduce the
    replicated gradients. Returns x, y and the recorder."""
    recorder = MoeRecorder()
    for layer in layers:
        layer.zero_grad(set_to_none=True)
        layer.mlp.recorder, layer.mlp.hook = recorder, hook
    x = to_local(batch, case.xs).float().requires_grad_()
    recorder.active = True
    h = x
    for layer, strategy, recompute in zip(layers, strategies, recomputes, strict=True):
        h = layer(h, batch, strategy, recompute)
    recorder.active = False
    loss = (h * to_local(batch, case.dys).float()).sum()
    if recorder.losses:
        loss = loss + torch.stack(recorder.losses).sum()
    loss.backward()
    for layer in layers:
        layer.reduce_replicated_grads()
    return x, h, recorder


def _check(case, mesh, batch, x, y, layers, recorder, ref, what):
    real = batch.real_mask()
    assert_close(y[real], to_local(batch, ref["out"])[real], REL, f"{what} output")
    assert_close(x.grad[real], to_local(batch, ref["dx"])[real], REL, f"{what} input grad")
    assert torch.count_nonzero(x.grad[~real]) == 0, f"{what}: padding received gradient"
    for i, layer in enumerate(layers):
        expected = expected_shards(ref["grads"][i], case.moe, mesh.sp, mesh.sp_rank)
        got = layer.shard_tensors(grads=True)
        assert set(got) == set(expected), f"{what}: stored tensors {sorted(got)}"
        params = layer.shard_tensors()
        for name, g in got.items():
            g = torch.zeros_like(params[name]) if g is None else g  # an expert no token chose
            assert_close(g, expected[name], REL, f"{what} layer {i} grad {name}")
        # the loads the layer recorded: pairs per expert over the whole group
        load = _sum_over_group(recorder.load[i], mesh)
        want = sum(m.sum(0) for m in ref["masks"][i]).double()
        assert torch.equal(load, want), f"{what} layer {i}: load {load} != {want}"
    moe = case.moe
    for term, coef in (("aux", moe.aux_loss_coef), ("z", moe.z_loss_coef)):
        store = getattr(recorder, term)
        if coef:
            total = _sum_over_group(torch.tensor(sum(store.values())), mesh)
            assert abs(float(total) - ref[term]) <= REL * abs(ref[term]), (
                f"{what}: {term} loss {float(total)} != reference {ref[term]}"
            )
        else:
            assert not store, f"{what}: {term} loss recorded with coefficient 0"


def layer_case(config: str) -> None:
    """One MoE decoder layer under every supported strategy (and recompute mode) vs the
    reference; recomputation gives bit-identical gradients."""
    moe, skew = CONFIGS[config]
    mesh = mesh_for()
    P = mesh.sp
    case = MoeCase(moe, lengths(P), seed=P, skew=skew)
    ref = case.reference()
    if skew:  # the case is what it claims: expert 0 gets every token, the others none
        load = sum(m.sum(0) for m in ref["masks"][0])
        assert load[0] == sum(case.lens) and load[1:].sum() == 0, f"skewed load {load}"
    batch = case.batch(P, mesh.sp_rank)
    modes = RECOMPUTE_MODES if config in ALL_RECOMPUTE else ("none",)
    for name in supported(P):
        layers = _layers(case, mesh)
        baseline = None
        for recompute in modes:
            what = f"{config} {name} P={P} recompute={recompute}"
            x, y, recorder = _run(case, batch, layers, [name], [recompute])
            _check(case, mesh, batch, x, y, layers, recorder, ref, what)
            grads = [x.grad, *layers[0].shard_tensors(grads=True).values()]
            if baseline is None:
                baseline = grads
                continue
            for got, want in zip(grads, baseline, strict=True):
                same = got is None and want is None or torch.equal(got, want)
                assert same, f"{what}: gradients differ from recompute=none"


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("P", [1, 2, 4], ids=lambda P: f"P{P}")
def test_moe_layer_matches_reference(P: int, config: str) -> None:
    run_distributed(P, layer_case, config, timeout=90)


# ---------------------------------------------------------------- mixed plans


def stack_case() -> None:
    """Three MoE layers, a different strategy and recompute mode per layer and per call: every
    call equals the reference stack, and no parameter's storage or value changes."""
    mesh = mesh_for()
    P = mesh.sp
    names = supported(P)
    moe = CONFIGS["top2-renorm-shared-aux"][0]
    case = MoeCase(moe, lengths(P), seed=40 + P, layers=3)
    ref = case.reference()
    batch = case.batch(P, mesh.sp_rank)
    layers = _layers(case, mesh)
    params = {(i, n): p for i, layer in enumerate(layers) for n, p in layer.named_parameters()}
    storage = {key: p.data_ptr() for key, p in params.items()}
    values = {key: p.detach().clone() for key, p in params.items()}
    for call in range(3):
        plan = [names[(i + call) % len(names)] for i in range(3)]
        modes = [RECOMPUTE_MODES[(i + call) % 3] for i in range(3)]
        x, y, recorder = _run(case, batch, layers, plan, modes)
        _check(case, mesh, batch, x, y, layers, recorder, ref, f"P={P} plan {plan} {modes}")
        for key, p in params.items():
            assert p.data_ptr() == storage[key], f"P={P} plan {plan}: {key} moved"
            assert torch.equal(p.detach(), values[key]), f"P={P} plan {plan}: {key} changed"


@pytest.mark.parametrize("P", [1, 2, 4], ids=lambda P: f"P{P}")
def test_mixed_plans_move_no_parameter(P: int) -> None:
    run_distributed(P, stack_case, timeout=90)


# ---------------------------------------------------------------- router hook

HOOK_MOE = MoeShape(8, 3, 16, 24, True, 0.05, 0.01)
"""H = 2 F_e = 32 and F_s = 24: an expert's matmuls are the only ones with a (32, 32) or a
(16, 32) right operand, at every P and MLP mode."""
BANNED = 5
"""The hook never keeps this expert, so no token chooses it."""


def keep_count(seq: torch.Tensor, pos: torch.Tensor, k: int) -> torch.Tensor:
    """How many of its top-k experts the hook keeps for a token: none for the second sequence
    and every fourth position, top-1 at even positions, top-k elsewhere."""
    kept = torch.where(pos % 2 == 0, 1, k)
    return torch.where((pos % 4 == 3) | (seq == 1), 0, kept)


def make_hook(positions: torch.Tensor):
    """A router hook: top-keep_count experts of each real token, never BANNED, renormalised
    over what it keeps when the layer says so (positions: the local tokens' positions)."""

    def hook(request: RouterRequest) -> Routing:
        k = request.top_k
        weight, expert = request.probs.topk(k, dim=-1)  # (T/P, k)
        limit = keep_count(request.seq_index, positions, k)
        keep = (torch.arange(k)[None] < limit[:, None]) & request.real[:, None]
        keep &= expert != BANNED
        weight = weight * keep
        if request.renormalize:
            total = weight.sum(-1, keepdim=True)
            weight = weight / torch.where(total > 0, total, torch.ones_like(total))
        token, slot = keep.nonzero(as_tuple=True)
        return Routing(token, expert[token, slot], weight[token, slot])

    return hook


class MatmulLog(TorchDispatchMode):
    """Records the shapes (a, b) of every aten.mm a @ b."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default:
            self.calls.append((tuple(args[0].shape), tuple(args[1].shape)))
        return func(*args, **(kwargs or {}))


def _expert_rows(calls, moe: MoeShape) -> tuple[list[int], list[int]]:
    """Rows of the experts' gate/up and down matmuls among logged calls."""
    H, f = SHAPE.hidden, moe.expert_ffn_hidden
    gate_up = sorted(a[0] for a, b in calls if b == (H, 2 * f))
    down = sorted(a[0] for a, b in calls if b == (f, H))
    return gate_up, down


def _moe_mlp(case: MoeCase, P: int, rank: int) -> MoeMLP:
    """The MoE MLP module alone, holding this rank's shards of the case's first layer."""
    mlp = MoeMLP(SHAPE, P, case.moe, dtype=torch.float32, device="cpu")
    shards = expected_shards(case.full[0], case.moe, P, rank)
    with torch.no_grad():
        for key, param in mlp.named_parameters():
            param.copy_(shards[f"mlp_{key}"])
    return mlp


def hook_case() -> None:
    """The MoE MLP alone under every supported strategy, with top-k routing and with the hook:
    both equal the reference (the hook's: the reference masking the same experts); the forward
    matmul FLOPs are exactly router + shared + 6 H F_e per pair this rank's experts receive, so
    the hook saves 6 H F_e per dropped pair, and an expert no token chose runs no matmul."""
    mesh = mesh_for()
    P, rank, moe = mesh.sp, mesh.sp_rank, HOOK_MOE
    H, E, e_local = SHAPE.hidden, moe.experts, moe.experts // mesh.sp
    case = MoeCase(moe, lengths(P), seed=60 + P)
    batch = case.batch(P, rank)
    positions = [torch.arange(n) for n in case.lens]
    keeps = [
        keep_count(torch.full((n,), i), positions[i], moe.top_k) for i, n in enumerate(case.lens)
    ]
    local_positions = batch.layout.positions
    n_local = batch.local_tokens
    fixed_flops = 2 * n_local * H * E + 6 * n_local * H * moe.shared_ffn_hidden
    saved = {}
    for hooked in (False, True):
        ref_moe = ReferenceMoe(moe, case.full[0])
        xs = [x.clone().requires_grad_() for x in case.xs]
        out, aux, z, masks = [], 0.0, 0.0, []
        for i, x in enumerate(xs):
            y, a, zz, mask = ref_moe(x, keeps[i] if hooked else None, BANNED if hooked else None)
            out.append(y)
            aux, z = aux + a, z + zz
            masks.append(mask)
        loss = sum((y * dy).sum() for y, dy in zip(out, case.dys, strict=True)) + aux + z
        loss.backward()
        pairs = sum(m.sum(0) for m in masks)  # (E,) over the whole batch
        if hooked:
            assert pairs[BANNED] == 0 and 0 < pairs.sum() < moe.top_k * sum(case.lens)
        else:
            assert pairs.sum() == moe.top_k * sum(case.lens)
        mine = pairs[rank * e_local : (rank + 1) * e_local].tolist()
        expected = expected_shards(ref_moe.grads(), moe, P, rank)
        for name in supported(P):
            what = f"hook={hooked} {name} P={P}"
            mlp = _moe_mlp(case, P, rank)
            mlp.recorder = MoeRecorder(active=True)
            mlp.hook = make_hook(local_positions) if hooked else None
            x = to_local(batch, case.xs).float().requires_grad_()
            weights = mlp.weights(batch)
            with FlopCounterMode(display=False) as flops, MatmulLog() as log:
                y = get_strategy(name).mlp(x, weights, mesh.sp_group, kind=mlp.kind)
            mlp.recorder.active = False
            gate_up, down = _expert_rows(log.calls, moe)
            want_rows = sorted(int(c) for c in mine if c)
            assert gate_up == want_rows and down == want_rows, (
                f"{what}: expert matmul rows {gate_up}, {down}; pairs on this rank's experts {mine}"
            )
            assert all(a[0] and b[1] for a, b in log.calls), f"{what}: an empty matmul ran"
            total = flops.get_total_flops()
            want = fixed_flops + 6 * H * moe.expert_ffn_hidden * sum(mine)
            assert total == want, f"{what}: forward FLOPs {total} != {want}"
            saved.setdefault(name, []).append(total)
            loss = (y * to_local(batch, case.dys).float()).sum()
            loss = loss + torch.stack(mlp.recorder.losses).sum()
            with MatmulLog() as back:
                loss.backward()
            assert all(min(*a, *b) for a, b in back.calls), f"{what}: an empty matmul in backward"
            if P > 1:
                dist.all_reduce(mlp.router.grad, group=mesh.sp_group.pg)
            real = batch.real_mask()
            assert_close(y[real], to_local(batch, out)[real].detach(), REL, f"{what} output")
            dx = to_local(batch, [x.grad for x in xs])
            assert_close(x.grad[real], dx[real], REL, f"{what} input grad")
            load = _sum_over_group(mlp.recorder.load[0], mesh)
            assert torch.equal(load, pairs.double()), f"{what}: load {load} != {pairs}"
            for term, value in (("aux", aux), ("z", z)):
                total = _sum_over_group(
                    torch.tensor(sum(getattr(mlp.recorder, term).values())), mesh
                )
                assert abs(float(total - value.detach())) <= REL * abs(float(value)), (
                    f"{what}: {term} loss {float(total)} != reference {float(value)}"
                )
            for key, want_grad in expected.items():
                got = getattr(mlp, key.removeprefix("mlp_")).grad
                got = torch.zeros_like(want_grad) if got is None else got
                assert_close(got, want_grad, REL, f"{what} grad {key}")
        if not hooked:
            default_pairs = pairs
    # over the group, the hook saves exactly 6 H F_e per dropped pair
    dropped = int(default_pairs.sum() - pairs.sum())
    for name, (plain, hooked_flops) in saved.items():
        diff = _sum_over_group(torch.tensor(plain - hooked_flops), mesh)
        want = 6 * H * moe.expert_ffn_hidden * dropped
        assert int(diff) == want, f"{name} P={P}: hook saved {int(diff)} FLOPs, not {want}"


@pytest.mark.parametrize("P", [1, 2, 4], ids=lambda P: f"P{P}")
def test_router_hook_skips_dropped_pairs(P: int) -> None:
    run_distributed(P, hook_case, timeout=90)


def idle_rank_case() -> None:
    """Every pair on expert 0, frozen router, an input without gradient: the ranks whose experts
    get no row must still take part in the backward (the experts' gradients need it), under
    every strategy; expert 0's gradient equals the reference's, every other expert's is 0."""
    mesh = mesh_for()
    P, rank = mesh.sp, mesh.sp_rank
    moe = CONFIGS["top3-raw"][0]
    case = MoeCase(moe, lengths(P), seed=80 + P)
    batch = case.batch(P, rank)
    ref = ReferenceMoe(moe, case.full[0])
    x_all = torch.cat(case.xs)
    y = swiglu_expert(x_all, *ref._expert(0))  # weight 1 on expert 0
    (y * torch.cat(case.dys)).sum().backward()
    whole = {k: torch.zeros_like(p) if p.grad is None else p.grad for k, p in ref.weights.items()}
    expected = expected_shards(whole, moe, P, rank)
    for name in supported(P):
        mlp = _moe_mlp(case, P, rank)
        mlp.router.requires_grad_(False)

        def hook(request: RouterRequest) -> Routing:
            token = request.real.nonzero().squeeze(1)
            return Routing(token, torch.zeros_like(token), torch.ones(len(token)))

        mlp.hook = hook
        x = to_local(batch, case.xs).float()
        y = get_strategy(name).mlp(x, mlp.weights(batch), mesh.sp_group, kind=mlp.kind)
        (y * to_local(batch, case.dys).float()).sum().backward()
        for key in ("experts_gate_up", "experts_down"):
            got = getattr(mlp, key).grad
            got = torch.zeros_like(expected[f"mlp_{key}"]) if got is None else got
            assert_close(got, expected[f"mlp_{key}"], REL, f"{name} P={P} grad {key}")


@pytest.mark.parametrize("P", [1, 2, 4], ids=lambda P: f"P{P}")
def test_ranks_without_rows_join_the_backward(P: int) -> None:
    run_distributed(P, idle_rank_case, timeout=90)


# ---------------------------------------------------------------- bad configs
