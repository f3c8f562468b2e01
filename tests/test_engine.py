"""The engine and trainer end to end: the per-step losses of 5 float32 steps on the default corpus
agree within 1e-5 relative between the single-process `local` run, every static strategy at
sp = 4, adaptive at sp = 4 and dp = 2 x sp = 2 (with and without ZeRO-1); the layer-hook and
optimizer-wrapper seams; bf16 compute."""

from __future__ import annotations

import pytest
import torch

import paradyse
from paradyse import LayerHooks, OptimizerWrapper, Trainer, load_config
from parallel_lib import STRATEGY_NAMES, get_strategy

from .harness import run_distributed
from .layer_cases import mesh_for

STEPS = 5
TINY = [
    "model.hidden=64", "model.heads=4", "model.kv_heads=4", "model.head_dim=16",
    "model.ffn_hidden=128", "model.layers=3", "data.tokens_per_step=2048",
    "data.max_seq_len=1024", "data.tokens_per_rank=256", "train.measure_memory=false",
    "train.progress=false", "parallel.profile=", f"train.steps={STEPS}", "optim.lr=3e-3",
]  # fmt: skip
"""A tiny model on the default corpus; micro-batches of 256 tokens per rank, so every step
accumulates several micro-batches (more of them at sp = 1 than at sp = 4)."""


def _config(*extra: str):
    return load_config(None, [*TINY, *extra])


def _losses(sp: int, *extra: str, plans: list | None = None) -> list[float]:
    trainer = Trainer(_config(*extra), mesh=mesh_for(sp), log=lambda *_: None)
    records = trainer.run()
    if plans is not None:
        plans += [r["plan"] for r in records]
    return [r["loss"] for r in records]


def _all_runs() -> dict[str, list[float]]:
    """Every sp = 4 run and the dp = 2 x sp = 2 runs, on each of 4 ranks."""
    shape = _config().model.shape
    runs = {}
    for name in STRATEGY_NAMES:
        if get_strategy(name).supports(shape, 4)[0]:
            runs[name] = _losses(4, f"parallel.strategy={name}")
    runs["adaptive"] = _losses(4)
    runs["dp2xsp2"] = _losses(2)
    runs["dp2xsp2 zero1"] = _losses(2, "optim.shard_optimizer=true", "parallel.strategy=ring")
    return runs


@pytest.fixture(scope="module")
def local_losses() -> list[float]:
    return _losses(1, "parallel.strategy=local")


def test_losses_agree_across_strategies_and_meshes(local_losses) -> None:
    assert len(local_losses) == STEPS
    assert local_losses[-1] < local_losses[0]  # it trains
    per_rank = run_distributed(4, _all_runs, timeout=600)
    assert all(r == per_rank[0] for r in per_rank[1:])  # every rank logs the global loss
    assert {"tp_sp", "ulysses", "ring", "usp", "metp", "adaptive", "dp2xsp2"} <= set(per_rank[0])
    for name, losses in per_rank[0].items():
        for step, (got, want) in enumerate(zip(losses, local_losses, strict=True)):
            assert abs(got - want) <= 1e-5 * abs(want), (name, step, got, want)


SHORT = ("data.max_seq_len=96",)
"""Documents cut to 96 tokens: every micro-batch holds enough sequences for sub-groups."""


def _group_runs() -> dict[str, tuple[list[float], list[str]]]:
    runs = {}
    for sp, g in ((4, 1), (4, 2), (4, 0), (2, 1)):  # g = 0: the planner chooses
        plans: list[str] = []
        losses = _losses(sp, *SHORT, f"parallel.group_size={g}", plans=plans)
        runs[f"dp{4 // sp}xsp{sp} g{g}"] = (losses, plans)
    return runs


def test_sub_groups_train_like_one_process() -> None:
    """Loss parity with one process when every micro-batch runs as sub-groups of 1 or 2 ranks
    (forced), when the planner chooses the group size, and with dp 2 x sp 2 on sub-groups of
    one rank: the group size changes who computes what, never the result."""
    reference = _losses(1, *SHORT, "parallel.strategy=local")
    per_rank = run_distributed(4, _group_runs, timeout=600)
    for runs in per_rank[1:]:  # plans differ between dp groups (their data does), losses not
        assert {k: v[0] for k, v in runs.items()} == {k: v[0] for k, v in per_rank[0].items()}
    for name, (losses, plans) in per_rank[0].items():
        forced = name.split(" g")[1]
        if forced != "0":
            assert any(f"g{forced}:" in p for p in plans), (name, plans)
        for step, (got, want) in enumerate(zip(losses, reference, strict=True)):
            assert abs(got - want) <= 1e-5 * abs(want), (name, step, got, want)


def _idle_runs() -> tuple[list[float], list[str], int]:
    """sp = 4 forced onto sub-groups of one rank with documents up to 1,024 tokens: micro-batches
    of 256 tokens per rank often hold fewer than 4 sequences, and the ranks dealt none train the
    engine's one idle token."""
    idle = []
    pack = paradyse.Engine.pack

    def counting(self, sequences, group_size):
        batch = pack(self, sequences, group_size)
        idle.append(batch.seq_lens == (1,) and bool((batch.labels < 0).all()))
        return batch

    paradyse.Engine.pack = counting
    try:
        plans: list[str] = []
        return _losses(4, "parallel.group_size=1", plans=plans), plans, sum(idle)
    finally:
        paradyse.Engine.pack = pack


def test_idle_sub_groups_train_like_one_process(local_losses) -> None:
    """Fewer sequences than sub-groups: the idle ranks' token changes neither loss nor gradients
    (the losses of the 5 steps depend on every earlier gradient)."""
    per_rank = run_distributed(4, _idle_runs, timeout=600)
    assert sum(idle for _, _, idle in per_rank) > 0  # some micro-batch left a rank idle
    losses, plans, _ = per_rank[0]
    assert all(p.startswith("g1:local") for p in plans), plans
    for step, (got, want) in enumerate(zip(losses, local_losses, strict=True)):
        assert abs(got - want) <= 1e-5 * abs(want), (step, got, want)


def test_bfloat16_compute_trains_close_to_float32(local_losses) -> None:
    losses = _losses(1, "parallel.strategy=local", "train.dtype=bfloat16")
    for got, want in zip(losses, local_losses, strict=True):
        assert abs(got - want) <= 2e-2 * abs(want)


# --------------------------------------------------------------------------- seams


class Recorder(LayerHooks):
    """Records the calls and sums the gradients after_backward sees; skips layer `skip`."""

    def __init__(self, skip: int | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.skip = skip

    def before_forward(self, index, x, batch):
        self.calls.append(("before", index))
        self.inputs = getattr(self, "inputs", {})
        self.inputs[index] = x

    def after_forward(self, index, y, batch):
        self.calls.append(("after", index))
        return self.inputs[index] if index == self.skip else None

    def after_backward(self, index, grads):
        self.calls.append(("backward", index))
        mine = self.grads.setdefault(index, {})
        for name, g in grads.items():
            mine[name] = mine.get(name, 0) + g.detach().clone()


def _hooked(skip: int | None) -> dict:
    mesh = mesh_for(2)
    hook = Recorder(skip)
    trainer = Trainer(_config(), mesh=mesh, hooks=[hook], log=lambda *_: None)
    engine = trainer.engine
    sequences, lens, _ = trainer.next_step()
    loss_tokens = sum(n - 1 for n in lens)
    losses = [engine.forward_backward(mb, loss_tokens).loss_sum for mb in sequences]
    grads = {i: {n: p.grad.clone() for n, p in layer.named_parameters()}
             for i, layer in enumerate(engine.layers)}  # fmt: skip
    return {"calls": hook.calls, "seen": hook.grads, "grads": grads, "loss": sum(losses),
            "micro_batches": len(sequences)}  # fmt: skip


def _skipping_reference(skip: int) -> float:
    """This rank's loss of the first step's micro-batches with layer `skip` left out, by hand."""
    mesh = mesh_for(2)
    trainer = Trainer(_config(), mesh=mesh, log=lambda *_: None)
    model = trainer.model
    sequences, _, _ = trainer.next_step()
    total = 0.0
    with torch.no_grad():
        for mb in sequences:
            batch = paradyse.PackedBatch.pack(mb, mesh.sp, mesh.sp_rank)
            plan = trainer.planner.plan(batch.seq_lens)
            trainer.engine.apply(plan)
            x = model.embedding(batch.input_ids)
            for i, layer in enumerate(model.layers):
                x = x if i == skip else layer(x, batch)
            total += float(paradyse.token_loss_sum(model.head(model.norm(x)), batch))
    return total


def test_layer_hooks_see_every_layer_and_its_gradients() -> None:
    for rank in run_distributed(2, _hooked, None):
        layers = len(rank["grads"])
        per_mb = [c for c in rank["calls"] if c[0] != "backward"]
        expected = [(kind, i) for i in range(layers) for kind in ("before", "after")]
        assert per_mb == expected * rank["micro_batches"]
        backward = [i for kind, i in rank["calls"] if kind == "backward"]
        assert backward == list(reversed(range(layers))) * rank["micro_batches"]
        for i, grads in rank["grads"].items():  # the hook's sums are the accumulated .grad
            for name, g in grads.items():
                torch.testing.assert_close(rank["seen"][i][name], g, rtol=1e-6, atol=1e-9)


def test_after_forward_can_replace_a_layer_output() -> None:
    hooked = run_distributed(2, _hooked, 1)
    by_hand = run_distributed(2, _skipping_reference, 1)
    for got, want in zip(hooked, by_hand, strict=True):
        assert abs(got["loss"] - want) <= 1e-5 * abs(want)
        assert not got["grads"][1]["attn_qkv"].any()  # the skipped layer got no gradient


class FreezeFirst(OptimizerWrapper):
    """Layer 0 trains only from step 2 on; frozen layers keep their optimizer state on 'cpu'."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, bool]] = []

    def trainable_layers(self, step, layers):
        return range(1, layers) if step < 2 else None

    def state_device(self, index, trainable):
        self.asked.append((index, trainable))
        return None if trainable else "cpu"


def _frozen_run() -> dict:
    wrapper = FreezeFirst()
    config = _config("train.steps=3", "train.measure_memory=true")  # the tracker sees frozen
    trainer = Trainer(config, mesh=mesh_for(2), optimizer_wrapper=wrapper, log=lambda *_: None)
    layers = trainer.engine.layers
    snapshots = [[p.detach().clone() for p in layer.parameters()] for layer in layers]
    history, peaks = [], []
    for _ in range(3):
        peaks.append(trainer.train_step()["peak_bytes"])
        history.append([[p.detach().clone() for p in layer.parameters()] for layer in layers])
    state = [len(o.optimizer.state) for o in trainer.engine.optimizers]
    return {"before": snapshots, "history": history, "asked": wrapper.asked, "state": state,
            "peaks": peaks}  # fmt: skip


def test_optimizer_wrapper_freezes_layers_and_places_state() -> None:
    for rank in run_distributed(2, _frozen_run):
        before, history = rank["before"], rank["history"]
        for step in (0, 1):  # layer 0 frozen: bitwise unchanged; layer 1 moves
            assert all(torch.equal(a, b) for a, b in zip(history[step][0], before[0], strict=True))
            assert not all(torch.equal(a, b) for a, b in zip(history[step][1], before[1],
                                                              strict=True))  # fmt: skip
        assert not all(torch.equal(a, b) for a, b in zip(history[2][0], before[0], strict=True))
        assert (0, False) in rank["asked"] and (0, True) in rank["asked"]
        assert all(n > 0 for n in rank["state"])  # layer 0's AdamW state exists after step 2
        assert all(p and p > 0 for p in rank["peaks"])  # measured, frozen parameters and all


class Poison(LayerHooks):
    """Turns layer 0's output into NaN in the first micro-batch of step 0 only."""

    def __init__(self) -> None:
        self.done = False

    def after_forward(self, index, y, batch):
        if index == 0 and not self.done:
            self.done = True
            return y * float("nan")
        return None


def _poisoned() -> dict:
    trainer = Trainer(_config("train.steps=2"), mesh=mesh_for(2), hooks=[Poison()],
                      log=lambda *_: None)  # fmt: skip
    before = [p.detach().clone() for p in trainer.model.parameters()]
    first = trainer.train_step()
    same = all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    second = trainer.train_step()
    return {"first": first, "unchanged": same, "second": second}


def test_a_step_with_non_finite_gradients_is_skipped() -> None:
    for rank in run_distributed(2, _poisoned):
        assert rank["first"]["skipped"] and rank["unchanged"]
        assert not rank["second"]["skipped"]
        assert torch.isfinite(torch.tensor(rank["second"]["loss"]))


class RankDependent(OptimizerWrapper):
    def trainable_layers(self, step, layers):
        return [int(torch.distributed.get_rank()) % layers]


def _disagreeing() -> str:
    trainer = Trainer(_config(), mesh=mesh_for(2), optimizer_wrapper=RankDependent(),
                      log=lambda *_: None)  # fmt: skip
    try:
        trainer.train_step()
    except RuntimeError as error:
        return str(error)
    return ""


def test_wrappers_that_disagree_across_ranks_fail_clearly() -> None:
    for message in run_distributed(2, _disagreeing):
        assert "different trainable layers on different ranks" in message
