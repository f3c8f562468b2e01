"""cost_models.validate on mixture-of-experts layers: it runs one on two ranks with predicted
memory near the measured, documents --moe and refuses a bad MoE shape in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cost_models import CostModel, get_preset
from parallel_lib.moe import MoeShape

from .harness import run_distributed
from .layer_cases import mesh_for
from .test_moe_costs import CONFIGS, SHAPE


def validate_case() -> list[tuple]:
    from cost_models.validate import validate

    mesh = mesh_for()
    moe = CONFIGS["shared"][0]
    cells = validate(mesh, SHAPE, CostModel(get_preset("cpu")), ["tp_sp", "ring"],
                     ["none", "full"], [96], 2, repeats=1, moe=moe)  # fmt: skip
    return [(c.strategy, c.recompute, c.measured_bytes, c.predicted_bytes) for c in cells]


def test_validate_runs_a_moe_layer_on_two_ranks() -> None:
    ranks = run_distributed(2, validate_case)
    assert ranks[0] == ranks[1]  # every rank reports the ranks' largest peak
    assert [c[:2] for c in ranks[0]] == [("tp_sp", "none"), ("tp_sp", "full"),
                                         ("ring", "none"), ("ring", "full")]  # fmt: skip
    for strategy, recompute, measured, predicted in ranks[0]:
        assert abs(predicted - measured) / measured < 0.15, (strategy, recompute)


def test_validate_documents_moe_and_refuses_a_bad_shape() -> None:
    from cost_models.validate import moe_from

    help_text = subprocess.run([sys.executable, "-m", "cost_models.validate", "--help"],
                               capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    assert "--moe E,K,F_E[,F_S]" in help_text and "--moe-aux-loss" in help_text
    with pytest.raises(ValueError, match="--moe takes E,K,F_E or E,K,F_E,F_S"):
        moe_from("8,2", 0.0)
    with pytest.raises(ValueError, match=r"--moe 4,5,16: .*top_k \(5\) exceeds"):
        moe_from("4,5,16", 0.0)
    assert moe_from("8,2,16,32", 0.0) == MoeShape(8, 2, 16, shared_ffn_hidden=32)
