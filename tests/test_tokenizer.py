"""Tokenizer adapter: offline loading, explicit BOS/EOS, fingerprints, transformers."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer

from shardloader import ConfigError, TextTokenizer, train_bpe_tokenizer
from tests.conftest import make_docs


def test_byte_level_bpe_round_trips_exactly(tokenizer_dir):
    tok = TextTokenizer(str(tokenizer_dir))
    assert tok.eos_token == "<|endoftext|>"
    texts = [d["text"] for d in make_docs(100, seed=7)] + ["\x00\x01 \t\r\n 🙂 x" * 3]
    for text, ids in zip(texts, tok.encode_batch(texts), strict=True):
        assert ids[-1] == tok.eos_id
        assert tok.decode(ids[:-1]) == text


def test_file_and_directory_load_the_same(tokenizer_dir):
    a = TextTokenizer(str(tokenizer_dir))
    b = TextTokenizer(str(tokenizer_dir / "tokenizer.json"))
    assert a.info.fingerprint == b.info.fingerprint
    assert 300 < a.vocab_size <= 600
    assert a.info.dtype == "uint16"


def test_fingerprint_changes_with_the_vocabulary(tmp_path, tokenizer_dir):
    other = train_bpe_tokenizer(
        [d["text"] for d in make_docs(500, seed=2)], str(tmp_path / "o"), vocab_size=700
    )
    assert (
        TextTokenizer(other).info.fingerprint != TextTokenizer(str(tokenizer_dir)).info.fingerprint
    )
    # choosing another EOS keeps the ids' meaning (the fingerprint) but changes eos_id
    swapped = TextTokenizer(str(tokenizer_dir), eos_token="<|pad|>")
    assert swapped.info.fingerprint == TextTokenizer(str(tokenizer_dir)).info.fingerprint
    assert swapped.eos_id != TextTokenizer(str(tokenizer_dir)).eos_id


def test_transformers_loads_our_tokenizer_offline_with_same_ids(tokenizer_dir):
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    ours = TextTokenizer(str(tokenizer_dir))
    text = make_docs(1, seed=4)[0]["text"]
    assert hf(text, add_special_tokens=False)["input_ids"] == list(
        ours.encode_batch([text], add_eos=False)[0]
    )
    assert hf.eos_token_id == ours.eos_id


def test_missing_and_bad_tokenizers(tmp_path, tokenizer_dir):
    with pytest.raises(ConfigError, match="no tokenizer here"):
        TextTokenizer(str(tmp_path / "nope"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="bad.json: not a readable tokenizer.json"):
        TextTokenizer(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="eos token '<nope>' is not in the vocabulary"):
        TextTokenizer(str(tokenizer_dir), eos_token="<nope>")


def test_no_eos_is_a_clear_error(tmp_path, tokenizer_dir):
    d = tmp_path / "noeos"
    shutil.copytree(tokenizer_dir, d)
    data = json.loads((d / "tokenizer.json").read_text())
    data["added_tokens"] = []
    vocab = data["model"]["vocab"]
    for special in ("<|endoftext|>", "<|pad|>"):
        vocab.pop(special, None)
    (d / "tokenizer.json").write_text(json.dumps(data))
    (d / "tokenizer_config.json").unlink()
    tok = TextTokenizer(str(d))
    assert tok.eos_id is None
    with pytest.raises(ConfigError, match="no EOS token found"):
        tok.encode_batch(["x"])
    assert len(tok.encode_batch(["x"], add_eos=False)[0]) == 1
