"""benchmarks/machine_drift.py: bursts of one matmul over time, and its two spreads."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.machine_drift import main


def relative_iqr(values) -> float:
    q1, q3 = np.percentile(values, [25, 75])  # numpy's linear: the inclusive quartiles
    return float((q3 - q1) / np.median(values))


def test_bursts_and_spreads(capsys) -> None:
    result = main(["--minutes", "0.03", "--every", "0.2", "--size", "64"])
    medians, spreads = result["medians"], result["spreads"]
    assert len(medians) == len(spreads) >= 3 and all(m > 0 for m in medians)
    assert result["within"] == pytest.approx(float(np.median(spreads)), rel=1e-12)
    assert result["between"] == pytest.approx(relative_iqr(medians), rel=1e-9, abs=1e-12)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(medians) + 3  # header, a row per burst, the two last lines
    assert lines[-1].startswith("between bursts: spread ")


def test_bad_arguments_exit_with_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--minutes", "0"])
    assert exit_info.value.code == 2
    assert "must be positive" in capsys.readouterr().err
