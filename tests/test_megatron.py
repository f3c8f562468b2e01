"""Megatron-Core integration (integrations/megatron, docs/megatron.md), on CPU ranks with gloo
through the test-only shim tests/megatron_cpu.py. Skipped, with the reason, where megatron-core
is not installed (tests/test_megatron_absent.py checks that path).

- ParaDySe's core attention equals megatron's DotProductAttention run sequence by sequence
  (forward and gradients, float32, 1e-5 relative), alone and inside megatron's SelfAttention
  with its TP-sharded projections and RoPE, at tensor parallel 1 and 2;
- a GPTModel at context parallel 2 on packed sequences equals context parallel 1 (loss and
  gradients) whichever strategy runs (the planner's, ring, Ulysses), and a core attention that
  ignores the cp group fails that check;
- the planner's choice changes with the batch's lengths;
- launch/examples/megatron_gpt.py trains under torchrun on 2 CPU ranks (the loss falls over 10
  steps) and its dist_checkpointing save at tp 2 reloads at tp 1 with the same evaluation loss.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

REASON = "megatron-core is not installed: pip install -e '.[megatron]' (megatron-core==0.16.1)"
pytest.importorskip("megatron.core", reason=REASON)

from cost_models import get_preset  # noqa: E402
from integrations.megatron import StrategyChooser  # noqa: E402
from parallel_lib import CommGroup  # noqa: E402
from planners.models import ModelSpec  # noqa: E402

from . import megatron_cases as cases  # noqa: E402
from .harness import REPO_ROOT, run_distributed  # noqa: E402

TOL = 1e-5


@pytest.mark.parametrize("tp", [1, 2])
def test_core_attention_equals_dot_product_attention_per_sequence(tp: int) -> None:
    for rank, errors in enumerate(run_distributed(2, cases.dpa_parity, tp, timeout=240)):
        worst = max(errors, key=errors.get)
        assert errors[worst] <= TOL, (tp, rank, worst, errors)
        assert len(errors) == 11  # core: out, dq, dk, dv, sbhd; attention: out, dx, 4 weights


def test_context_parallel_2_equals_context_parallel_1() -> None:
    results = run_distributed(2, cases.cp_equivalence, timeout=240)
    assert results[0] == results[1]  # every cp rank reports the reduced loss and gradients
    for (variant, batch), r in results[0].items():
        if variant == "cp_blind":
            continue
        assert r["loss"] <= TOL and r["grads"] <= TOL, (variant, batch, r)
    choices = {key: r["choice"] for key, r in results[0].items()}
    # the planner's choice is real: the MHA model's many short sequences run as Ulysses, its
    # two long ones as ring; forced cp_comm_type runs what it names
    assert choices[("planner", "many short")] == "ulysses"
    assert choices[("planner", "few long")] == "ring"
    assert {choices[("p2p", b)] for b in cases.BATCHES} == {"ring"}
    assert {choices[("a2a", b)] for b in cases.BATCHES} == {"ulysses"}
    # the negative control: attention that ignores the cp group fails the same check
    for batch in cases.BATCHES:
        blind = results[0][("cp_blind", batch)]
        assert blind["loss"] > TOL and blind["grads"] > 0.1, (batch, blind)


def test_packed_layout_is_megatrons() -> None:
    for checks in run_distributed(2, cases.layout_matches_megatron, timeout=240):
        assert checks == {"sbhd": True, "thd_rope": True, "cu_padded": True}


def test_planner_choice_depends_on_the_lengths() -> None:
    """CPU rates, one rank's layer shape: many short sequences favour the all-to-all (no ring
    steps to wait for), long ones the ring (its K/V travel under the attention)."""
    chooser = StrategyChooser(hardware=get_preset("cpu"))
    mha = ModelSpec("t", 32, 4, 4, 8, 64, 2, 1)
    two = CommGroup(pg=object(), ranks=(0, 1), rank=0)  # planning never communicates
    assert chooser.choose(mha, two, [4] * 64, 0).strategy == "ulysses"
    assert chooser.choose(mha, two, [64, 120], 0).strategy == "ring"
    assert chooser.counts == {"ulysses": 1, "ring": 1}
    # a key/value head per rank cannot be split over 2: ring is the only option
    one_kv = ModelSpec("t", 32, 4, 1, 8, 64, 2, 1)
    assert chooser.choose(one_kv, two, [4] * 64, 0).strategy == "ring"
    # four ranks with usp's groups: Ulysses inside pairs, ring across, for a mid mix
    four = CommGroup(pg=object(), ranks=(0, 1, 2, 3), rank=0)
    object.__setattr__(four, "factors", {2: (four, four)})
    shape = ModelSpec("t", 4096, 4, 4, 128, 1376, 4, 1)
    picks = {chooser.choose(shape, four, lens, 0).name
             for lens in ([128] * 8, [512] * 4, [8192], [64] * 64)}  # fmt: skip
    assert len(picks) >= 2, picks


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"attention_dropout": 0.1}, "set attention_dropout=0.0"),
        ({"window_size": (8, 0)}, "window_size"),
        ({"cp_comm_type": "all_gather"}, "cp_comm_type 'all_gather'"),
    ],
)
def test_what_the_core_attention_cannot_do_is_refused_by_name(overrides, words) -> None:
    from types import SimpleNamespace

    from megatron.core.transformer.enums import AttnMaskType

    from integrations.megatron import ParaDySeCoreAttention

    comm = overrides.pop("cp_comm_type", None)
    with pytest.raises(ValueError, match=re.escape(words)):
        ParaDySeCoreAttention(
            cases.config(**overrides),
            1,
            AttnMaskType.causal,
            cp_comm_type=comm,
            pg_collection=SimpleNamespace(tp=None, cp=None),
        )
    with pytest.raises(ValueError, match="causal only"):
        ParaDySeCoreAttention(cases.config(), 1, AttnMaskType.no_mask,
                              pg_collection=SimpleNamespace(tp=None, cp=None))  # fmt: skip


@pytest.mark.slow  # a torchrun training run and a reload, 30 s: run it with -m slow
def test_example_trains_and_its_checkpoint_reloads_at_tp_1(tmp_path) -> None:
    save = tmp_path / "ckpt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "2", "launch/examples/megatron_gpt.py", "--tp", "2", "--steps", "10",
               "--save", str(save)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    losses = [r["loss"] for r in records if "step" in r]
    assert len(losses) == 10 and all(r["updated"] for r in records if "step" in r)
    assert max(losses[-3:]) < losses[0] - 1.0, losses  # ln 256 = 5.55 at the start
    evaluated = records[-1]
    assert evaluated["tp"] == 2 and evaluated["eval_loss"] < losses[0] - 1.0
    # the tp 2 checkpoint on 2 ranks at tp 1 (data parallel 2): the same evaluation loss
    again = run_distributed(2, cases.example_eval, ["--load", str(save), "--steps", "0"],
                            timeout=240)  # fmt: skip
    assert again[0] == again[1]
    assert abs(again[0] - evaluated["eval_loss"]) <= TOL * evaluated["eval_loss"], (
        again, evaluated)  # fmt: skip


@pytest.mark.slow
def test_context_parallel_4_with_usp_equals_context_parallel_1() -> None:
    """4 ranks: `pytest -m slow tests/test_megatron.py` (about a minute on 2 cores)."""
    results = run_distributed(4, cases.cp4_equivalence, timeout=600)
    assert all(r == results[0] for r in results)
    for key, r in results[0].items():
        assert r["loss"] <= TOL and r["grads"] <= TOL, (key, r)
    choices = {key: r["choice"] for key, r in results[0].items()}
    assert {choices[("a2a+p2p", b)] for b in cases.BATCHES} == {"usp2"}
    assert {choices[("a2a", b)] for b in cases.BATCHES} == {"ulysses"}
    assert {choices[("p2p", b)] for b in cases.BATCHES} == {"ring"}
