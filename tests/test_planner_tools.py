"""planners.explain, the planner benchmarks, byte sizes and the synthetic length distributions."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import planner_speed, simulate_paradyse
from paradyse.lengths import LENGTH_DISTRIBUTIONS, sample_lengths
from planners import format_bytes, parse_bytes
from planners.explain import main as explain


def _explain(capsys, *args: str) -> tuple[int, str, str]:
    code = explain(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_explain_prints_the_plan_and_every_method(capsys) -> None:
    code, out, err = _explain(
        capsys, "--hardware", "a100-80g-nvlink", "--model", "llama-70b", "--sp", "8",
        "--seq-lens", "131072,4096", "--options",
    )  # fmt: skip
    assert code == 0 and err == ""
    plan = re.search(r"^plan \(exact\): (.+)$", out, re.M)
    assert plan and re.fullmatch(r"[a-z_0-9x+:]+ x\d+( \| [a-z_0-9x+:]+ x\d+)*", plan.group(1))
    for method in ("exact", "paradyse", "static:tp_sp", "static:ulysses", "static:ring",
                   "static:usp", "static:metp"):  # fmt: skip
        assert re.search(rf"^{re.escape(method)} +\S", out, re.M), method
    assert re.search(r"^exact +\d+\.\d+ +1\.00 ", out, re.M)
    assert re.search(r"^usp4x2\+full +\d", out, re.M)  # the option table
    longest = re.search(r"^longest single sequence that fits \(exact\): ([\d,]+) tokens with the "
                        r"logits in chunks of 1,024 tokens; ([\d,]+) with the whole logits "
                        r"\((\d+\.\d+)x", out, re.M)  # fmt: skip
    assert longest, out
    chunked, whole = (int(longest.group(i).replace(",", "")) for i in (1, 2))
    assert chunked >= whole > 0


def test_explain_shows_the_longer_sequences_chunked_logits_fit(capsys) -> None:
    """The 7B config's shape on its preset GPU (launch/configs/llama_7b.toml, h100-sxm, sp=8):
    the whole logits (three float32 (T/8, 32000) buffers) limit it; in chunks of 1,024 tokens
    the layers do."""
    code, out, _ = _explain(
        capsys, "--hardware", "h100-sxm", "--model", "llama-7b", "--sp", "8", "--seq-lens", "131072"
    )
    assert code == 0
    assert "LM-head logits 250.0 MiB (in chunks of 1,024 tokens)" in out
    found = re.search(r"\): ([\d,]+) tokens with the logits in chunks of 1,024 tokens; ([\d,]+) "
                      r"with the whole logits \((\d+\.\d+)x\)", out)  # fmt: skip
    chunked, whole = (int(found.group(i).replace(",", "")) for i in (1, 2))
    assert chunked > 1.1 * whole and float(found.group(3)) == round(chunked / whole, 2)
    code, out, _ = _explain(capsys, "--hardware", "h100-sxm", "--model", "llama-7b", "--sp", "8",
                            "--seq-lens", "131072", "--logits-chunk", "0")  # fmt: skip
    assert code == 0 and "(whole)" in out
    assert f"): {whole:,} tokens (whole logits)" in out


def test_explain_exits_3_when_nothing_fits_and_2_for_bad_arguments(capsys) -> None:
    code, out, _ = _explain(
        capsys, "--hardware", "a100-80g-nvlink", "--model", "gpt3-175b", "--seq-lens", "900000"
    )
    assert code == 3
    assert re.search(r"^no plan \(exact\): no plan fits: the leanest plan needs .* the longest "
                     r"single sequence that fits is [\d,]+ tokens$", out, re.M)  # fmt: skip
    for args, words in (
        (["--hardware", "tpu", "--seq-lens", "1"], "unknown hardware preset 'tpu'"),
        (["--hardware", "h200", "--sp", "3", "--seq-lens", "1"], "choose sp among"),
        (["--hardware", "h200", "--sp", "0", "--seq-lens", "1"], "--sp must be a positive"),
        (["--hardware", "h200", "--seq-lens", "8,x"], "--seq-lens takes comma-separated"),
        (["--hardware", "h200", "--seq-lens", "8", "--memory-budget", "lots"], "--memory-budget"),
        (["--hardware", "h200", "--seq-lens", "8", "--method", "static:zero"], "no such option"),
        (["--hardware", "h200", "--seq-lens", "8", "--model", "gpt5"], "unknown model 'gpt5'"),
        (["--hardware", "h200", "--seq-lens", "8", "--profile", "/nonexistent.json"], "profile"),
    ):
        code, out, err = _explain(capsys, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and words in lines[0], (args, err)


def test_explain_runs_as_a_module_without_torch() -> None:
    code = (
        "import sys; from planners.explain import main; code = main(['--hardware', 'h100-sxm', "
        "'--seq-lens', '1000']); bad = [m for m in ('torch', 'parallel_lib', 'paradyse') "
        "if m in sys.modules]; print(code, bad)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "0 []", proc.stderr


@pytest.mark.slow  # both simulation modes end to end, 54 s: run it with -m slow
def test_simulation_benchmark_prints_every_method_and_the_papers_figures(capsys) -> None:
    assert simulate_paradyse.main(["--sequences", "24", "--models", "gpt3-175b"]) == 0
    out = capsys.readouterr().out
    for method in ("exact", "paradyse", "static:tp_sp", "static:metp"):
        assert re.search(rf"^  {re.escape(method)} +[\d,]+ +\d+ ", out, re.M), method
    assert "paper: longest 329,728 tokens (112,128 without METP)" in out
    assert "64 GPUs: gpt3-175b on grch38, sp=32 x dp=2 (4 node(s) per group)" in out
    assert re.search(r"^gpt3-175b/grch38: exact saves -?\d+\.\d% vs the best static", out, re.M)


def test_planner_speed_benchmark_runs(capsys) -> None:
    assert planner_speed.main(["--batches", "6"]) == 0
    out = capsys.readouterr().out
    assert "identical layers: 6 instances of 80 layers x 45 options" in out
    assert re.search(r"^choose\(exact\) median \d+\.\d+ ms .* cached plan \d+\.\d us$", out, re.M)


def test_bytes_parse_and_print() -> None:
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("1.5 GiB") == 3 * 2**29
    assert parse_bytes("1e9") == 10**9 and parse_bytes(4096) == 4096
    for bad in ("", "12XB", "-1GB", "0", "nan"):
        with pytest.raises(ValueError):
            parse_bytes(bad, "--memory-budget")
    assert format_bytes(3 * 2**29) == "1.50 GiB" and format_bytes(900) == "900 B"
    assert format_bytes(150 * 2**30) == "150.0 GiB"


def test_length_distributions_have_the_papers_facts() -> None:
    code = np.array(sample_lengths("githubcode", 20000, seed=1))
    assert code.max() == 309_000 and code.min() >= 1
    assert abs((code < 4096).mean() - 0.657) < 0.015  # the paper's 65.7% under 4K
    genome = np.array(sample_lengths("grch38", 2000, seed=1))
    assert genome.max() == 624_000 and genome.min() >= 16_384
    assert sample_lengths("grch38", 50, seed=3) == sample_lengths("grch38", 50, seed=3)
    assert sample_lengths("grch38", 50, seed=3) != sample_lengths("grch38", 50, seed=4)
    assert set(LENGTH_DISTRIBUTIONS) == {"githubcode", "grch38"}
    with pytest.raises(ValueError, match="unknown length distribution 'books'"):
        sample_lengths("books", 10)


def test_explain_takes_the_profiles_dtype_and_refuses_another_in_one_line(capsys, tmp_path) -> None:
    from .test_cost_model import make_profile

    path = tmp_path / "float32.json"
    make_profile().save(path)
    base = ["--hardware", "cpu", "--model", "cpu-tiny", "--sp", "2", "--seq-lens", "300"]
    code, out, err = _explain(capsys, *base, "--profile", str(path))
    assert code == 0 and err == "" and ", float32, profiled rates" in out.splitlines()[0]
    code, out, err = _explain(capsys, *base, "--profile", str(path), "--dtype", "bfloat16")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "measured in float32" in lines[0], err
    code, out, _ = _explain(capsys, *base)
    assert code == 0 and ", bfloat16, datasheet rates" in out.splitlines()[0]
