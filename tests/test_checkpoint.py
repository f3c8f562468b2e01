"""Checkpoints: 6 steps straight equal 3 steps + save + resume for 3 more on another world size
and sp (float32, within 1e-5 relative); a truncated or corrupt checkpoint is refused with one
line while the previous one still loads; an interrupted save leaves `latest` valid; DCP's
metadata is read without unpickling anything but its own classes."""

from __future__ import annotations

import io
import os
import pickle
import shutil

import pytest

from paradyse import RunError, Trainer, load_config
from paradyse.checkpoint import MANIFEST, CheckpointError, _MetadataUnpickler, find_checkpoint

from .harness import run_distributed
from .layer_cases import mesh_for
from .test_engine import TINY


def _config(*extra: str):
    return load_config(None, [*TINY, "train.steps=6", *extra])


def _train(sp: int, *extra: str) -> list[float]:
    trainer = Trainer(_config(*extra), mesh=mesh_for(sp), log=lambda *_: None)
    return [r["loss"] for r in trainer.run()]


def _resume(sp: int, path: str) -> list[float] | str:
    try:
        trainer = Trainer(_config(f"train.resume={path}"), mesh=mesh_for(sp), log=lambda *_: None)
    except RunError as error:
        return f"{error.code}: {error}"
    return [r["loss"] for r in trainer.run()]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """6 steps at sp = 4 (world 4), saving after steps 3 and 6, and 6 steps at sp = 2."""
    root = tmp_path_factory.mktemp("ckpt")
    losses = run_distributed(4, _train, 4, f"train.save={root}", "train.save_every=3")[0]
    straight = run_distributed(2, _train, 2)[0]
    return {"root": root, "saved_run": losses, "straight": straight}


def _close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert abs(g - w) <= 1e-5 * abs(w), (got, want)


def test_resume_on_another_world_size_and_sp_continues_the_run(saved) -> None:
    root, straight = saved["root"], saved["straight"]
    _close(saved["saved_run"], straight)  # saving does not change the run
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000003", "step-00000006"]
    for rank in run_distributed(2, _resume, 2, str(root / "step-00000003")):  # world 4 -> 2
        _close(rank, straight[3:])
    _close(_resume(1, str(root / "step-00000003")), straight[3:])  # -> one process, sp = 1


def test_a_corrupt_checkpoint_is_refused_and_the_previous_still_loads(saved, tmp_path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(saved["root"], root)
    victim = sorted((root / "step-00000006").glob("*.distcp"))[0]
    with open(victim, "r+b") as f:  # truncate one shard file
        f.truncate(os.path.getsize(victim) // 2)
    message = _resume(1, str(root))  # `latest` names step 6
    assert isinstance(message, str) and message.startswith("2: ") and "\n" not in message
    assert "corrupt" in message and "step-00000006" in message and victim.name in message
    _close(_resume(1, str(root / "step-00000003")), saved["straight"][3:])
    (root / "step-00000003" / MANIFEST).unlink()
    message = _resume(1, str(root / "step-00000003"))
    assert "not a ParaDySe checkpoint" in message


def test_a_bad_checkpoint_is_refused_before_the_slow_set_up(tmp_path, monkeypatch) -> None:
    """The checkpoint is checked before the profile is resolved (which may measure the
    machine for a minute) and before the model is built."""
    import paradyse.trainer as trainer_module

    def slow_step(*_args, **_kwargs):
        raise AssertionError("set-up went on past a bad checkpoint")

    monkeypatch.setattr(trainer_module, "resolve_profile", slow_step)
    monkeypatch.setattr(trainer_module, "DecoderModel", slow_step)
    message = _resume(1, str(tmp_path / "nothing-here"))
    assert message == f"2: --resume {tmp_path / 'nothing-here'}: no such directory"


def test_an_interrupted_save_leaves_latest_valid(saved, tmp_path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(saved["root"], root)
    partial = root / ".step-00000009.partial"  # what a crash mid-save leaves
    shutil.copytree(root / "step-00000006", partial)
    (partial / MANIFEST).unlink()
    assert find_checkpoint(root) == root / "step-00000006"
    (root / "latest").write_text(partial.name + "\n")  # a pointer to an incomplete one
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        find_checkpoint(root)


def test_metadata_is_read_without_arbitrary_unpickling(saved) -> None:
    metadata = saved["root"] / "step-00000003" / ".metadata"
    with open(metadata, "rb") as f:
        loaded = _MetadataUnpickler(f).load()
    assert "model/layers.0.wq" in loaded.state_dict_metadata

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="posix.system is not allowed"):
        _MetadataUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()


def test_save_and_resume_in_one_folder_start_fresh_then_continue(tmp_path) -> None:
    """`--save D --resume D`: the first start finds nothing and trains from step 0; a restart
    continues from D's latest checkpoint (what an elastic restart does)."""
    both = [f"train.save={tmp_path}", f"train.resume={tmp_path}", "train.steps=4",
            "train.save_every=2"]  # fmt: skip
    mesh = mesh_for(1)
    first = Trainer(load_config(None, [*TINY, *both]), mesh=mesh, log=lambda *_: None)
    assert first.engine.step_index == 0
    losses = [r["loss"] for r in first.run()]
    (tmp_path / "latest").write_text("step-00000002\n")  # as if the job died after step 2
    again = Trainer(load_config(None, [*TINY, *both]), mesh=mesh, log=lambda *_: None)
    assert again.engine.step_index == 2
    _close([r["loss"] for r in again.run()], losses[2:])
