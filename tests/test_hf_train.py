"""Training from a Hugging Face checkpoint (`--init hf:PATH`) and exporting the result: the
checkpoint's export equals the live model's, transformers reproduces the trained model's
logits, and bad sources fail with one line and exit 2."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import paradyse.train  # noqa: E402
from integrations.hf import HFError, pretrained_model_config  # noqa: E402
from integrations.hf.export import export_checkpoint, export_model, main  # noqa: E402
from paradyse import PackedBatch  # noqa: E402
from paradyse.config import load_config  # noqa: E402
from paradyse.trainer import EXIT_USAGE, RunError, Trainer  # noqa: E402

from .harness import run_distributed  # noqa: E402
from .hf_cases import hf_logits, tiny_llama, tokens  # noqa: E402
from .layer_cases import mesh_for  # noqa: E402

RUN = ["data.source=synthetic", "data.documents=64", "data.tokens_per_step=512",
       "data.max_seq_len=128", "data.tokens_per_rank=256", "parallel.profile=",
       "train.progress=false", "train.measure_memory=false", "optim.lr=0.01"]  # fmt: skip


def _train_on_rank(folder: str, save: str, live: str) -> dict:
    config = load_config(None, [*RUN, f"model.init=hf:{folder}", "train.steps=2",
                                f"train.save={save}"])  # fmt: skip
    mesh = mesh_for(2)
    trainer = Trainer(config, mesh=mesh, log=lambda *_: None)
    records = trainer.run()
    export_model(trainer.model, live, rank=mesh.rank)
    batch = PackedBatch.pack(tokens(), mesh.sp, mesh.sp_rank)
    with torch.no_grad():
        logits = trainer.model.logits(batch)
    return {"loss": [r["loss"] for r in records], "index": batch.layout.local_natural_index,
            "bounds": batch.layout.bounds, "logits": logits}  # fmt: skip


@pytest.mark.parametrize("tied", [True, False])
def test_train_from_hf_then_export_matches_transformers(tied, tmp_path) -> None:
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    folder = tmp_path / "hf"
    tiny_llama(str(folder), tied=tied)
    results = run_distributed(2, _train_on_rank, str(folder), str(tmp_path / "ckpt"),
                              str(tmp_path / "live"))  # fmt: skip
    assert all(loss > 0 for loss in results[0]["loss"])
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "from-ckpt")
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "live" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    before = load_file(folder / "model.safetensors")
    assert not torch.equal(a["model.norm.weight"], before["model.norm.weight"])  # it trained
    trained = LlamaForCausalLM.from_pretrained(out).eval()
    assert trained.config.tie_word_embeddings == tied
    total = sum(r["logits"].shape[0] for r in results)
    ours = torch.full((total, trained.config.vocab_size), float("nan"))
    for r in results:
        ours[r["index"]] = r["logits"]
    for want, start in zip(hf_logits(trained, tokens()), results[0]["bounds"], strict=False):
        mine = ours[start : start + len(want)]
        assert (mine - want).abs().max() < 1e-4 * want.abs().max()


def test_export_cli_reports_a_bad_checkpoint_in_one_line(tmp_path, capsys) -> None:
    assert main([str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such directory" in err[0]
    (tmp_path / "nothing").mkdir()
    assert main([str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a ParaDySe checkpoint" in err[0]
    (tmp_path / "nothing" / "config.json").write_text("{}")  # an HF folder, given without hf:
    assert main([str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert f"write hf:{tmp_path / 'nothing'} to re-export it" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"model_type": "qwen2"}, "model_type"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"sliding_window": 512}, "sliding_window"),
        ({"intermediate_size": 96}, "model.layers.0.mlp.gate_proj.weight has shape"),
    ],
)
def test_unsupported_fields_are_refused_by_name(change, named, tmp_path, capsys) -> None:
    folder = tmp_path / "hf"
    tiny_llama(str(folder), tied=False)
    _edit_config(folder, **change)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as info:
            paradyse.train.main(["--init", f"hf:{folder}", *(a for s in RUN for a in ("--set", s))])
    finally:
        torch.set_num_threads(threads)
    assert info.value.code == EXIT_USAGE
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0], lines


def test_a_config_shape_that_contradicts_the_source_is_refused(tmp_path) -> None:
    from paradyse.init import InitError, with_pretrained_shape

    folder = tmp_path / "hf"
    tiny_llama(str(folder), tied=True)
    same = load_config(None, [f"model.init=hf:{folder}", "model.hidden=64"])
    assert with_pretrained_shape(same)[0].model.tie_embeddings  # agreeing keys are fine
    other = load_config(None, [f"model.init=hf:{folder}", "model.layers=7"])
    with pytest.raises(InitError, match="model.layers = 7 \\(the source has 3\\)"):
        with_pretrained_shape(other)


def test_missing_sources_are_one_line(tmp_path) -> None:
    with pytest.raises(HFError, match="neither a model folder nor a .gguf file"):
        pretrained_model_config(f"hf:{tmp_path / 'absent'}")
    folder = tmp_path / "hf"
    tiny_llama(str(folder), tied=True)
    (folder / "config.json").unlink()
    with pytest.raises(HFError, match="has no config.json"):
        pretrained_model_config(f"hf:{folder}")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(HFError, match="no \\*.safetensors file"):
        pretrained_model_config(f"hf:{empty}")
    (empty / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(HFError, match="not a readable safetensors file"):
        pretrained_model_config(f"hf:{empty}")


def _construct(folder: str) -> str:
    config = load_config(None, [*RUN, f"model.init=hf:{folder}"])
    try:
        Trainer(config, mesh=mesh_for(2), log=lambda *_: None)
    except RunError as error:
        return str(error)
    return ""


def test_a_vocabulary_sp_does_not_divide_is_one_line(tmp_path) -> None:
    folder = tmp_path / "hf"
    tiny_llama(str(folder), tied=True, vocab_size=129)
    message = run_distributed(2, _construct, str(folder))[0]
    assert "vocab (129) is not divisible by sp=2; choose sp among [1]" in message
    assert "\n" not in message


def test_a_tokenizer_larger_than_the_vocabulary_is_one_line(tmp_path, capsys) -> None:
    from .test_data_instruct import VOCAB, save_tokenizer

    folder = tmp_path / "hf"
    tiny_llama(str(folder), tied=True, vocab_size=16)
    tokenizer = save_tokenizer(tmp_path / "tok")
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as info:
            paradyse.train.main(["--init", f"hf:{folder}", *(a for s in RUN for a in ("--set", s)),
                                 "--set", "data.source=stdlib",
                                 "--set", f"data.tokenizer={tokenizer}"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert info.value.code == EXIT_USAGE
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert f"has {len(VOCAB)} tokens but the model's vocab is 16" in lines[0]
    assert "the model's own tokenizer" in lines[0]


def test_export_replaces_a_model_folder_and_nothing_else(tmp_path, capsys) -> None:
    folder = tmp_path / "hf"
    tiny_llama(str(folder), tied=True)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert main([f"hf:{folder}", str(precious)]) == 2
    assert "is not a model folder an export may replace" in capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "keep me"
    out = tmp_path / "out"
    assert main([f"hf:{folder}", str(out)]) == 0
    assert main([f"hf:{folder}", str(out), "--dtype", "bfloat16"]) == 0  # a model folder: replaced
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not (tmp_path / "out.old").exists() and not (tmp_path / "out.partial").exists()
    (tmp_path / "file").write_text("")
    assert main([f"hf:{folder}", str(tmp_path / "file" / "out")]) == 2
    assert "cannot write" in capsys.readouterr().err.strip().splitlines()[-1]


def _resume_on_rank(init: str, save: str, steps: int) -> list[float]:
    overrides = [*RUN, f"model.init={init}", f"train.steps={steps}", f"train.save={save}",
                 f"train.resume={save}"]  # fmt: skip
    trainer = Trainer(load_config(None, overrides), mesh=mesh_for(2), log=lambda *_: None)
    return [r["loss"] for r in trainer.run()]


def test_resume_a_run_that_started_from_hf_without_its_source(tmp_path) -> None:
    """Llama 3 scaling survives the manifest, and the weights come from the checkpoint: the
    source may be gone. Two steps, then two more, equal four in one go."""
    import shutil

    from .hf_cases import LLAMA3

    folder = tmp_path / "hf"
    tiny_llama(str(folder), tied=False, rope_scaling=LLAMA3)
    once = run_distributed(2, _resume_on_rank, f"hf:{folder}", str(tmp_path / "once"), 4)[0]
    first = run_distributed(2, _resume_on_rank, f"hf:{folder}", str(tmp_path / "twice"), 2)[0]
    shutil.move(folder, tmp_path / "moved")
    rest = run_distributed(2, _resume_on_rank, f"hf:{folder}", str(tmp_path / "twice"), 4)[0]
    assert first + rest == pytest.approx(once, rel=1e-5)


def test_an_integrations_hf_table_points_to_model_init() -> None:
    from paradyse.config import ConfigError

    with pytest.raises(ConfigError, match="takes no \\[integrations.hf\\] table: set model.init"):
        load_config(None, ["integrations.hf.path=x"])
