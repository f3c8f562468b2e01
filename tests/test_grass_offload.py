"""GRASS's optimizer-state offload: only the drawn layers' AdamW state (and the always-trained
parts') is held by the optimizer, measured by walking the state tensors, over 100 switches with
no growth; parking and restoring changes no number; a checkpoint keeps parked state."""

from __future__ import annotations

import pytest
import torch

from paradyse import Trainer, load_config

from .layer_cases import mesh_for

TINY = ["model.hidden=64", "model.heads=4", "model.kv_heads=2", "model.head_dim=16",
        "model.ffn_hidden=128", "model.layers=6", "data.source=synthetic", "data.documents=64",
        "data.tokens_per_step=256", "data.max_seq_len=64", "data.tokens_per_rank=256",
        "parallel.profile=", "train.progress=false", "train.measure_memory=false"]  # fmt: skip


def _trainer(*extra: str) -> Trainer:
    config = load_config(None, [*TINY, *extra])
    return Trainer(config, mesh=mesh_for(1), log=lambda *_: None)


def _held(trainer: Trainer) -> dict[str | int, int]:
    """Bytes of AdamW state each unit's optimizer holds (by layer index; 'rest' for the others)."""
    engine = trainer.engine
    return {("rest" if owner is None else owner): opt.state_bytes()[0]
            for owner, opt in zip(engine.unit_layers, engine.optimizers, strict=True)}  # fmt: skip


def test_only_the_drawn_layers_state_is_held_over_100_switches() -> None:
    grass = ["integrations.grass.gamma=2", "integrations.grass.period=1",
             "integrations.grass.probe_steps=1", "train.steps=101"]  # fmt: skip
    trainer = _trainer(*grass)
    wrapper = trainer.integrations["grass"].optimizer_wrapper
    engine = trainer.engine
    per_layer = {}  # a layer's full AdamW state (two float32 moments and a step per piece)
    totals = []
    for _ in range(101):
        trainer.train_step()
        held = _held(trainer)
        if engine.step_index == 1:  # the probing step: nothing stepped, nothing held
            assert sum(held.values()) == 0
            continue
        drawn = set(wrapper.current)
        for owner, opt in zip(engine.unit_layers, engine.optimizers, strict=True):
            on_device, parked = opt.state_bytes()
            if owner is None:
                assert on_device > 0 and parked == 0  # the embedding, head and norm train always
            elif owner in drawn:
                assert on_device > 0 and parked == 0
                per_layer[owner] = on_device
            else:
                assert on_device == 0  # frozen: none on the device (parked if it ever trained)
        body = sum(v for k, v in held.items() if k != "rest")
        assert body == sum(per_layer[i] for i in drawn)
        totals.append(sum(held.values()))
    assert len(wrapper.history) == 100  # a new draw every step after probing: 100 switches
    assert max(totals) == min(totals)  # the held state does not grow


def test_parking_changes_no_number() -> None:
    runs = {}
    for offload in ("true", "false"):
        trainer = _trainer("integrations.grass.gamma=2", "integrations.grass.period=2",
                           f"integrations.grass.offload={offload}", "train.steps=8")  # fmt: skip
        runs[offload] = [r["loss"] for r in trainer.run()]
        if offload == "true":
            assert any(opt.host for opt in trainer.engine.optimizers)
    assert runs["true"] == runs["false"]


def test_a_checkpoint_keeps_parked_state(tmp_path) -> None:
    extra = ["integrations.grass.gamma=1", "integrations.grass.period=1",
             "integrations.grass.probe_steps=1"]  # fmt: skip
    straight = [r["loss"] for r in _trainer(*extra, "train.steps=6").run()]
    first = _trainer(*extra, "train.steps=3", f"train.save={tmp_path}")
    head = [r["loss"] for r in first.run()]
    assert any(opt.host for opt in first.engine.optimizers)  # something was parked when saved
    resumed = _trainer(*extra, "train.steps=6", f"train.resume={tmp_path}")
    tail = [r["loss"] for r in resumed.run()]
    assert head + tail == pytest.approx(straight, rel=1e-6)
    assert torch.is_grad_enabled()
