"""Task files and evaluation of integrations.hf: form, disjointness, determinism, answer reading;
generate's batched KV-cache decode checked against a plain greedy loop on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("reasoning_gym")

from integrations.hf import tasks  # noqa: E402


def _write(tmp_path: Path, seed: int = 3, n_train: int = 40, n_heldout: int = 12) -> Path:
    out = tmp_path / f"seed{seed}"
    tasks.main(
        ["--task", "chain_sum", "--seed", str(seed), "--train", str(n_train)]
        + ["--heldout", str(n_heldout), "--out", str(out)]
    )
    return out


def test_files_have_the_documented_form(tmp_path: Path) -> None:
    out = _write(tmp_path)
    train, heldout = tasks.read_jsonl(out / "train.jsonl"), tasks.read_jsonl(out / "heldout.jsonl")
    assert len(train) == 40 and len(heldout) == 12
    for row in train:
        assert set(row) == {"prompt", "response"}
        assert row["prompt"].endswith(tasks.INSTRUCTION)
        *steps, last = row["response"].splitlines()
        answer = tasks.extract_answer(last)
        assert last == f"The answer is {answer}."
        assert steps[-1].endswith(f"= {answer}")  # the worked solution's last step
    for row in heldout:
        assert {"prompt", "answer", "task", "index", "metadata"} <= set(row)
        assert row["task"] == "chain_sum"
        assert tasks.score("chain_sum", row["answer"], row) == 1.0


def test_train_and_heldout_are_disjoint_and_deduplicated(tmp_path: Path) -> None:
    out = _write(tmp_path, n_train=200, n_heldout=50)
    train = [r["prompt"] for r in tasks.read_jsonl(out / "train.jsonl")]
    heldout = [r["prompt"] for r in tasks.read_jsonl(out / "heldout.jsonl")]
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
    assert not set(train) & set(heldout)


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path) -> None:
    a, b, c = _write(tmp_path / "a"), _write(tmp_path / "b"), _write(tmp_path / "c", seed=4)
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()


def test_responses_of_other_tasks_end_in_the_answer() -> None:
    for task in ("leg_counting", "gsm_symbolic", "basic_arithmetic"):
        train, heldout = tasks.build(task, seed=1, n_train=5, n_heldout=3)
        for row in train:
            answer = tasks.extract_answer(row["response"])
            assert answer is not None and row["response"].endswith(f"The answer is {answer}.")
        assert all(tasks.score(task, r["answer"], r) == 1.0 for r in heldout)


@pytest.mark.parametrize(
    ("text", "extracted", "correct"),
    [
        ("4 - 1 = 3\n3 - 7 = -4\nThe answer is -4.", "-4", True),
        ("The answer is 5.\nNo, the answer is -4.", "-4", True),  # the last sentence counts
        ("The answer is -4, which is negative.", "-4", True),
        ("The answer is **-4**.", "-4", True),
        ("the answer is: $-4$", "-4", True),
        ("The answer is -4 apples.", "-4 apples", False),
        ("The answer is 4.", "4", False),
        ("So it is -4.", None, False),  # malformed: no answer sentence
        ("The answer is", None, False),
        ("", None, False),
    ],
)
def test_extraction_and_scoring(text: str, extracted: str | None, correct: bool) -> None:
    row = {"prompt": "4 - 1 - 7 =", "answer": "-4", "metadata": {"expression": "4 - 1 - 7"}}
    assert tasks.extract_answer(text) == extracted
    assert (tasks.score("chain_sum", tasks.extract_answer(text), row) == 1.0) is correct


def test_last_number_reads_a_model_without_the_format() -> None:
    assert tasks.last_number("The answer is -4.") == "-4"
    assert tasks.last_number("no digits") is None


# --- evaluation on a tiny random model ---------------------------------------------------------

_SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_model_dir(tmp_path: Path) -> Path:
    """A 2-layer random Llama and a word-level tokenizer (digits, 'The answer is', a few words)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    words = ["The answer is", " ", "\n", "-", "+", "=", "user", "assistant", "State", "the"]
    vocab = {t: i for i, t in enumerate(_SPECIALS + words + [str(d) for d in range(10)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(
        Regex(r"The answer is|<\|im_start\|>|<\|im_end\|>|\d|[A-Za-z]+|\s|."), behavior="isolated"
    )
    backend.decoder = decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        chat_template=_TEMPLATE,
    )
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.5,  # large weights: varied, non-constant greedy outputs
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _greedy_without_cache(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    import torch

    from integrations.hf.evaluate import chat_prompts

    text = chat_prompts(tokenizer, [prompt])[0]
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(ids, use_cache=False).logits[0, -1].argmax())
            new.append(token)
            if token == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_evaluation_matches_a_plain_greedy_decode(tmp_path: Path) -> None:
    folder = _tiny_model_dir(tmp_path)
    from integrations.hf import evaluate

    _, heldout = tasks.build("chain_sum", seed=0, n_train=0, n_heldout=10)
    model, tokenizer = evaluate.load(folder)
    expected = [_greedy_without_cache(model, tokenizer, r["prompt"], 12) for r in heldout]
    assert len(set(expected)) > 1
    # Make answers match what the model will say, so the right counts are known: every answer
    # sentence, the last number of every other generation without one, and no other.
    strict = lenient = 0
    for i, (row, text) in enumerate(zip(heldout, expected, strict=True)):
        number = tasks.last_number(text)
        if (sentence := tasks.extract_answer(text)) is not None:
            row["answer"] = sentence
            strict, lenient = strict + 1, lenient + 1
        elif i % 2 == 0 and number is not None:
            row["answer"] = number
            lenient += 1
        else:
            row["answer"] = "never said"  # not even by chance
    assert strict > 0 and lenient > strict
    path = tmp_path / "heldout.jsonl"
    tasks.write_jsonl(path, heldout)
    out = tmp_path / "results.json"
    evaluate.main(
        [str(folder), str(path), "--max-new-tokens", "12", "--batch", "4"] + ["--out", str(out)]
    )
    result = json.loads(out.read_text())
    assert [p["generation"] for p in result["problems"]] == expected
    assert result["n"] == 10
    assert result["correct"] == strict == sum(p["correct"] for p in result["problems"])
    assert result["correct_lenient"] == lenient
    assert result["new_tokens"] == sum(p["new_tokens"] for p in result["problems"]) > 0
