"""Task data for fine-tuning and evaluating a Hugging Face model: reasoning_gym problems, offline.

    python -m integrations.hf.tasks --task chain_sum --seed 0 --train 400 --heldout 100 --out DIR

writes two JSON-lines files:

- ``DIR/train.jsonl``: ``{"prompt", "response"}`` lines, what the ``instruct`` data source reads.
  The prompt is the question plus ``INSTRUCTION``; the response is a short worked solution where the
  task gives one (chain_sum and leg_counting are worked here, gsm_symbolic carries its own) and
  always ends with the sentence "The answer is <answer>."
- ``DIR/heldout.jsonl``: ``{"prompt", "response", "answer", "task", "index", "metadata"}`` lines
  (the response for the held-out loss), what
  ``integrations.hf.evaluate`` needs to score a generation with the task's own checker.

reasoning_gym draws item ``i`` of a dataset with seed ``s`` from ``Random(s + i)``, so the train
set uses seeds ``[seed, seed + n)`` and the held-out set seeds from ``seed + HELDOUT_OFFSET`` on:
the two never share a seed. Questions are also de-duplicated (within each split and against each
other), so a problem that two seeds happen to draw alike is held out, never trained on. The same
arguments always write the same files.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

INSTRUCTION = "End your response with the sentence: The answer is <answer>."
"""Appended to every question; the fixed form `extract_answer` reads back. It is the sentence the
base SmolLM2-135M-Instruct already tends to write, so the base score measures the arithmetic, not
obedience to an unfamiliar format."""

HELDOUT_OFFSET = 1_000_000
"""Held-out seeds start this far after the train seed; the train set may not be larger."""

TASK_OPTIONS: dict[str, dict[str, Any]] = {
    "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
    "basic_arithmetic": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
    "leg_counting": {"min_animals": 2, "max_animals": 3, "max_instances": 5},
}
"""Difficulty settings for a 135M-parameter model (reasoning_gym's defaults are for large ones);
a task not named here uses reasoning_gym's defaults. `--option key=value` overrides either."""

_ANSWER_SENTENCE = re.compile(r"the answer is:?[ \t]*((?:(?!the answer is)[^\n])*)", re.IGNORECASE)
_SENTENCE_GOES_ON = re.compile(r"[,;]\s|\.\s")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The answer in the last "The answer is ..." sentence of a generation that has one, or None.

    The sentence ends at the line's end, at its last period, or where it goes on after a comma,
    semicolon or period ("The answer is 12, which ..." reads as "12"); markdown emphasis and $
    around the answer are dropped. Anything else is returned as written, for the checker to judge.
    """
    for found in reversed(_ANSWER_SENTENCE.findall(text)):
        answer = _SENTENCE_GOES_ON.split(found, maxsplit=1)[0].strip()
        answer = answer.removesuffix(".").strip().strip("*$").strip()
        if answer:
            return answer
    return None


def last_number(text: str) -> str | None:
    """The last number in a generation: the lenient reading, for a model not taught the format.

    Reported beside the strict score so that a gain from learning the answer sentence can be
    told apart from a gain in getting the number right.
    """
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def score(task: str, answer: str | None, row: dict[str, Any]) -> float:
    """The task checker's score for an extracted answer (1.0 is an exact match).

    ``row`` is a held-out line; reasoning_gym's checkers read its ``answer`` and ``metadata``.
    """
    import reasoning_gym

    if answer is None:
        return 0.0
    entry = {"question": row["prompt"], "answer": row["answer"], "metadata": row["metadata"]}
    return float(reasoning_gym.get_score_answer_fn(task)(answer, entry))


def _chain_sum_solution(entry: dict[str, Any]) -> str:
    # "4 - 1 - 7" -> "4 - 1 = 3\n3 - 7 = -4": one line per operation, left to right.
    tokens = entry["metadata"]["expression"].split()
    total, lines = int(tokens[0]), []
    for op, term in zip(tokens[1::2], tokens[2::2], strict=True):
        new = total + int(term) if op == "+" else total - int(term)
        lines.append(f"{total} {op} {term} = {new}")
        total = new
    return "\n".join(lines) if str(total) == entry["answer"] else ""


def _leg_counting_solution(entry: dict[str, Any]) -> str:
    from reasoning_gym.arithmetic.leg_counting import ANIMALS

    animals = entry["metadata"]["animals"]
    parts = [(name, count, count * ANIMALS[name]) for name, count in animals.items()]
    lines = [f"{name}: {count} * {ANIMALS[name]} = {legs}" for name, count, legs in parts]
    total = sum(legs for _, _, legs in parts)
    lines.append(" + ".join(str(legs) for _, _, legs in parts) + f" = {total}")
    return "\n".join(lines) if str(total) == entry["answer"] else ""


def _gsm_symbolic_solution(entry: dict[str, Any]) -> str:
    cot = entry["metadata"].get("answer_cot", "")
    return re.sub(r"\n?#### .*$", "", cot.strip()).strip()


_SOLUTIONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "chain_sum": _chain_sum_solution,
    "leg_counting": _leg_counting_solution,
    "gsm_symbolic": _gsm_symbolic_solution,
}


def make_prompt(question: str) -> str:
    """The user message: the question, then the answer-format instruction."""
    return f"{question.strip()}\n\n{INSTRUCTION}"


def make_response(task: str, entry: dict[str, Any]) -> str:
    """The assistant message: a worked solution where there is one, ending in the sentence
    ``The answer is <answer>.``"""
    solution = _SOLUTIONS[task](entry) if task in _SOLUTIONS else ""
    final = f"The answer is {entry['answer']}."
    return f"{solution}\n{final}" if solution else final


def _entries(task: str, seed: int, options: dict[str, Any], limit: int) -> Iterator[dict[str, Any]]:
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(task, seed=seed, size=limit, **options)
    for index in range(limit):
        yield {**dataset[index], "index": index}


def _draw(
    task: str, seed: int, options: dict[str, Any], count: int, exclude: set[str]
) -> list[dict[str, Any]]:
    """`count` entries whose questions are not in `exclude` (which grows), from seed, seed+1..."""
    limit = 4 * count + 64
    picked: list[dict[str, Any]] = []
    for entry in _entries(task, seed, options, limit):
        if len(picked) == count:
            break
        if entry["question"] in exclude:
            continue
        exclude.add(entry["question"])
        picked.append(entry)
    if len(picked) < count:
        raise SystemExit(
            f"{task}: only {len(picked)} distinct problems in {limit} seeds; ask for fewer "
            "or widen the task's difficulty with --option"
        )
    return picked


def build(
    task: str, seed: int, n_train: int, n_heldout: int, options: dict[str, Any] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The train and held-out rows (held-out drawn first, so it does not depend on `n_train`)."""
    if 4 * n_train + 64 > HELDOUT_OFFSET:
        raise SystemExit(f"--train {n_train} is too large; the train seeds would reach held-out")
    options = {**TASK_OPTIONS.get(task, {}), **(options or {})}
    seen: set[str] = set()
    heldout = _draw(task, seed + HELDOUT_OFFSET, options, n_heldout, seen)
    train = _draw(task, seed, options, n_train, seen)
    train_rows = [
        {"prompt": make_prompt(e["question"]), "response": make_response(task, e)} for e in train
    ]
    heldout_rows = [
        {
            "prompt": make_prompt(e["question"]),
            "response": make_response(task, e),
            "answer": e["answer"],
            "task": task,
            "index": e["index"],
            "metadata": e["metadata"],
        }
        for e in heldout
    ]
    return train_rows, heldout_rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object a line, keys in insertion order, non-ASCII kept as is."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (blank lines skipped)."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--option {text!r}: write key=value")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, help="a reasoning_gym dataset name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, required=True, help="train problems")
    parser.add_argument("--heldout", type=int, required=True, help="held-out problems")
    parser.add_argument("--out", type=Path, required=True, help="folder for the two files")
    parser.add_argument(
        "--option", type=_parse_option, action="append", default=[], help="dataset key=value"
    )
    args = parser.parse_args(argv)
    train, heldout = build(args.task, args.seed, args.train, args.heldout, dict(args.option))
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "heldout.jsonl", heldout)
    print(f"{args.task}: {len(train)} train, {len(heldout)} held-out problems in {args.out}")


if __name__ == "__main__":
    main()
