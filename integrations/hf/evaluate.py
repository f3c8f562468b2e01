"""Exact-match accuracy of a Hugging Face model folder on held-out task problems.

    python -m integrations.hf.evaluate MODEL_DIR HELDOUT.jsonl [--limit N] [--max-new-tokens K]
        [--batch B] [--out results.json]

Each problem's prompt goes through the tokenizer's chat template (with the generation prompt), the
batch is left-padded, and transformers' ``generate`` decodes greedily with its KV cache until the
end-of-sequence token or ``K`` new tokens. The answer is read from the sentence "The answer is ..."
(`integrations.hf.tasks.extract_answer`) and scored by the task's own reasoning_gym checker; a
score of 1.0 counts as correct. It prints ``k/n`` and tokens/s, and writes every problem's prompt,
generation, extracted answer and score to ``--out``.

Why transformers' ``generate``: it is the reference decoder for the folder the exporter writes
(config.json, safetensors, tokenizer files), with a KV cache and batching, and it shares no code
with the training engine; so a change in accuracy after fine-tuning measures the weights, not a
second implementation of the model, and a folder that does not load or decode here is an export
bug. It runs in one process: under a distributed launcher only rank 0 evaluates. Greedy decoding
on float32 weights with a fixed batch order gives the same result on every run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from integrations.hf.tasks import extract_answer, last_number, read_jsonl, score


def load(model_dir: str | Path) -> tuple[Any, Any]:
    """The model (float32, eval mode) and its tokenizer, set to pad on the left."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise SystemExit(f"{model_dir} has no tokenizer: export it with --tokenizer PATH")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.chat_template is None:
        raise SystemExit(f"{model_dir}: the tokenizer has no chat template; export it with one")
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"{model_dir}: the tokenizer has no eos token; set eos_token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def chat_prompts(tokenizer: Any, prompts: list[str]) -> list[str]:
    """Each prompt as a single user turn, ending in the assistant's generation prompt."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]


def generate(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch: int
) -> tuple[list[str], list[int]]:
    """Greedy completions of `prompts` (in order) and the number of tokens each generated.

    Prompts are batched in order of length (least padding), then put back in input order.
    """
    import torch
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=model.generation_config.bos_token_id,
    )
    texts = chat_prompts(tokenizer, prompts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    outputs: list[str] = [""] * len(texts)
    counts: list[int] = [0] * len(texts)
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        # The template already holds the special tokens: add none (no stray BOS).
        enc = tokenizer(
            [texts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False
        )
        with torch.inference_mode():
            out = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                generation_config=config,
            )
        new = out[:, enc["input_ids"].shape[1] :]  # (B, T_new), pad after a row's eos
        for row, i in enumerate(chunk):
            tokens = new[row].tolist()
            n = tokens.index(eos) + 1 if eos in tokens else len(tokens)
            counts[i] = n
            outputs[i] = tokenizer.decode(tokens[:n], skip_special_tokens=True)
    return outputs, counts


def heldout_loss(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> tuple[float, int]:
    """Mean next-token cross-entropy of the held-out responses and how many tokens it covers:
    the tokens after the assistant's generation prompt up to its end-of-turn token, the ones
    the `instruct` data source trains on (the prompt and the newline after the turn carry none).
    """
    import torch
    import torch.nn.functional as F

    eos, total, count = tokenizer.eos_token_id, 0.0, 0
    for row in rows:
        user = [{"role": "user", "content": row["prompt"]}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True)
        turn = [*user, {"role": "assistant", "content": row["response"]}]
        ids = tokenizer.apply_chat_template(turn)
        stop = max(i for i, t in enumerate(ids) if t == eos) + 1  # through the end of turn
        with torch.inference_mode():
            logits = model(torch.tensor([ids[:stop]])).logits[0, :-1].float()
        targets = torch.tensor(ids[1:stop])
        loss = F.cross_entropy(logits, targets, reduction="none")[len(prompt) - 1 :]
        total, count = total + float(loss.sum()), count + loss.numel()
    return total / count, count


def evaluate(
    model_dir: str | Path,
    heldout: str | Path,
    *,
    limit: int | None = None,
    max_new_tokens: int = 64,
    batch: int = 16,
) -> dict[str, Any]:
    """Generate, extract and score every held-out problem; the summary plus per-problem rows."""
    import torch

    rows = read_jsonl(heldout)[:limit]
    if not rows:
        raise SystemExit(f"{heldout}: no problems to evaluate")
    torch.manual_seed(0)
    model, tokenizer = load(model_dir)
    start = time.perf_counter()
    generations, counts = generate(
        model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch
    )
    seconds = time.perf_counter() - start
    with_response = [r for r in rows if "response" in r]
    loss, loss_tokens = (
        heldout_loss(model, tokenizer, with_response) if with_response else (None, 0)
    )
    problems = []
    for row, text, n in zip(rows, generations, counts, strict=True):
        extracted = extract_answer(text)
        points = score(row["task"], extracted, row)
        lenient = extracted if extracted is not None else last_number(text)
        lenient_points = points if lenient == extracted else score(row["task"], lenient, row)
        problems.append(
            {
                "task": row["task"],
                "index": row["index"],
                "prompt": row["prompt"],
                "answer": row["answer"],
                "generation": text,
                "extracted": extracted,
                "score": points,
                "correct": points == 1.0,
                "lenient": lenient,
                "correct_lenient": lenient_points == 1.0,
                "new_tokens": n,
            }
        )
    correct = sum(p["correct"] for p in problems)
    correct_lenient = sum(p["correct_lenient"] for p in problems)
    return {
        "model": str(model_dir),
        "heldout": str(heldout),
        "n": len(problems),
        "correct": correct,
        "accuracy": correct / len(problems),
        "answered": sum(p["extracted"] is not None for p in problems),
        "correct_lenient": correct_lenient,
        "heldout_loss": loss,
        "heldout_loss_tokens": loss_tokens,
        "new_tokens": sum(counts),
        "seconds": seconds,
        "tokens_per_s": sum(counts) / seconds,
        "max_new_tokens": max_new_tokens,
        "batch": batch,
        "problems": problems,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "model_dir", type=Path, help="HF folder: config.json, safetensors, tokenizer"
    )
    parser.add_argument("heldout", type=Path, help="heldout.jsonl from integrations.hf.tasks")
    parser.add_argument("--limit", type=int, default=None, help="first N problems only")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="per-problem results (JSON)")
    args = parser.parse_args(argv)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    for path in (args.model_dir / "config.json", args.heldout):
        if not path.exists():
            raise SystemExit(f"{path} does not exist")
    result = evaluate(
        args.model_dir,
        args.heldout,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        batch=args.batch,
    )
    print(
        f"accuracy {result['correct']}/{result['n']} ({100 * result['accuracy']:.1f}%), "
        f"in the answer sentence {result['answered']}/{result['n']}, "
        f"lenient (last number) {result['correct_lenient']}/{result['n']}; "
        f"{result['new_tokens']} tokens in "
        f"{result['seconds']:.1f} s ({result['tokens_per_s']:.1f} tokens/s)"
    )
    if result["heldout_loss"] is not None:
        print(f"held-out loss {result['heldout_loss']:.4f} over "
              f"{result['heldout_loss_tokens']} response tokens")  # fmt: skip
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False, default=str) + "\n")


if __name__ == "__main__":
    main()
