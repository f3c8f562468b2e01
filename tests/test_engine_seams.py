"""The seams integrations stand on: every layer's global gradient norm in `StepResult` (against
an independent computation from gathered whole gradients), an integration turned on from TOML
alone that trains, saves and resumes like an uninterrupted run, and the one-line errors of a
bad [integrations] table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from paradyse import ConfigError, LayerHooks, OptimizerWrapper, Trainer, is_sharded, load_config
from parallel_lib import all_gather_dim0

from .harness import REPO_ROOT, run_distributed
from .layer_cases import mesh_for
from .test_engine import TINY


class SumGrads(LayerHooks):
    """This rank's gradient of the step per layer and parameter (summed over micro-batches)."""

    def __init__(self) -> None:
        self.grads: dict[int, dict[str, torch.Tensor]] = {}

    def after_backward(self, index, grads) -> None:
        mine = self.grads.setdefault(index, {})
        for name, g in grads.items():
            mine[name] = mine[name] + g if name in mine else g.detach().clone()


def _norms(sp: int, *extra: str) -> tuple[list, list]:
    mesh = mesh_for(sp)
    hooks = SumGrads()
    trainer = Trainer(load_config(None, [*TINY, "train.steps=2", *extra]), mesh=mesh,
                      hooks=[hooks], log=lambda *_: None)  # fmt: skip
    trainer.train_step()
    hooks.grads.clear()
    record = trainer.train_step()  # a step with optimizer state and a warmed-up schedule
    independent = []
    for index, layer in enumerate(trainer.model.switchable_layers()):
        square = 0.0
        for name, p in layer.named_parameters():
            g = hooks.grads[index][name].clone()
            if is_sharded(p):  # complete on this rank's dp copy: sum over dp, gather over sp
                if mesh.dp > 1:
                    dist.all_reduce(g, group=mesh.dp_group.pg)
                whole = all_gather_dim0(g, mesh.sp_group)
            else:  # replicated: every rank's tokens contribute
                dist.all_reduce(g)
                whole = g
            square += float(whole.double().square().sum())
        independent.append(math.sqrt(square))
    return record["layer_grad_norms"], independent


@pytest.mark.parametrize(
    ("sp", "extra"),
    [(4, ()), (2, ()), (2, ("optim.shard_optimizer=true",))],
    ids=["sp4", "dp2xsp2", "dp2xsp2-zero1"],
)
def test_layer_gradient_norms_equal_gathered_whole_gradients(sp: int, extra: tuple) -> None:
    for got, want in run_distributed(4, _norms, sp, *extra):
        assert len(got) == len(want) == 3
        for g, w in zip(got, want, strict=True):
            assert w > 0 and abs(g - w) <= 1e-6 * w, (got, want)


# ---------------------------------------------------------------- integrations from TOML
SAMPLED = """
[model]
hidden = 64
heads = 4
kv_heads = 4
head_dim = 16
ffn_hidden = 128
layers = 4

[data]
tokens_per_step = 2048
max_seq_len = 1024
tokens_per_rank = 512

[optim]
lr = 3e-3

[train]
steps = 6
measure_memory = false
progress = false

[parallel]
profile = ""

[integrations.layer_sampling]
count = 2      # layers trained at a time
period = 3     # steps between draws
offload = true # frozen layers' AdamW moments on the CPU
# seed = -1    # the draws' seed; -1: train.seed
"""


def _train(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}
    env.pop("WORLD_SIZE", None)
    launcher = [sys.executable, "-m", "paradyse.train"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", str(nproc), "-m", "paradyse.train"]  # fmt: skip
    return subprocess.run([*launcher, *args], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=300)  # fmt: skip


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_integration_from_toml_trains_saves_and_resumes(tmp_path) -> None:
    config = tmp_path / "sampled.toml"
    config.write_text(SAMPLED)
    straight, first, ckpt = tmp_path / "straight.jsonl", tmp_path / "first.jsonl", tmp_path / "c"
    run = _train("--config", str(config), "--metrics", str(straight))
    assert run.returncode == 0, run.stderr
    run = _train("--config", str(config), "--steps", "6", "--set", "train.save_every=3",
                 "--save", str(ckpt), "--metrics", str(first), nproc=2)  # fmt: skip
    assert run.returncode == 0, run.stderr
    (ckpt / "latest").write_text("step-00000003\n")  # as if the job had stopped after step 3
    resumed = tmp_path / "resumed.jsonl"
    run = _train("--config", str(config), "--resume", str(ckpt), "--metrics", str(resumed))
    assert run.returncode == 0, run.stderr
    want = _records(straight)
    got = _records(first)[:3] + _records(resumed)
    assert [r["step"] for r in got] == list(range(6))
    for g, w in zip(got, want, strict=True):
        assert abs(g["loss"] - w["loss"]) <= 1e-5 * abs(w["loss"]), (g["step"], g, w)
        trained = [i for i, n in enumerate(w["layer_grad_norms"]) if n is not None]
        assert len(trained) == 2  # two sampled layers per step; the others frozen
        assert [i for i, n in enumerate(g["layer_grad_norms"]) if n is not None] == trained
    periods = {tuple(i for i, n in enumerate(r["layer_grad_norms"]) if n is not None)
               for r in want}  # fmt: skip
    assert len(periods) > 1  # the sample changes between periods


def test_a_bad_integrations_table_is_one_clear_line(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"unknown integration \[integrations.grass_v9\]"):
        load_config(None, ["integrations.grass_v9.gamma=2"])
    with pytest.raises(ConfigError, match=r"unknown option integrations.layer_sampling.gamma; "):
        load_config(None, ["integrations.layer_sampling.gamma=2"])
    with pytest.raises(ConfigError, match=r"integrations.layer_sampling.count must be int"):
        load_config(None, ["integrations.layer_sampling.count=two"])
    with pytest.raises(ConfigError, match="count must be at least 1"):
        load_config(None, ["integrations.layer_sampling.count=0"])
    config = tmp_path / "bad.toml"
    config.write_text(SAMPLED.replace("count = 2 ", "count = 9 "))
    run = _train("--config", str(config), "--steps", "1")
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "count 9 exceeds the model's 4 layers" in lines[0], run.stderr


class AllThenFirst(OptimizerWrapper):
    """Every layer trains in step 0, only layer 0 afterwards; frozen state parked or kept."""

    def __init__(self, park: bool) -> None:
        self.park = park

    def trainable_layers(self, step, layers):
        return None if step == 0 else [0]

    def state_device(self, index, trainable):
        return "cpu" if self.park and not trainable else None


@pytest.mark.parametrize("park", [True, False])
def test_the_engine_tells_the_planner_its_frozen_and_offloaded_layers(park) -> None:
    """Frozen layers are priced as frozen and their freed gradient buffers leave the static
    memory; so does optimizer state parked in host memory (and a frozen layer's that was never
    made), while state a frozen layer keeps on the device stays counted."""
    trainer = Trainer(load_config(None, [*TINY, "train.steps=3"]), mesh=mesh_for(1),
                      optimizer_wrapper=AllThenFirst(park), log=lambda *_: None)  # fmt: skip
    planner, static = trainer.planner, trainer.setup.static
    trainer.train_step()
    assert planner.frozen == frozenset() and planner.offloaded == frozenset()
    trainer.train_step()  # step 1: frozen layers still hold their state (parked at its end)
    assert planner.frozen == {1, 2} and planner.offloaded == frozenset()
    record = trainer.train_step()
    assert planner.frozen == {1, 2}
    assert planner.offloaded == ({1, 2} if park else frozenset())
    away = 2 * static.layer_gradients + (2 * static.layer_moments if park else 0)
    assert planner.step_static_bytes == planner.static_bytes - away > 0
    held = [opt.state_bytes() for opt in trainer.engine.optimizers]
    assert all((on == 0) == (park and i in (1, 2)) for i, (on, _) in enumerate(held))
    assert record["layer_grad_norms"][1:] == [None, None] and record["layer_grad_norms"][0] > 0
    assert record["optimizer_state_bytes"] == sum(on for on, _ in held)
    moments = static.layer_moments
    lens = record["micro_batches"][0]["seq_lens"]
    fresh = trainer.setup.planner(hysteresis=0.0)  # the device's memory: room for any plan
    fresh.set_step(frozen=[1, 2])
    kept = fresh.plan(lens)
    fresh.set_step(frozen=[1, 2], offloaded=[1, 2])
    away = fresh.plan(lens)
    assert away.options == kept.options
    assert kept.predicted_peak_bytes - away.predicted_peak_bytes == 2 * moments
