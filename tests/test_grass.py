"""GRASS (integrations.grass) on the engine's seams: gamma = all layers is plain training, frozen
layers stay bitwise frozen, every rank draws the same sets, the draws follow softmax(MGN / tau)
(a chi-square test), the MGN is the same over sp and dp as in one process and as computed from the
gradients, probing steps update nothing, a resumed run is the uninterrupted one, bad options are
one line and exit 2, and reset_state drops (or keeps) a leaving layer's optimizer state."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import paradyse.train
from integrations.grass import Grass, Options, sampling_probabilities
from paradyse import Trainer, load_config
from paradyse.trainer import EXIT_USAGE

from .harness import run_distributed
from .layer_cases import mesh_for
from .test_engine_seams import SumGrads

LAYERS = 4
BASE = [
    "model.hidden=64", "model.heads=4", "model.kv_heads=2", "model.head_dim=16",
    "model.ffn_hidden=128", f"model.layers={LAYERS}", "data.source=synthetic",
    "data.tokens_per_step=512", "data.max_seq_len=256", "data.tokens_per_rank=128",
    "train.measure_memory=false", "train.progress=false", "parallel.profile=", "optim.lr=3e-3",
]  # fmt: skip
"""A 4-layer tiny model on synthetic documents; several micro-batches a step at sp = 1."""


def grass_options(**options) -> list[str]:
    return [f"integrations.grass.{key}={value}" for key, value in options.items()]


def _trainer(sp: int, *extra: str, hooks=()) -> Trainer:
    config = load_config(None, [*BASE, *extra])
    return Trainer(config, mesh=mesh_for(sp), hooks=list(hooks), log=lambda *_: None,
                   warn=lambda *_: None)  # fmt: skip


def _grass(trainer: Trainer) -> Grass:
    return trainer.integrations["grass"].optimizer_wrapper


def _losses(sp: int, *extra: str) -> list[float]:
    return [r["loss"] for r in _trainer(sp, *extra).run()]


def _close(got: list[float], want: list[float], rel: float = 1e-6) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert abs(g - w) <= rel * abs(w), (got, want)


# ---------------------------------------------------------------- 1. gamma = all is plain training
ALL_LAYERS = grass_options(gamma=LAYERS, probe_steps=0, period=2, offload="false")


def _plain_and_grass(sp: int) -> dict[str, list[float]]:
    steps = "train.steps=5"  # the third window starts at step 4
    return {"plain": _losses(sp, steps), "all": _losses(sp, steps, *ALL_LAYERS)}


@pytest.mark.parametrize("sp", [1, 2])
def test_gamma_all_layers_is_plain_training(sp: int) -> None:
    runs = _plain_and_grass(1) if sp == 1 else run_distributed(2, _plain_and_grass, 2)[0]
    _close(runs["all"], runs["plain"])
    assert len(set(runs["plain"])) > 1  # the model trains


def test_full_mode_is_plain_training() -> None:
    steps = "train.steps=5"
    _close(_losses(1, steps, *grass_options(mode="full")), _losses(1, steps))


def test_offload_changes_no_loss() -> None:
    common = ["train.steps=7", *grass_options(gamma=2, probe_steps=1, period=2)]
    _close(_losses(1, *common, "integrations.grass.offload=true"),
           _losses(1, *common, "integrations.grass.offload=false"))  # fmt: skip


# ---------------------------------------------------------------- 2. frozen layers, same draws
def _frozen_run(sp: int) -> dict:
    trainer = _trainer(sp, "train.steps=6", *grass_options(gamma=2, probe_steps=1, period=2))
    grass, layers = _grass(trainer), trainer.model.switchable_layers()
    changed, unchanged_frozen = set(), 0
    for _ in range(6):
        before = [{k: t.detach().clone() for k, t in layer.shard_tensors().items()}
                  for layer in layers]  # fmt: skip
        trainer.train_step()
        for i, layer in enumerate(layers):
            same = all(torch.equal(before[i][k], t) for k, t in layer.shard_tensors().items())
            if trainer.engine.step_index > grass.probe_steps and i not in grass.current:
                assert same, f"step {trainer.engine.step_index - 1}: frozen layer {i} changed"
                unchanged_frozen += 1
            elif not same:
                changed.add(i)
    return {"history": grass.history, "changed": changed, "frozen_checked": unchanged_frozen}


def test_frozen_layers_are_bitwise_unchanged_and_every_rank_draws_the_same() -> None:
    ranks = run_distributed(4, _frozen_run, 2)  # dp = 2 x sp = 2
    history = ranks[0]["history"]
    assert len(history) == 3 and all(len(s) == 2 for s in history)
    assert len({tuple(s) for s in history}) > 1  # the draws change between windows
    for rank in ranks:
        assert rank["history"] == history
        assert rank["frozen_checked"] == 5 * 2  # 5 training steps, 2 frozen layers each
        assert rank["changed"] == {i for s in history for i in s}  # drawn layers do train


# ---------------------------------------------------------------- 3. sampling
CHI2_P001 = {3: 16.266, 4: 18.467, 5: 20.515, 7: 24.322}
"""Chi-square critical values at p = 0.001 by degrees of freedom (standard tables)."""


def _draw_frequencies(values, draws: int, **options) -> tuple[np.ndarray, np.ndarray]:
    """`draws` draws of one layer by the wrapper, its MGN held at `values`: (counts, p)."""
    opts = Options(gamma=1, probe_steps=0, period=1, **options)
    grass = Grass(opts, [1000] * len(values), seed=1234)
    grass.mgn.values = np.asarray(values, dtype=np.float64)
    counts = np.zeros(len(values), dtype=np.int64)
    for step in range(draws):
        (layer,) = grass.trainable_layers(step, len(values))
        counts[layer] += 1
    return counts, grass.probabilities()


@pytest.mark.parametrize(
    "options",
    [{}, {"tau": 0.5}, {"relative_tau": False, "tau": 0.7}, {"min_prob": 0.05, "tau": 0.2}],
    ids=["tau1", "tau0.5", "absolute", "floor"],
)
def test_draw_frequencies_match_the_softmax_by_chi_square(options: dict) -> None:
    values = [0.4, 0.8, 1.0, 1.3, 1.9, 2.5]
    draws = 10_000
    counts, p = _draw_frequencies(values, draws, **options)
    floor = options.get("min_prob", 0.0)
    want = sampling_probabilities(values, options.get("tau", 1.0), floor=floor,
                                  relative=options.get("relative_tau", True))  # fmt: skip
    np.testing.assert_allclose(p, want, rtol=0, atol=0)  # the wrapper's own probabilities
    expected = draws * p
    assert expected.min() >= 5  # the chi-square approximation holds
    statistic = float(((counts - expected) ** 2 / expected).sum())
    assert statistic < CHI2_P001[len(values) - 1], (counts.tolist(), expected.tolist())


def test_probabilities_are_the_softmax_with_its_floor() -> None:
    m = np.array([0.3, 1.0, 2.0, 7.5])
    absolute = sampling_probabilities(m, 0.8, relative=False)
    softmax = np.exp(m / 0.8) / np.exp(m / 0.8).sum()
    np.testing.assert_allclose(absolute, softmax, rtol=1e-14, atol=0)
    relative = sampling_probabilities(m, 0.8)
    t = 0.8 * m.mean()
    np.testing.assert_allclose(relative, np.exp(m / t) / np.exp(m / t).sum(), rtol=1e-14)
    np.testing.assert_allclose(sampling_probabilities(3 * m, 0.8), relative, rtol=1e-14)
    sharp = sampling_probabilities(m, 0.05, relative=False)
    assert sharp[0] < 1e-30  # starved without a floor
    floored = sampling_probabilities(m, 0.05, relative=False, floor=0.1)
    np.testing.assert_allclose(floored, 0.6 * sharp + 0.1, rtol=1e-14)
    assert floored.min() >= 0.1 and abs(floored.sum() - 1) < 1e-12
    np.testing.assert_allclose(sampling_probabilities([0, 0, 0], 1.0), [1 / 3] * 3)


# ---------------------------------------------------------------- 4. MGN over sp and dp
PROBE = 3


def _mgn(sp: int, independent: bool = False) -> dict:
    hooks = SumGrads()
    trainer = _trainer(sp, f"train.steps={PROBE + 1}", *grass_options(probe_steps=PROBE),
                       hooks=[hooks] if independent else [])  # fmt: skip
    grass, layers = _grass(trainer), trainer.model.switchable_layers()
    mine = np.zeros(LAYERS)
    for _ in range(PROBE):
        hooks.grads.clear()
        trainer.train_step()
        if independent:  # one process: the hooks' gradients are the whole gradients
            for i, layer in enumerate(layers):
                square = sum(float(hooks.grads[i][n].double().square().sum())
                             for n, _ in layer.named_parameters())  # fmt: skip
                numel = sum(p.numel() for p in layer.parameters())
                mine[i] += math.sqrt(square / numel) / PROBE
    sums, counts = grass.mgn.sums.copy(), grass.mgn.counts.copy()
    trainer.train_step()  # the first draw closes the probing window
    return {"sums": sums, "counts": counts, "values": grass.mgn.values.copy(), "mine": mine}


def test_mgn_over_sp_and_dp_equals_one_process_and_the_gradients() -> None:
    one = _mgn(1, independent=True)
    assert one["counts"].tolist() == [PROBE] * LAYERS
    np.testing.assert_allclose(one["values"], one["sums"] / PROBE, rtol=1e-15)
    np.testing.assert_allclose(one["values"], one["mine"], rtol=1e-6)
    runs = {"sp2": run_distributed(2, _mgn, 2), "dp2xsp2": run_distributed(4, _mgn, 2)}
    for name, ranks in runs.items():
        for rank in ranks:
            assert rank["counts"].tolist() == [PROBE] * LAYERS, name
            np.testing.assert_allclose(rank["values"], one["values"], rtol=1e-6, err_msg=name)
            np.testing.assert_allclose(rank["sums"], one["sums"], rtol=1e-6, err_msg=name)


# ---------------------------------------------------------------- 5. probing steps
def test_probing_steps_update_nothing_and_measure_every_layer() -> None:
    trainer = _trainer(1, "train.steps=4", *grass_options(probe_steps=2, gamma=2))
    results = []
    step = trainer.engine.step

    def recording_step(*args, **kwargs):
        results.append(step(*args, **kwargs))
        return results[-1]

    trainer.engine.step = recording_step
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.run(2)
    assert [r.updated for r in results] == [False, False]
    for r in results:
        assert r.lr == 0 and len(r.layer_grad_norms) == LAYERS
        assert all(n is not None and n > 0 for n in r.layer_grad_norms), r.layer_grad_norms
    after = list(trainer.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(not o.optimizer.state for o in trainer.engine.optimizers)  # no moments either
    trainer.run(1)
    assert results[-1].updated and results[-1].lr > 0
    assert sum(n is not None for n in results[-1].layer_grad_norms) == 2
    assert not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


# ---------------------------------------------------------------- 6. resume parity
RESUMED = ["train.steps=20", *grass_options(gamma=2, probe_steps=2, period=3, offload="true")]


def _straight_and_resumed(path: str) -> dict:
    """On 2 ranks as dp = 2 (sp = 1): 20 steps straight, and 10 + save + 10 resumed."""
    straight = _trainer(1, *RESUMED)
    losses = [r["loss"] for r in straight.run()]
    first = _trainer(1, *RESUMED, f"train.save={path}")
    head = [r["loss"] for r in first.run(10)]
    resumed = _trainer(1, *RESUMED, f"train.resume={path}/step-00000010")
    assert resumed.engine.step_index == 10
    tail = [r["loss"] for r in resumed.run()]
    return {
        "straight": (losses, _grass(straight).history, _grass(straight).mgn.state_dict()),
        "resumed": (head + tail, _grass(resumed).history, _grass(resumed).mgn.state_dict()),
    }


def test_resume_gives_the_uninterrupted_run_with_its_draws_and_mgn(tmp_path) -> None:
    for rank in run_distributed(2, _straight_and_resumed, str(tmp_path)):
        (want, want_history, want_mgn), (got, got_history, got_mgn) = (
            rank["straight"],
            rank["resumed"],
        )
        _close(got, want)
        assert got_history == want_history and len(want_history) == 6
        assert got_mgn == want_mgn


# ---------------------------------------------------------------- 7. bad options
@pytest.mark.parametrize(
    ("option", "names"),
    [
        ("gamma=0", "grass.gamma must be at least 1"),
        ("gamma=5", "grass.gamma 5 exceeds the model's 4 layers"),
        ("tau=0", "grass.tau must be > 0"),
        ("tau=-1.5", "grass.tau must be > 0"),
        ("alpha=1.5", "grass.alpha must be in [0, 1]"),
        ("alpha=-0.1", "grass.alpha must be in [0, 1]"),
        ("period=0", "grass.period must be at least 1"),
        ("min_prob=0.3", "grass.min_prob 0.3 x 4 layers exceeds 1"),
        ("mode=lisa", "grass.mode must be grass | static | uniform | full"),
    ],
)
def test_bad_options_exit_2_with_one_line(capsys, option: str, names: str) -> None:
    threads = torch.get_num_threads()  # main() sets the process's intra-op threads
    flags = [arg for item in [*BASE, "train.steps=1", f"integrations.grass.{option}"]
             for arg in ("--set", item)]  # fmt: skip
    try:
        with pytest.raises(SystemExit) as info:
            paradyse.train.main(flags)
    finally:
        torch.set_num_threads(threads)
    assert info.value.code == EXIT_USAGE
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and names in lines[0], err
    assert "tokens/s" not in out


# ---------------------------------------------------------------- 8. reset_state
def _moments(trainer: Trainer) -> dict[int, dict]:
    """Per layer, its AdamW state (copied) wherever it is kept, held or parked:
    {param index: {key: tensor}}."""
    engine = trainer.engine
    return {
        owner: {k: {n: v.clone() for n, v in opt.moments(k).items()}
                for k in range(len(opt.optim_params)) if opt.moments(k)}
        for owner, opt in zip(engine.unit_layers, engine.optimizers, strict=True)
        if owner is not None
    }  # fmt: skip


def _adam_steps(state: dict) -> set[int]:
    return {int(s["step"]) for s in state.values()}


@pytest.mark.parametrize("reset", [True, False])
def test_reset_state_forgets_a_leaving_layer_or_keeps_it_unchanged(reset: bool) -> None:
    options = grass_options(gamma=2, probe_steps=0, period=1, reset_state=str(reset).lower())
    trainer = _trainer(1, "train.steps=10", *options)
    grass = _grass(trainer)
    trained_in_a_row, trained_ever = [0] * LAYERS, [0] * LAYERS
    left_and_came_back = 0
    previous = _moments(trainer)
    for _ in range(10):
        trainer.train_step()
        now = _moments(trainer)
        for i in range(LAYERS):
            if i in grass.current:
                if trained_ever[i] and not trained_in_a_row[i]:
                    left_and_came_back += 1
                trained_in_a_row[i] += 1
                trained_ever[i] += 1
                want = trained_in_a_row[i] if reset else trained_ever[i]
                assert _adam_steps(now[i]) == {want}, (i, grass.history)
            else:
                trained_in_a_row[i] = 0
                if reset:
                    assert now[i] == {}, f"layer {i} left the drawn set with its state"
                else:
                    assert now[i].keys() == previous[i].keys()
                    for k, state in now[i].items():
                        for n, v in state.items():
                            assert torch.equal(v, previous[i][k][n]), (i, n)
        previous = now
    assert left_and_came_back >= 2, grass.history  # the check above saw layers come back


# ---------------------------------------------------------------- the schedule without a model
def test_static_mode_keeps_the_probing_mgn_and_grass_refreshes_by_ema() -> None:
    def feed(mode: str) -> Grass:
        grass = Grass(Options(gamma=1, probe_steps=2, period=2, alpha=0.25, mode=mode),
                      [4, 4, 4], seed=0)  # fmt: skip
        for step in range(6):
            chosen = grass.trainable_layers(step, 3)
            norms = [float(2 * (step + 1) * (i + 1)) for i in range(3)]  # MGN = norm / 2
            if chosen is not None:
                norms = [n if i in chosen else None for i, n in enumerate(norms)]
            grass.after_step(SimpleNamespace(step=step, layer_grad_norms=norms))
        grass.trainable_layers(6, 3)  # closes the window of steps 4 and 5
        return grass

    probed = np.array([1.5, 3.0, 4.5])  # mean over steps 0 and 1 of (step + 1) * (i + 1)
    static = feed("static")
    np.testing.assert_allclose(static.mgn.values, probed)
    grass = feed("grass")
    want = probed.copy()
    for window, steps in zip(grass.history[:2], ((2, 3), (4, 5)), strict=True):
        (i,) = window
        measured = np.mean([(s + 1) * (i + 1) for s in steps])
        want[i] = 0.25 * measured + 0.75 * want[i]
    np.testing.assert_allclose(grass.mgn.values, want)


def test_frozen_embeddings_stay_put_and_a_reset_run_resumes(tmp_path) -> None:
    """train_embeddings=false: embedding, head and final norm never change; with reset_state
    some layers have no optimizer state in the checkpoint, and the resumed run is still the
    uninterrupted one."""
    options = ["train.steps=8", *grass_options(gamma=2, probe_steps=1, period=2,
               reset_state="true", train_embeddings="false")]  # fmt: skip
    straight = _trainer(1, *options)
    layers = {id(p) for layer in straight.model.switchable_layers() for p in layer.parameters()}
    rest = [p for p in straight.model.parameters() if id(p) not in layers]
    before = [p.detach().clone() for p in rest]
    want = [r["loss"] for r in straight.run()]
    assert rest and all(torch.equal(a, b) for a, b in zip(before, rest, strict=True))
    assert all(owner is not None for owner in straight.engine.unit_layers)  # no "rest" unit
    first = _trainer(1, *options, f"train.save={tmp_path}")
    head = [r["loss"] for r in first.run(4)]
    assert any(not o.optimizer.state for o in first.engine.optimizers)  # a layer was reset
    resumed = _trainer(1, *options, f"train.resume={tmp_path}/step-00000004")
    _close(head + [r["loss"] for r in resumed.run()], want)
    assert _grass(resumed).history == _grass(straight).history
