"""Instruction data (`data.source = "instruct"`): exactly the assistant tokens carry loss, checked
against masks built by hand from a tiny offline word-level tokenizer with a ChatML template;
the packed labels at sp = 1 and 2; the target count and the trainer's loss against plain masked
cross-entropy; prompt/response without a template and with bytes; refusals of bad lines and of
a template whose prefixes are not token prefixes."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from paradyse import IGNORE_INDEX, PackedBatch, Trainer, load_config
from paradyse.data import (
    ByteTokenizer,
    DataError,
    GlobalBatches,
    InstructCorpus,
    load_tokenizer,
    open_source,
    target_count,
)

from .layer_cases import mesh_for

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NOT_PREFIX = CHATML.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>bot\n{% endif %}")
"""A generation prompt that is not how the template writes an assistant message."""
SPECIALS = ["[UNK]", "<|im_start|>", "<|im_end|>"]
WORDS = [f"w{i}" for i in range(24)]
VOCAB = {t: i for i, t in enumerate([*SPECIALS, "\n", "system", "user", "assistant", *WORDS])}
START, END, NL = VOCAB["<|im_start|>"], VOCAB["<|im_end|>"], VOCAB["\n"]


def save_tokenizer(folder, template: str | None = CHATML) -> str:
    """A word-level tokenizer (words split on spaces, newlines kept as tokens) saved by
    transformers, eos '<|im_end|>', with `template` as its chat template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", "removed"), pre_tokenizers.Split(Regex("\n"), "isolated")]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(str(folder))
    return str(folder)


def words(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))


def expected_chat(messages: list[dict]) -> tuple[list[int], list[bool]]:
    """ChatML by hand: each message is <|im_start|> role \\n words <|im_end|> \\n; the words and
    <|im_end|> of assistant messages carry loss."""
    ids, loss = [], []
    for m in messages:
        body = [VOCAB[w] for w in m["content"].split()]
        ids += [START, VOCAB[m["role"]], NL, *body, END, NL]
        mine = m["role"] == "assistant"
        loss += [False, False, False] + [mine] * (len(body) + 1) + [False]
    return ids, loss


def conversation(rng: random.Random) -> list[dict]:
    messages = [{"role": "system", "content": words(rng)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        messages += [{"role": "user", "content": words(rng)}]
        messages += [{"role": "assistant", "content": words(rng)}]
    return messages


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def decode(doc: np.ndarray) -> tuple[list[int], list[bool]]:
    """(ids, carries loss) of a stored document: masked tokens are ~id."""
    return [int(t) if t >= 0 else int(~t) for t in doc], [bool(t >= 0) for t in doc]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> str:
    return save_tokenizer(tmp_path_factory.mktemp("chatml"))


@pytest.fixture(scope="module")
def records() -> list[dict]:
    rng = random.Random(7)
    found = [{"messages": conversation(rng)} for _ in range(6)]
    found += [{"prompt": words(rng), "response": words(rng)} for _ in range(4)]
    return found


def expected_of(record: dict) -> tuple[list[int], list[bool]]:
    if "messages" in record:
        return expected_chat(record["messages"])
    turns = [
        {"role": "user", "content": record["prompt"]},
        {"role": "assistant", "content": record["response"]},
    ]
    return expected_chat(turns)


def test_only_assistant_tokens_carry_loss(tmp_path, chat_dir, records) -> None:
    corpus = InstructCorpus(
        write_jsonl(tmp_path / "a.jsonl", records), load_tokenizer(chat_dir, 64)
    )
    assert len(corpus) == len(records)
    for i, record in enumerate(records):
        ids, loss = expected_of(record)
        doc = corpus.tokens(i)
        assert corpus.length(i) == len(ids)
        assert decode(doc) == (ids, loss)
        assert target_count(doc) == sum(loss[1:])


def test_packed_labels_at_sp_1_and_2(tmp_path, chat_dir, records) -> None:
    corpus = InstructCorpus(
        write_jsonl(tmp_path / "a.jsonl", records), load_tokenizer(chat_dir, 64)
    )
    docs = [corpus.tokens(i) for i in range(len(corpus))]
    pieces = [docs[0][:5], docs[0][5:], *docs[1:]]  # a cut document: the mask rides along
    want_ids, want_labels = [], []
    for piece in pieces:
        ids, loss = decode(piece)
        want_ids.append(ids)
        want_labels.append(
            [ids[j + 1] if loss[j + 1] else IGNORE_INDEX for j in range(len(ids) - 1)]
        )
    count = sum(target_count(p) for p in pieces)
    assert count == sum(sum(x != IGNORE_INDEX for x in labels) for labels in want_labels)
    for sp in (1, 2):
        carried = 0
        for rank in range(sp):
            batch = PackedBatch.pack(pieces, sp, rank)
            assert batch.num_loss_tokens == count
            local = batch.layout.local_natural_index.tolist()
            natural_ids, natural_labels = [], []
            starts = list(batch.layout.bounds)[: len(pieces)]
            for start, ids, labels in zip(starts, want_ids, want_labels, strict=True):
                natural_ids += [(start + j, t) for j, t in enumerate(ids)]
                natural_labels += [(start + j, t) for j, t in enumerate(labels)]
            ids_at, labels_at = dict(natural_ids), dict(natural_labels)
            assert batch.input_ids.tolist() == [ids_at.get(k, 0) for k in local]
            assert batch.labels.tolist() == [labels_at.get(k, IGNORE_INDEX) for k in local]
            carried += int(batch.loss_mask.sum())
        assert carried == count


def test_prompt_response_without_template(tmp_path) -> None:
    folder = save_tokenizer(tmp_path / "plain", template=None)
    rng = random.Random(3)
    records = [{"prompt": words(rng), "response": words(rng)} for _ in range(5)]
    corpus = InstructCorpus(write_jsonl(tmp_path / "p.jsonl", records), load_tokenizer(folder, 64))
    for i, r in enumerate(records):
        prompt = [VOCAB[w] for w in r["prompt"].split()]
        response = [VOCAB[w] for w in r["response"].split()] + [END]
        assert decode(corpus.tokens(i)) == (
            prompt + response,
            [False] * len(prompt) + [True] * len(response),
        )
    messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": conversation(rng)}])
    with pytest.raises(DataError, match=r"m.jsonl line 1 has 'messages' but .* no chat template"):
        InstructCorpus(messages, load_tokenizer(folder, 64))


def test_byte_tokenizer(tmp_path) -> None:
    records = [{"prompt": "Say hé", "response": "hé!"}, {"prompt": "", "response": "ok"}]
    source = open_source("instruct", path=write_jsonl(tmp_path / "b.jsonl", records))
    assert isinstance(source.tokenizer, ByteTokenizer)
    for i, r in enumerate(records):
        prompt, response = list(r["prompt"].encode()), list(r["response"].encode())
        want = (prompt + response, [False] * len(prompt) + [True] * len(response))
        assert decode(source.tokens(i)) == want
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match="has 'messages' but tokenizer 'bytes' has no chat"):
        open_source("instruct", path=chat)


def test_records_without_loss_are_left_out(tmp_path, chat_dir) -> None:
    rng = random.Random(5)
    keep = {"prompt": words(rng), "response": words(rng)}
    lines = [
        {"prompt": "w1", "response": ""},
        keep,
        {"messages": [{"role": "user", "content": "w2"}]},
    ]
    path = write_jsonl(tmp_path / "l.jsonl", lines)
    corpus = InstructCorpus(path, load_tokenizer(chat_dir, 64))
    assert len(corpus) == 2  # an empty response still carries its <|im_end|>
    assert decode(corpus.tokens(1)) == expected_of(keep)
    with pytest.raises(DataError, match="no instruction records with a response"):
        empty = write_jsonl(tmp_path / "e.jsonl", [lines[2]])
        open_source("instruct", path=empty, tokenizer=chat_dir, vocab=64)


def test_template_whose_prefixes_are_not_token_prefixes_is_refused(tmp_path) -> None:
    folder = save_tokenizer(tmp_path / "bot", template=NOT_PREFIX)
    path = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "w1", "response": "w2"}])
    with pytest.raises(DataError) as error:
        InstructCorpus(path, load_tokenizer(folder, 64))
    message = str(error.value)
    assert "\n" not in message and "n.jsonl line 1" in message
    assert "does not render the conversation before message 1 as a token prefix" in message


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", "bad.jsonl line 2 is not JSON"),
        ('{"prompt": "w1"}', 'bad.jsonl line 2 has neither "messages" nor "prompt" and "response"'),
        ('["w1"]', 'bad.jsonl line 2 has neither "messages"'),
        ('{"prompt": "w1", "response": 3}', "bad.jsonl line 2: field 'response' is a int"),
        ('{"messages": [{"role": "user"}]}', "bad.jsonl line 2: 'messages' must be a non-empty"),
        ('{"messages": []}', "bad.jsonl line 2: 'messages' must be a non-empty"),
        ('{"messages": "w1"}', "bad.jsonl line 2: 'messages' must be a non-empty"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, chat_dir, line, match) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "w1", "response": "w2"}\n' + line + "\n")
    with pytest.raises(DataError, match=match) as error:
        InstructCorpus(str(path), load_tokenizer(chat_dir, 64))
    assert "\n" not in str(error.value)


def test_missing_path_and_small_vocab(tmp_path, chat_dir) -> None:
    with pytest.raises(DataError, match="needs data.path"):
        open_source("instruct")
    with pytest.raises(DataError, match="does not exist"):
        open_source("instruct", path=str(tmp_path / "nothing.jsonl"))
    with pytest.raises(DataError, match=f"has {len(VOCAB)} tokens but the model's vocab is 16"):
        load_tokenizer(chat_dir, 16)


TINY = [
    "model.hidden=32", "model.heads=2", "model.kv_heads=2", "model.head_dim=16",
    "model.ffn_hidden=64", "model.layers=2", "model.vocab=64", "data.source=instruct",
    "data.max_seq_len=128", "data.tokens_per_rank=512",
    "train.measure_memory=false", "train.progress=false", "parallel.profile=", "train.steps=1",
    "parallel.strategy=local",
]  # fmt: skip


def test_trainer_loss_is_masked_cross_entropy(tmp_path, chat_dir, records) -> None:
    """One step's loss equals cross-entropy over exactly the assistant targets, computed on the
    unmasked ids with the same initial model (a second trainer of the same seed)."""
    path = write_jsonl(tmp_path / "t.jsonl", records)
    epoch = sum(len(expected_of(r)[0]) for r in records)  # one step, one epoch
    data = [f"data.path={path}", f"data.tokenizer={chat_dir}", f"data.tokens_per_step={epoch}"]
    config = load_config(None, [*TINY, *data])
    reference = Trainer(config, mesh=mesh_for(1), log=lambda *_: None)
    docs = reference.batches.next_batch().sequences
    assert len(docs) == len(records)  # the whole file in one step, nothing cut
    want = [expected_of(r) for r in records]
    model, total, count = reference.model, 0.0, 0
    with torch.no_grad():
        for doc in docs:
            ids, loss = decode(doc)
            assert (ids, loss) in want
            batch = PackedBatch.pack([ids], 1, 0)  # no mask: every next token a label
            reference.engine.apply(reference.planner.plan(batch.seq_lens))
            x = model.embedding(batch.input_ids)
            for layer in model.layers:
                x = layer(x, batch)
            logits = model.head(model.norm(x))[: len(ids) - 1]
            keep = torch.tensor(loss[1:])
            target = torch.tensor(ids[1:])
            total += float(F.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    trainer = Trainer(config, mesh=mesh_for(1), log=lambda *_: None)
    record = trainer.train_step()
    assert record["loss_tokens"] == count
    assert record["loss"] == pytest.approx(total / count, rel=1e-5)


def test_stream_of_instruct_pieces_keeps_every_target(tmp_path, chat_dir, records) -> None:
    """Cut into short pieces over many steps, an epoch carries each document's targets less
    the one lost at every cut (a piece's first token is no target)."""
    corpus = open_source("instruct", path=write_jsonl(tmp_path / "s.jsonl", records),
                         tokenizer=chat_dir, vocab=64)  # fmt: skip
    stream = GlobalBatches(corpus, tokens_per_step=16, max_seq_len=8, seed=1)
    seen, targets = 0, 0
    while seen < sum(corpus.length(i) for i in range(len(corpus))):
        batch = stream.next_batch()
        seen += batch.tokens
        targets += batch.targets
    lost = 0
    for i in range(len(corpus)):
        ids, loss = decode(corpus.tokens(i))
        n, pieces = len(ids), -(-len(ids) // 8)
        starts = [p * n // pieces for p in range(pieces)]
        lost += sum(loss[s] for s in starts[1:])
        assert target_count(corpus.tokens(i)) == sum(loss[1:])
    assert targets == sum(target_count(corpus.tokens(i)) for i in range(len(corpus))) - lost
