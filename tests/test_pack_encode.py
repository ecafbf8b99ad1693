"""Packing text and SFT samples: tokenization, chat templates, label masks, tokenizer checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from transformers import AutoTokenizer

import shardloader
from shardloader.chat_template import mask_to_spans
from shardloader.errors import ConfigError, CorpusError
from shardloader.formats.arrow import arrow_schema
from shardloader.pack import PackConfig, Packer, PackingCollator, collate_rows
from shardloader.pack_encode import SampleEncoder, encode_token_samples
from shardloader.tokenizer import check_tokenizer, tokenizer_fingerprint
from tests.conftest import make_docs, write_jsonl
from tests.test_hostile_shards import edit_manifest, npy, replace_shard, tar_bytes

# A small ChatML-like template: each turn is "<|role|>\n" + content + EOS + "\n".
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "naïve café?"},
    {"role": "assistant", "content": "déjà vu 🙂"},
    {"role": "user", "content": "Ελληνικά"},
    {"role": "assistant", "content": "русский текст"},
]


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir: Path) -> Any:
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def text_tokenizer(tokenizer_dir: Path) -> shardloader.TextTokenizer:
    return shardloader.TextTokenizer(str(tokenizer_dir))


def rows_of(config: PackConfig, samples: list[dict[str, Any]], tokenizer: Any = None) -> list:
    return list(Packer(config, tokenizer=tokenizer).pack(enumerate(samples)))


def labelled_text(batch: dict[str, Any], tokenizer: Any, row: int = 0) -> str:
    labels = batch["labels"][row]
    return str(tokenizer.decode(labels[labels != -100].tolist()))


@pytest.mark.parametrize("mode", ["concat", "bfd"])
def test_text_shards_pack_like_tokenized_shards(tmp_path, tokenizer_dir, hf_tokenizer, mode):
    """Convert one corpus as text and as tokens; packing either gives the same rows."""
    write_jsonl(tmp_path / "in" / "a.jsonl", make_docs(300, seed=4))
    text_out, token_out = tmp_path / "text", tmp_path / "tokens"
    shardloader.convert(
        [str(tmp_path / "in")], shardloader.ConvertConfig(output=str(text_out), num_proc=1)
    )
    shardloader.convert(
        [str(tmp_path / "in")],
        shardloader.ConvertConfig(
            output=str(token_out), num_proc=1, tokenizer=str(tokenizer_dir), shard_samples=70
        ),
    )
    text_samples = list(shardloader.iter_samples(str(text_out)))
    token_samples = list(shardloader.iter_samples(str(token_out)))
    assert "text" in text_samples[0]
    assert "input_ids" in token_samples[0]
    config = PackConfig(seq_len=128, mode=mode, buffer_size=64)
    want = rows_of(config, token_samples)
    for tokenizer in (shardloader.TextTokenizer(str(tokenizer_dir)), hf_tokenizer):
        got = rows_of(config, text_samples, tokenizer)
        assert len(got) == len(want) > 10
        for a, b in zip(got, want, strict=True):
            assert a.input_ids.tolist() == b.input_ids.tolist()
            assert a.sample_ids.tolist() == b.sample_ids.tolist()
            assert a.cursor == b.cursor
    manifest = shardloader.read_manifest(str(token_out))
    check_tokenizer(manifest, hf_tokenizer, where=str(token_out))


def test_bos_and_eos_on_text(text_tokenizer):
    text = "plain ascii words"
    plain = text_tokenizer.encode_batch([text], add_eos=False)[0].tolist()
    for add_bos, add_eos, want in [
        (False, True, [*plain, text_tokenizer.eos_id]),
        (True, False, [text_tokenizer.bos_id, *plain]),
        (False, False, plain),
    ]:
        (doc,) = SampleEncoder(text_tokenizer, add_bos=add_bos, add_eos=add_eos)([{"text": text}])
        assert doc.input_ids.tolist() == want
        assert doc.loss_mask is None


def test_custom_text_field(text_tokenizer):
    (doc,) = SampleEncoder(text_tokenizer, text_field="body")([{"body": "doc 1"}])
    assert text_tokenizer.decode(doc.input_ids) == "doc 1<|endoftext|>"
    with pytest.raises(CorpusError, match=r"sample 'x': none of input_ids, messages"):
        SampleEncoder(text_tokenizer, text_field="body")([{"id": "x", "text": "doc 1"}])
    with pytest.raises(CorpusError, match="field 'body' must be a string, got int"):
        SampleEncoder(text_tokenizer, text_field="body")([{"body": 3}])


def test_prompt_response_without_template_labels_the_response(text_tokenizer):
    samples = [
        {"sample_id": 0, "prompt": "doc 1: naïve café", "response": " déjà vu"},
        {"sample_id": 1, "prompt": "Q? ", "response": "emoji 🙂🚀"},
    ]
    config = PackConfig(seq_len=64, mode="bfd")
    rows = rows_of(config, samples, text_tokenizer)
    assert len(rows) == 1
    batch = collate_rows(rows, config)
    labelled = labelled_text(batch, text_tokenizer)
    assert labelled == " déjà vu<|endoftext|>emoji 🙂🚀<|endoftext|>"
    ids = batch["input_ids"][0, : len(rows[0].input_ids)].tolist()
    assert text_tokenizer.decode(ids) == (
        "doc 1: naïve café déjà vu<|endoftext|>Q? emoji 🙂🚀<|endoftext|>"
    )


def test_chat_messages_label_only_assistant_turns(hf_tokenizer):
    config = PackConfig(seq_len=256, mode="bfd")
    rows = rows_of(config, [{"sample_id": 5, "messages": CHAT}], hf_tokenizer)
    (row,) = rows
    rendered = hf_tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert hf_tokenizer.decode(row.input_ids.tolist()) == rendered
    # the ids are exactly those of the whole rendered conversation
    assert row.input_ids.tolist() == hf_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    batch = collate_rows(rows, config)
    assert (
        labelled_text(batch, hf_tokenizer)
        == "déjà vu 🙂<|endoftext|>\nрусский текст<|endoftext|>\n"
    )
    # prompt tokens (system, user turns, role headers) never get a loss
    for turn in ("Answer", "Ελληνικά", "<|user|>", "<|assistant|>"):
        assert turn not in labelled_text(batch, hf_tokenizer)


def test_prompt_response_with_template_is_a_two_turn_chat(hf_tokenizer):
    sample = {"prompt": "naïve café?", "response": "déjà vu"}
    (doc,) = SampleEncoder(hf_tokenizer)([sample])
    chat = [
        {"role": "user", "content": sample["prompt"]},
        {"role": "assistant", "content": "déjà vu"},
    ]
    rendered = hf_tokenizer.apply_chat_template(chat, tokenize=False)
    assert hf_tokenizer.decode(doc.input_ids.tolist()) == rendered
    assert doc.loss_mask is not None
    assert hf_tokenizer.decode(doc.input_ids[doc.loss_mask].tolist()) == "déjà vu<|endoftext|>\n"


def test_sft_examples_stay_whole_when_packed(hf_tokenizer):
    samples = [
        {"sample_id": i, "prompt": f"question {i} " * (i % 5 + 1), "response": f"answer {i}"}
        for i in range(40)
    ]
    config = PackConfig(seq_len=96, mode="bfd", buffer_size=16)
    rows = rows_of(config, samples, hf_tokenizer)
    per_sample = {i: SampleEncoder(hf_tokenizer)([s])[0] for i, s in enumerate(samples)}
    batch = collate_rows(rows, config)
    for r, row in enumerate(rows):
        start = 0
        for n, sample_id in zip(row.segment_lengths, row.sample_ids, strict=True):
            doc = per_sample[int(sample_id)]
            assert n == len(doc.input_ids)  # whole
            labels = batch["labels"][r, start : start + n].numpy()
            want = np.where(doc.loss_mask, doc.input_ids, -100)
            want[0] = -100
            np.testing.assert_array_equal(labels, want)
            start += n


def test_chat_needs_a_template(text_tokenizer, tokenizer_dir):
    with pytest.raises(ConfigError, match="chat messages need a tokenizer with a chat template"):
        SampleEncoder(text_tokenizer)([{"messages": CHAT}])
    bare = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    with pytest.raises(ConfigError, match="has none; load it with transformers.AutoTokenizer"):
        SampleEncoder(bare)([{"messages": CHAT}])


def test_templates_that_rewrite_earlier_turns_are_refused(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    # Drops the content of every assistant turn but the last, as some reasoning templates do.
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|assistant|>\\n' + eos_token }}{% else %}"
        "{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    )
    with pytest.raises(ConfigError, match="renders turn 2 differently once later turns follow"):
        SampleEncoder(tok)([{"id": "c1", "messages": CHAT}])


def test_malformed_sft_records(hf_tokenizer):
    encode = SampleEncoder(hf_tokenizer)
    with pytest.raises(CorpusError, match="'c1': no assistant turn"):
        encode([{"id": "c1", "messages": CHAT[:2]}])
    with pytest.raises(CorpusError, match="messages must be a list of"):
        encode([{"id": "c2", "messages": ["hi"]}])


def test_text_needs_a_tokenizer():
    with pytest.raises(CorpusError, match="no input_ids; pass a tokenizer"):
        PackingCollator(PackConfig(seq_len=8))([{"text": "hello"}])
    with pytest.raises(ConfigError, match="neither a shardloader.TextTokenizer nor"):
        SampleEncoder(object())


def test_fingerprint_check_names_both(tmp_path, tokenizer_dir, hf_tokenizer, text_tokenizer):
    assert tokenizer_fingerprint(hf_tokenizer) == text_tokenizer.info.fingerprint
    write_jsonl(tmp_path / "in" / "a.jsonl", make_docs(20, seed=5))
    out = tmp_path / "tokens"
    shardloader.convert(
        [str(tmp_path / "in")],
        shardloader.ConvertConfig(output=str(out), num_proc=1, tokenizer=str(tokenizer_dir)),
    )
    manifest = shardloader.read_manifest(str(out))
    check_tokenizer(manifest, text_tokenizer, where=str(out))
    other_dir = tmp_path / "other"
    shardloader.train_bpe_tokenizer(
        [d["text"] for d in make_docs(200)], str(other_dir), vocab_size=300
    )
    other = shardloader.TextTokenizer(str(other_dir))
    with pytest.raises(ConfigError) as info:
        check_tokenizer(manifest, other, where=str(out))
    message = str(info.value)
    assert message.startswith(f"{out}: shards were tokenized with the tokenizer of fingerprint")
    assert manifest.tokenizer is not None
    assert manifest.tokenizer["fingerprint"] in message
    assert other.info.fingerprint in message
    assert str(other_dir) in message
    # text shards record no tokenizer: any tokenizer may encode them
    text_out = tmp_path / "text"
    shardloader.convert(
        [str(tmp_path / "in")], shardloader.ConvertConfig(output=str(text_out), num_proc=1)
    )
    check_tokenizer(shardloader.read_manifest(str(text_out)), other, where=str(text_out))


# --- input_ids + loss_spans (chat rendered at conversion) -----------------------------------


def test_loss_spans_become_the_mask():
    ids = np.arange(10, dtype=np.uint16)
    samples = [
        {"id": "a", "input_ids": ids, "loss_spans": [[2, 4], [4, 5], [8, 10]]},
        {"id": "b", "input_ids": ids, "loss_spans": []},
        {"id": "c", "input_ids": ids},
    ]
    for encode in (encode_token_samples, SampleEncoder()):
        a, b, c = encode(samples)
        assert a.loss_mask is not None
        assert np.flatnonzero(a.loss_mask).tolist() == [2, 3, 4, 8, 9]
        assert b.loss_mask is not None
        assert not b.loss_mask.any()
        assert c.loss_mask is None
    assert mask_to_spans(np.array([1, 1, 0, 1, 0, 0, 1], bool)) == [[0, 2], [3, 4], [6, 7]]
    assert mask_to_spans(np.zeros(3, bool)) == []


BAD_SPANS = [
    (None, "loss_spans is NoneType, expected a list of"),
    ("[[0, 1]]", "loss_spans is str, expected a list of"),
    ([[0, 1, 2]], r"loss_spans\[0\] is \[0, 1, 2\], expected \[start, end\]"),
    ([[0]], r"loss_spans\[0\] is \[0\], expected"),
    ([(0, 1)], r"loss_spans\[0\] is \(0, 1\), expected"),
    ([[0, 1.0]], r"loss_spans\[0\] is \[0, 1.0\], expected \[start, end\] \(two integers\)"),
    ([[False, True]], r"loss_spans\[0\] is \[False, True\]"),
    ([[-1, 2]], r"loss_spans\[0\] is \[-1, 2\], outside 0 <= start < end <= 10"),
    ([[3, 3]], r"loss_spans\[0\] is \[3, 3\], outside"),
    ([[5, 11]], r"loss_spans\[0\] is \[5, 11\], outside 0 <= start < end <= 10"),
    ([[4, 6], [2, 3]], r"loss_spans\[1\] \[2, 3\] starts before the previous span's end 6"),
    ([[0, 5], [4, 6]], r"loss_spans\[1\] \[4, 6\] starts before the previous span's end 5"),
    ([[0, 1]] * 2, r"loss_spans\[1\] \[0, 1\] starts before"),
]


@pytest.mark.parametrize(("spans", "match"), BAD_SPANS)
def test_malformed_loss_spans_are_refused_naming_the_sample(spans, match):
    sample = {"id": "conv-7", "input_ids": np.arange(10, dtype=np.uint16), "loss_spans": spans}
    for encode in (encode_token_samples, SampleEncoder()):
        with pytest.raises(CorpusError, match=match) as info:
            encode([sample])
        assert str(info.value).startswith("sample 'conv-7': loss_spans")


@pytest.mark.parametrize("fmt", ["arrow", "tar"])
def test_hand_made_shard_with_bad_loss_spans_is_refused_naming_the_sample(
    tmp_path, tokenizer_dir, fmt
):
    """A shard whose loss_spans point past the sample's tokens: streaming packed names it."""
    write_jsonl(tmp_path / "in" / "a.jsonl", make_docs(3, seed=2))
    out = tmp_path / "out"
    shardloader.convert(
        [str(tmp_path / "in")],
        shardloader.ConvertConfig(
            output=str(out), num_proc=1, tokenizer=str(tokenizer_dir), format=fmt,
            compression="none", keep_fields=("spans:json",),
        ),
    )  # fmt: skip
    # Rename the kept json field to loss_spans and fill it in: spans for two good samples and
    # one bad (past the end of its 3 ids).
    ids = [np.array([5, 6, 7], np.uint16)] * 3
    spans = [[[1, 3]], [[0, 1], [2, 3]], [[2, 4]]]
    names = ["good-0", "good-1", "bad-2"]
    if fmt == "arrow":
        schema = arrow_schema(
            {"id": "string", "input_ids": "tokens", "loss_spans": "json"}, "uint16"
        )
        table = pa.table(
            [
                pa.array(names),
                pa.array([i.tolist() for i in ids], pa.list_(pa.uint16())),
                pa.array([json.dumps(s) for s in spans]),
            ],
            schema=schema,
        )
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, schema) as writer:
            writer.write_table(table)
        data = sink.getvalue().to_pybytes()
    else:
        members: list[Any] = []
        for k, (name, i, s) in enumerate(zip(names, ids, spans, strict=True)):
            key = f"shard-00000-0000-{k:07d}"
            members.append((f"{key}.json", json.dumps({"id": name, "loss_spans": s}).encode()))
            members.append((f"{key}.npy", npy(i)))
        data = tar_bytes(members)
    replace_shard(out, data, 3)

    def rename(doc: dict[str, Any]) -> None:
        doc["fields"] = {"id": "string", "input_ids": "tokens", "loss_spans": "json"}

    edit_manifest(out, rename)
    config = shardloader.StreamConfig(shuffle=False)
    dataset = shardloader.ShardDataset(str(out), config=config, pack=PackConfig(seq_len=4))
    with pytest.raises(CorpusError) as info:
        list(dataset)
    assert str(info.value) == (
        "sample 'bad-2': loss_spans[0] is [2, 4], outside 0 <= start < end <= 3 (the sample's"
        " token count)"
    )
    # the good samples alone pack, their masks from the spans
    rows = rows_of(
        PackConfig(seq_len=3, mode="bfd"),
        list(shardloader.iter_samples(str(out)))[:2],
    )
    assert sorted(r.loss_mask.tolist() for r in rows) == [
        [False, True, True],
        [True, False, True],
    ]
