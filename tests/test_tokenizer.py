"""Tokenizer adapter: offline loading, explicit BOS/EOS, fingerprints, transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from shardloader import ConfigError, ShardDataset, ShardLoader, TextTokenizer, train_bpe_tokenizer
from shardloader.chat_template import ChatRenderer
from shardloader.cli import main as cli_main
from shardloader.pack import PackConfig
from shardloader.tokenizer import CHAT_SPECIAL_TOKENS, DEFAULT_CHAT_TEMPLATE
from tests.conftest import make_docs, write_jsonl


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


# --- the default chat template --------------------------------------------------------------

CONVERSATIONS = [
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "naïve café?"},
        {"role": "assistant", "content": "déjà vu 🙂"},
        {"role": "user", "content": "and then\n\nwhat?"},
        {"role": "assistant", "content": " two lines\nof text "},
    ],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "assistant", "content": "I start."}],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "assistant", "content": "c"},
    ],
]


@pytest.fixture(scope="module")
def chat_tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("chat-tok")
    texts = [d["text"] for d in make_docs(300, seed=3)]
    train_bpe_tokenizer(texts, str(out), vocab_size=500, chat_template=True)
    return out


def test_default_chat_template_and_its_special_tokens(chat_tok_dir, tokenizer_dir):
    hf = AutoTokenizer.from_pretrained(str(chat_tok_dir), local_files_only=True)
    assert hf.chat_template == DEFAULT_CHAT_TEMPLATE
    assert TextTokenizer(str(chat_tok_dir)).chat_template == DEFAULT_CHAT_TEMPLATE
    added = json.loads((chat_tok_dir / "tokenizer.json").read_text())["added_tokens"]
    special = {t["content"] for t in added if t["special"]}
    assert set(CHAT_SPECIAL_TOKENS) <= special
    for token in CHAT_SPECIAL_TOKENS:
        ids = hf(f"x{token}y", add_special_tokens=False)["input_ids"]
        assert hf.convert_tokens_to_ids(token) in ids  # one token, never split
    # without it: no template
    assert TextTokenizer(str(tokenizer_dir)).chat_template is None


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_default_template_is_prefix_stable_and_matches_transformers_mask(chat_tok_dir, index):
    """Our rendering (ids, trained tokens) equals apply_chat_template's assistant mask."""
    hf = AutoTokenizer.from_pretrained(str(chat_tok_dir), local_files_only=True)
    conversation = CONVERSATIONS[index]
    renderer = ChatRenderer(hf)
    rendered = renderer.render_turns(conversation, "conversation")  # refuses unstable prefixes
    ((ids, mask),) = renderer.encode([rendered])
    want = hf.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ids.tolist() == list(want["input_ids"])
    assert mask.astype(int).tolist() == list(want["assistant_masks"])
    assert hf.decode(ids[mask].tolist()) == "".join(
        m["content"] + "<|im_end|>\n" for m in conversation if m["role"] == "assistant"
    )


def test_train_tokenizer_cli_writes_the_default_template_and_says_so(tmp_path, capsys):
    write_jsonl(tmp_path / "corpus.jsonl", make_docs(200, seed=8))
    assert cli_main(["train-tokenizer", str(tmp_path / "corpus.jsonl"), "-o",
                     str(tmp_path / "tok"), "--vocab-size", "400"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "chat template: the default (ChatML-like, special tokens <|im_start|> <|im_end|>)" in out
    assert "--chat-template none leaves it out" in out
    assert TextTokenizer(str(tmp_path / "tok")).chat_template == DEFAULT_CHAT_TEMPLATE
    assert cli_main(["train-tokenizer", str(tmp_path / "corpus.jsonl"), "-o",
                     str(tmp_path / "bare"), "--vocab-size", "400", "--chat-template",
                     "none"]) == 0  # fmt: skip
    assert "chat template: none" in capsys.readouterr().out
    bare = TextTokenizer(str(tmp_path / "bare"))
    assert bare.chat_template is None
    assert "<|im_start|>" not in (tmp_path / "bare" / "tokenizer.json").read_text()


def test_train_tokenizer_reads_chat_files_turn_contents(tmp_path, capsys):
    """A chat corpus (no text field) trains a tokenizer on its turns' contents."""
    write_jsonl(tmp_path / "mixed" / "a.jsonl", make_docs(50, seed=3))
    chats = [
        {
            "conversations": [
                {"from": "human", "value": f"zyxquv {i}"},
                {"from": "gpt", "value": "ok"},
            ]
        }
        for i in range(200)
    ]
    write_jsonl(tmp_path / "mixed" / "b.jsonl", chats)
    assert cli_main(["train-tokenizer", str(tmp_path / "mixed"), "-o", str(tmp_path / "tok"),
                     "--vocab-size", "400"]) == 0  # fmt: skip
    assert "tokenizer written to" in capsys.readouterr().out
    tok = TextTokenizer(str(tmp_path / "tok"))
    # the turn contents were learned (a frequent word is one token); the JSON markup was not
    assert len(tok.encode_batch(["zyxquv"], add_bos=False, add_eos=False)[0]) == 1
    vocab = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["model"]["vocab"]
    assert not any("conversations" in token or '"from' in token for token in vocab)


def test_default_template_end_to_end_offline(tmp_path, capsys):
    """train-tokenizer -> convert chat -> ShardDataset(bfd): labels are transformers' mask."""
    write_jsonl(tmp_path / "corpus.jsonl", make_docs(300, seed=9))
    tok = tmp_path / "tok"
    assert cli_main(["train-tokenizer", str(tmp_path / "corpus.jsonl"), "-o", str(tok),
                     "--vocab-size", "500"]) == 0  # fmt: skip
    conversations = [
        conv
        + [{"role": "user", "content": f"again {i}?"}, {"role": "assistant", "content": f"{i}"}]
        for i in range(10)
        for conv in CONVERSATIONS
    ]
    write_jsonl(tmp_path / "chat" / "c.jsonl", [{"messages": c} for c in conversations])
    out = tmp_path / "out"
    assert cli_main(["convert", str(tmp_path / "chat"), "-o", str(out), "--tokenizer",
                     str(tok), "--num-proc", "1"]) == 0  # fmt: skip
    assert "chat token ids with loss spans" in capsys.readouterr().out
    hf = AutoTokenizer.from_pretrained(str(tok), local_files_only=True)
    want = {}
    for conv in conversations:
        ref = hf.apply_chat_template(
            conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = tuple(ref["input_ids"])
        want[ids] = np.where(np.array(ref["assistant_masks"], bool), ids, -100)
        want[ids][0] = -100  # each document's first token has no label (mask_boundary_labels)
    assert len(want) == len(conversations)
    dataset = ShardDataset(str(out), pack=PackConfig(seq_len=256, mode="bfd"))  # no tokenizer
    seen = 0
    for batch in ShardLoader(dataset, batch_size=2, num_workers=0):
        flat_ids = batch["input_ids"].reshape(-1).numpy()
        flat_labels = batch["labels"].reshape(-1).numpy()
        bounds = batch["cu_seqlens"].tolist()
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            ids = tuple(flat_ids[start:end].tolist())
            if ids not in want:
                assert (flat_labels[start:end] == -100).all()  # padding
                continue
            np.testing.assert_array_equal(flat_labels[start:end], want[ids])
            seen += 1
    assert seen == len(conversations)  # every conversation whole, once


def test_generation_marks_and_prefixes_find_the_same_turns(chat_tok_dir):
    """The default template marks {% generation %}: one render gives the prefix method's spans."""
    from shardloader.chat_template import ChatRenderer, load_chat_tokenizer
    from shardloader.errors import CorpusError

    marked = ChatRenderer(load_chat_tokenizer(str(chat_tok_dir)))
    assert marked.marks_generation
    prefixes = ChatRenderer(load_chat_tokenizer(str(chat_tok_dir)))
    prefixes.marks_generation = False
    for i, conversation in enumerate(CONVERSATIONS):
        got = marked.render_turns(conversation, f"c{i}")
        assert got == prefixes.render_turns(conversation, f"c{i}")
        assert marked.encode([got])[0][1].any()
    with pytest.raises(CorpusError, match="no assistant turn"):
        marked.render_turns([{"role": "user", "content": "hi"}], "lonely")
