"""python -m integrations.alloc_moe on a tiny trained MoE checkpoint: the profile has L x K
perplexities in the documented order, the evaluation counts at most the budget in the layers and
reproduces the full model at the full budget, held-out text is text the run never trained on,
and bad inputs exit 2 with one line."""

from __future__ import annotations

import json

import pytest

from integrations.alloc_moe import load_sensitivity
from integrations.alloc_moe.__main__ import main
from integrations.alloc_moe.evaluate import load_checkpoint_model, measure, unseen_sequences
from paradyse import Trainer, load_config
from paradyse.data.batching import GlobalBatches
from paradyse.data.sources import open_source

from .layer_cases import mesh_for

TINY = [
    "model.hidden=32", "model.heads=4", "model.kv_heads=4", "model.head_dim=8",
    "model.ffn_hidden=64", "model.layers=3", "model.moe.experts=4", "model.moe.top_k=2",
    "model.moe.expert_ffn_hidden=16", "model.moe.shared_experts=0",
    "model.moe.first_dense_layers=1", "data.tokens_per_step=1024", "data.max_seq_len=512",
    "data.tokens_per_rank=1024", "train.steps=2", "train.measure_memory=false",
    "train.progress=false", "parallel.profile=", "parallel.strategy=local",
]  # fmt: skip
CONFIG = "launch/configs/cpu_moe.toml"
DATA = ["--calibration-tokens", "512", "--seq-len", "128", "--batch-tokens", "1024"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("alloc")
    config = load_config(CONFIG, [*TINY, f"train.save={root / 'ckpt'}"])
    Trainer(config, mesh=mesh_for(1), log=lambda *_: None).run()
    return str(root / "ckpt")


def _sets() -> list[str]:
    return [a for s in TINY for a in ("--set", s)]


def test_profile_then_evaluate(checkpoint, tmp_path, capsys) -> None:
    S_path = tmp_path / "S.json"
    assert main(["profile", checkpoint, *_sets(), *DATA, "--out", str(S_path)]) == 0
    model, step = load_checkpoint_model(checkpoint)
    assert step == 2
    profile = load_sensitivity(str(S_path), model)
    assert profile.layers == (1, 2) and profile.top_k == 2
    assert all(len(row) == 2 for row in profile.S)
    # the deepest layer's row is measured with every layer above at K: its top-K entry is the
    # full model's perplexity on the calibration text
    config = load_config(CONFIG, TINY)
    calibration = unseen_sequences(config, step, 512, 128)
    assert profile.S[-1][-1] == pytest.approx(measure(model, calibration, None).perplexity)
    out = tmp_path / "rows.json"
    code = main(["evaluate", checkpoint, *_sets(), *DATA, "--sensitivity", str(S_path),
                 "--eval-tokens", "1024", "--budgets", "2,4", "--out", str(out)])  # fmt: skip
    assert code == 0
    rows = json.loads(out.read_text())
    full = rows[0]
    assert full["method"] == "full" and full["activations_per_token"] == pytest.approx(4.0)
    for row in rows[1:]:
        assert row["activations_per_token"] <= row["budget"] + 1e-9, row
        if row["budget"] == 4:  # the full budget: every method is the original routing
            assert row["perplexity"] == pytest.approx(full["perplexity"], rel=1e-12), row
            assert row["load_js"] == pytest.approx(0.0, abs=1e-12), row
    assert {r["method"] for r in rows} == {
        "full",
        "uniform",
        "top_p",
        "naee",
        "alloc_l",
        "alloc_t",
        "alloc_lt",
    }
    assert "| 2 | Alloc-L+T |" in capsys.readouterr().out


def test_unseen_text_comes_after_the_trained_batches() -> None:
    config = load_config(CONFIG, TINY)
    data = config.data
    stream = GlobalBatches(open_source("stdlib"), tokens_per_step=data.tokens_per_step,
                           max_seq_len=data.max_seq_len, seed=config.train.seed)  # fmt: skip
    seen = {bytes(s.astype("uint8")) for _ in range(2) for s in stream.next_batch().sequences}
    unseen = unseen_sequences(config, 2, 2048, 128)
    assert sum(len(s) for s in unseen) == 2048
    assert not any(bytes(u.astype("uint8")) in s for u in unseen for s in seen)
    later = unseen_sequences(config, 2, 512, 128, skip_tokens=2048)
    assert not any(bytes(a.astype("uint8")) == bytes(b.astype("uint8"))
                   for a in later for b in unseen)  # fmt: skip


def test_bad_inputs_exit_2_with_one_line(checkpoint, tmp_path, capsys) -> None:
    S_path = tmp_path / "S.json"
    S_path.write_text(json.dumps({"layers": [1, 2], "top_k": 2, "S": [[3.0, 2.0], [4.0, 2.5]]}))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"layers": [1, 2, 3], "top_k": 2, "S": [[1, 1]] * 3}))
    cases = {
        "below the layers": ["allocate", str(S_path), "--budget", "1"],
        "missing file": ["evaluate", checkpoint, *_sets(), *DATA, "--sensitivity",
                         str(tmp_path / "nope.json"), "--budgets", "2", "--methods", "alloc_l"],
        "mismatched file": ["evaluate", checkpoint, *_sets(), *DATA, "--sensitivity",
                            str(wrong), "--budgets", "2", "--methods", "alloc_l"],
        "budget below L": ["evaluate", checkpoint, *_sets(), *DATA, "--sensitivity",
                           str(S_path), "--budgets", "1", "--methods", "uniform"],
        "not a checkpoint": ["profile", str(tmp_path), *_sets(), *DATA, "--out",
                             str(tmp_path / "x.json")],
    }  # fmt: skip
    for what, argv in cases.items():
        capsys.readouterr()
        assert main(argv) == 2, what
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, (what, err)
    assert main(["allocate", str(S_path), "--budget", "3"]) == 0
    assert json.loads(capsys.readouterr().out) in ([2, 1], [1, 2])


def test_benchmark_summary_counts_the_budgets_won() -> None:
    from benchmarks.alloc_moe import summary

    def rows(budget, **ppl):
        return [{"budget": budget, "method": m, "perplexity": p} for m, p in ppl.items()]

    table = [*rows(12, full=5.0), *rows(4, uniform=9.0, top_p=8.0, naee=8.5, alloc_lt=8.2),
             *rows(8, uniform=6.0, top_p=6.5, naee=6.4, alloc_lt=5.9)]  # fmt: skip
    assert summary(table) == (
        "Alloc-L+T beats uniform at 2 of 2 budgets; beats every baseline at 1 of 2"
    )
