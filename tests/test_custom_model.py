"""The Python-API example (launch/examples/custom_model.py): a user-defined module built from the
switchable blocks trains under the engine at sp = 2 and its loss falls."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .harness import REPO_ROOT, run_distributed
from .layer_cases import mesh_for

EXAMPLE = Path(REPO_ROOT) / "launch" / "examples" / "custom_model.py"


def _example():
    spec = importlib.util.spec_from_file_location("custom_model_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(steps: int) -> list[float]:
    return _example().train(mesh_for(2), steps, tokens_per_step=2048, log=lambda *_: None)


def test_custom_model_trains_and_its_loss_falls() -> None:
    per_rank = run_distributed(2, _train, 10)
    losses = per_rank[0]
    assert per_rank[1] == losses  # both ranks report the global loss
    assert len(losses) == 10
    first, last = losses[0], sum(losses[-3:]) / 3
    assert last < 0.8 * first, losses
