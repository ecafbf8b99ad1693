"""Converting chat and instruction data: shapes, detection, bad records, packing end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from transformers import AutoTokenizer

import shardloader
from shardloader import ConfigError, ConvertConfig, CorpusError
from shardloader.chat_template import mask_to_spans, template_hash
from shardloader.pack import PackConfig
from shardloader.pack_encode import SampleEncoder, encode_token_samples
from shardloader.tokenizer import check_tokenizer
from tests.conftest import published, write_jsonl, write_parquet
from tests.test_pack_encode import CHAT, CHAT_TEMPLATE

MESSAGES = CHAT  # system, user, assistant, user, assistant; non-ASCII text


def sys_(c: str) -> dict[str, str]:
    return {"role": "system", "content": c}


def user(c: str) -> dict[str, str]:
    return {"role": "user", "content": c}


def bot(c: str) -> dict[str, str]:
    return {"role": "assistant", "content": c}


# Each shape: its records and the messages they normalize to.
SHAPES: dict[str, tuple[list[dict[str, Any]], list[list[dict[str, str]]]]] = {
    "messages": (
        [{"id": "m0", "messages": MESSAGES}, {"id": "m1", "messages": [user("q"), bot("a")]}],
        [MESSAGES, [user("q"), bot("a")]],
    ),
    "sharegpt": (
        [
            {
                "id": "s0",
                "conversations": [
                    {"from": "system", "value": "Be kind."},
                    {"from": "human", "value": "hi"},
                    {"from": "gpt", "value": "hello"},
                    {"from": "human", "value": "more"},
                    {"from": "gpt", "value": "sure"},
                ],
            }
        ],
        [[sys_("Be kind."), user("hi"), bot("hello"), user("more"), bot("sure")]],
    ),
    "alpaca": (
        [
            {"instruction": "Translate.", "input": "chat", "output": "cat"},
            {"instruction": "Say hi.", "input": "", "output": "hi"},
            {"instruction": "Count.", "output": "1 2 3"},
        ],
        [
            [user("Translate.\n\nchat"), bot("cat")],
            [user("Say hi."), bot("hi")],
            [user("Count."), bot("1 2 3")],
        ],
    ),
    "prompt_response": (
        [{"id": 7, "prompt": "2+2?", "response": "4"}],
        [[user("2+2?"), bot("4")]],
    ),
}


def convert(tmp_path: Path, records: list[Any], **kw: Any) -> shardloader.ConvertResult:
    src = tmp_path / "in" / "chat.jsonl"
    if all(isinstance(r, str) for r in records):
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text("".join(r + "\n" for r in records))
    else:
        write_jsonl(src, records)
    kw.setdefault("num_proc", 1)
    return shardloader.convert(str(src), ConvertConfig(output=str(tmp_path / "out"), **kw))


def read_back(tmp_path: Path) -> list[dict[str, Any]]:
    return list(shardloader.iter_samples(str(tmp_path / "out")))


@pytest.mark.parametrize("fmt", ["arrow", "tar"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_shape_reads_back_as_messages(tmp_path, shape, fmt):
    records, want = SHAPES[shape]
    result = convert(tmp_path, records, format=fmt)
    manifest = result.manifest
    assert manifest is not None
    assert dict(manifest.fields) == {"id": "string", "messages": "json"}
    assert manifest.config["schema"] == shape  # detected
    samples = read_back(tmp_path)
    assert [s["messages"] for s in samples] == want
    if shape == "alpaca":
        assert [s["id"] for s in samples] == ["chat.jsonl:1", "chat.jsonl:2", "chat.jsonl:3"]
    if shape == "prompt_response":
        assert samples[0]["id"] == "7"


def test_arrow_shards_open_with_pyarrow_as_json_text(tmp_path):
    records, want = SHAPES["messages"]
    convert(tmp_path, records)
    (shard,) = (tmp_path / "out").glob("*.arrow")
    table = pa.ipc.open_file(str(shard)).read_all()
    assert table.column_names == ["id", "messages"]
    assert [json.loads(v) for v in table.column("messages").to_pylist()] == want


def test_tar_shards_hold_messages_in_the_json_member(tmp_path):
    records, want = SHAPES["sharegpt"]
    convert(tmp_path, records, format="tar", compression="none")
    (shard,) = (tmp_path / "out").glob("*.tar")
    with tarfile.open(shard) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile(names[0]).read())  # type: ignore[union-attr]
    assert names == ["shard-00000-0000-0000000.json"]
    assert meta == {"id": "s0", "messages": want[0]}


def test_kept_fields_travel_with_chat_records(tmp_path):
    records = [{"id": "a", "lang": "en", "messages": [user("q"), bot("a")]}]
    for fmt in ("arrow", "tar"):
        convert(tmp_path, records, keep_fields=("lang", "meta:json"), format=fmt, overwrite=True)
        (sample,) = read_back(tmp_path)
        assert sample["lang"] == "en"
        assert sample["meta"] is None
        assert sample["messages"] == [user("q"), bot("a")]


def test_parquet_chat_columns(tmp_path):
    write_parquet(
        tmp_path / "in" / "a.parquet",
        [
            {"id": "p0", "messages": [user("q"), bot("a")]},
            {"id": "p1", "messages": MESSAGES},
        ],
    )
    result = shardloader.convert(
        str(tmp_path / "in"), ConvertConfig(output=str(tmp_path / "out"), num_proc=1)
    )
    assert [s["messages"] for s in read_back(tmp_path)] == [[user("q"), bot("a")], MESSAGES]
    # "bytes in" counts the conversations (their turns as JSON), not 0 for want of a text column
    turns = [[user("q"), bot("a")], MESSAGES]
    want = sum(len(json.dumps(t, ensure_ascii=False)) for t in turns)
    assert want // 2 < result.num_input_bytes <= 2 * want


def test_a_lone_surrogate_in_a_conversation_names_its_field(tmp_path):
    line = '{"id": "s", "conversations": [{"from": "human", "value": "hi \\ud800"}, ' + (
        '{"from": "gpt", "value": "ok"}]}'
    )
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "c.jsonl").write_text(line + "\n")
    with pytest.raises(CorpusError, match=r"c\.jsonl:1: field 'conversations' holds a lone"):
        shardloader.convert(
            str(tmp_path / "in"), ConvertConfig(output=str(tmp_path / "out"), num_proc=1)
        )


def test_schema_flag_overrides_detection(tmp_path):
    records = [{"text": "t", "prompt": "p", "response": "r"}]
    result = convert(tmp_path, records)
    assert result.manifest is not None
    assert result.manifest.config["schema"] == "text"
    assert read_back(tmp_path)[0]["text"] == "t"
    result = convert(tmp_path, records, schema="prompt_response", overwrite=True)
    assert read_back(tmp_path)[0]["messages"] == [user("p"), bot("r")]


def test_text_corpus_is_detected_as_text(tmp_path):
    result = convert(tmp_path, [{"text": "hello"}])
    assert result.manifest is not None
    assert dict(result.manifest.fields) == {"id": "string", "text": "string"}


def test_detection_looks_past_blank_and_broken_first_lines(tmp_path):
    lines = ["", "{not json", json.dumps({"messages": [user("q"), bot("a")]})]
    result = convert(tmp_path, lines, on_bad_record="skip")
    assert result.manifest is not None
    assert result.manifest.config["schema"] == "messages"
    assert dict(result.manifest.skipped) == {"bad_json": 1}


def test_wrong_shape_for_the_forced_schema(tmp_path):
    with pytest.raises(CorpusError, match=r"chat\.jsonl:1: field 'conversations' is missing"):
        convert(tmp_path, [{"messages": [user("q"), bot("a")]}], schema="sharegpt")


def test_cli_schema_flag(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "response": "r", "text": "t"}])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "shardloader", "convert", str(src), "-o", str(out)]
    run = subprocess.run([*cmd, "--schema", "prompt_response", "--num-proc", "1"], text=True,
                         capture_output=True, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "chat messages" in run.stdout
    assert read_back(tmp_path)[0]["messages"] == [user("p"), bot("r")]


def test_tokenizer_without_a_chat_template_is_refused_by_name(tmp_path, tokenizer_dir):
    records = [{"messages": [user("q"), bot("a")]}]
    with pytest.raises(ConfigError) as info:
        convert(tmp_path, records, tokenizer=str(tokenizer_dir))
    assert str(info.value).startswith(f"{tokenizer_dir}: the tokenizer has no chat template")
    with pytest.raises(ConfigError, match="'messages' is where chat data is stored"):
        ConvertConfig(output="x", schema="messages", keep_fields=("messages:json",))


GOOD = {"messages": [user("q"), bot("a")]}
BAD = {
    "unknown_role": (
        {"messages": [{"role": "robot", "content": "x"}, bot("a")]},
        "bad_role",
        "messages[0] has unknown role 'robot'",
    ),
    "missing_role": (
        {"messages": [{"content": "x"}, bot("a")]},
        "bad_role",
        "messages[0] has no role",
    ),
    "sharegpt_role": (
        {"conversations": [{"from": "bard", "value": "x"}, {"from": "gpt", "value": "y"}]},
        "bad_role",
        "conversations[0] has unknown role 'bard'",
    ),
    "non_string_content": (
        {"messages": [{"role": "user", "content": ["x"]}, bot("a")]},
        "bad_content",
        "messages[0] 'content' is an array, expected a string",
    ),
    "alpaca_non_string": (
        {"instruction": "i", "input": 3, "output": "o"},
        "bad_content",
        "field 'input' is a number",
    ),
    "empty_assistant": (
        {"messages": [user("q"), bot(""), user("r"), bot("b")]},
        "empty_assistant_turn",
        "turn 1 (assistant) is empty",
    ),
    "empty_alpaca_output": (
        {"instruction": "i", "output": ""},
        "empty_assistant_turn",
        "turn 1 (assistant) is empty",
    ),
    "ends_with_user": (
        {"messages": [user("q"), bot("a"), user("r")]},
        "not_ending_with_assistant",
        "the conversation ends with a user turn",
    ),
    "no_assistant": (
        {"messages": [sys_("s"), user("q")]},
        "no_assistant_turn",
        "the conversation has no assistant turn",
    ),
    "wrong_shape": (
        {"messages": "hello"},
        "bad_chat_shape",
        "field 'messages' is a string, expected an array of turns",
    ),
    "empty_conversation": (
        {"messages": []},
        "bad_chat_shape",
        "field 'messages' is an empty array",
    ),
    "turn_not_object": (
        {"messages": ["hi", bot("a")]},
        "bad_chat_shape",
        "messages[0] is a string, expected an object",
    ),
}


def _first_good(case: dict[str, Any]) -> dict[str, Any]:
    """A good record of the bad case's shape, so detection finds that shape."""
    if "conversations" in case:
        return {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    if "instruction" in case:
        return {"instruction": "q", "output": "a"}
    return GOOD


@pytest.mark.parametrize("name", list(BAD))
def test_bad_conversation_stops_naming_file_line(tmp_path, name):
    record, _, words = BAD[name]
    with pytest.raises(CorpusError) as info:
        convert(tmp_path, [_first_good(record), record])
    message = str(info.value)
    assert f"chat.jsonl:2: {words}" in message
    assert "--on-bad-record=skip" in message


@pytest.mark.parametrize("name", list(BAD))
def test_bad_conversation_is_counted_under_skip(tmp_path, name):
    record, kind, words = BAD[name]
    good = _first_good(record)
    result = convert(tmp_path, [good, record, good], on_bad_record="skip")
    manifest = result.manifest
    assert manifest is not None
    assert dict(manifest.skipped) == {kind: 1}
    assert manifest.skipped_examples[0].startswith(f"{tmp_path / 'in' / 'chat.jsonl'}:2: {kind}")
    assert words in manifest.skipped_examples[0]
    assert len(read_back(tmp_path)) == 2


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A small BPE tokenizer trained here, with a ChatML-like template."""
    out = tmp_path_factory.mktemp("chat-tok")
    texts = [m["content"] for m in MESSAGES] * 20 + ["the quick brown fox jumps"] * 20
    shardloader.train_bpe_tokenizer(texts, str(out), vocab_size=300)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_end_to_end_pack_trains_only_assistant_replies(tmp_path, chat_tokenizer):
    """Convert a chat JSONL of mixed good and bad records, pack it: labels are the replies."""
    sharegpt = {
        "id": "g",
        "conversations": [{"from": "human", "value": "fox?"}, {"from": "gpt", "value": "quick"}],
    }
    records = [
        {"id": "a", "messages": MESSAGES},
        {"id": "b", "messages": [user("brown?"), bot("the fox")]},
        {"id": "bad", "messages": [user("q"), bot("a"), user("no reply")]},
    ]
    result = convert(tmp_path, records, on_bad_record="skip")
    assert result.manifest is not None
    assert dict(result.manifest.skipped) == {"not_ending_with_assistant": 1}
    write_jsonl(tmp_path / "g" / "g.jsonl", [sharegpt])
    shardloader.convert(
        str(tmp_path / "g"), ConvertConfig(output=str(tmp_path / "gout"), num_proc=1)
    )
    eos = chat_tokenizer.eos_token
    for out, replies, prompts in (
        (
            tmp_path / "out",
            [["déjà vu 🙂", "русский текст"], ["the fox"]],
            ["Answer briefly.", "naïve café?", "Ελληνικά", "brown?", "<|user|>", "<|system|>"],
        ),
        (tmp_path / "gout", [["quick"]], ["fox?", "<|user|>", "<|assistant|>"]),
    ):
        dataset = shardloader.ShardDataset(
            str(out),
            pack=PackConfig(seq_len=128, mode="bfd"),
            tokenizer=chat_tokenizer,
        )
        batches = list(shardloader.ShardLoader(dataset, batch_size=4, num_workers=0))
        labelled, whole = [], []
        for batch in batches:
            for row in range(batch["input_ids"].shape[0]):
                ids, labels = batch["input_ids"][row], batch["labels"][row]
                whole.append(chat_tokenizer.decode(ids.tolist()))
                labelled.append(chat_tokenizer.decode(labels[labels != -100].tolist()))
        text = "".join(labelled)
        want = "".join(f"{r}{eos}\n" for conv in replies for r in conv)
        assert sorted(text.split("\n")) == sorted(want.split("\n"))
        # the labels are exactly the replies (each with the template's end of turn), so every
        # other token is -100; the prompts (system, user turns, role headers) are in the rows
        assert text.replace("\n", "")
        assert sorted(text.split("\n")) == sorted(want.split("\n"))
        rows = "".join(whole)
        for prompt in prompts:
            assert prompt in rows
            assert prompt not in text


# --- chat rendered at conversion (--tokenizer with a chat template) ---------------------------


def _tokenizer_with_template(out: Path, template: str | None) -> Path:
    """A small BPE tokenizer trained here: the default chat template, or ``template``."""
    texts = [m["content"] for m in MESSAGES] * 20 + ["the quick brown fox jumps"] * 20
    shardloader.train_bpe_tokenizer(texts, str(out), vocab_size=300, chat_template=True)
    if template is not None:
        config = json.loads((out / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def default_tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tokenizer_with_template(tmp_path_factory.mktemp("tok-default"), None)


@pytest.fixture(scope="module")
def eos_tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same vocabulary with another template (turns end with EOS, no generation tags)."""
    return _tokenizer_with_template(tmp_path_factory.mktemp("tok-eos"), CHAT_TEMPLATE)


def load_hf(path: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


@pytest.mark.parametrize("fmt", ["arrow", "tar"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_rendered_chat_equals_read_time_rendering(tmp_path, default_tok_dir, shape, fmt):
    """Stored ids and spans are exactly what SampleEncoder renders from the same messages."""
    records, want = SHAPES[shape]
    result = convert(tmp_path, records, format=fmt, tokenizer=str(default_tok_dir))
    manifest = result.manifest
    assert manifest is not None
    assert dict(manifest.fields) == {"id": "string", "input_ids": "tokens", "loss_spans": "json"}
    samples = read_back(tmp_path)
    assert len(samples) == len(want)
    hf = load_hf(default_tok_dir)
    read_time = SampleEncoder(hf)([{"messages": m} for m in want])
    stored = encode_token_samples(samples)
    for sample, doc, got in zip(samples, read_time, stored, strict=True):
        assert sample["input_ids"].tolist() == doc.input_ids.tolist()
        assert doc.loss_mask is not None
        assert got.loss_mask is not None
        assert sample["loss_spans"] == mask_to_spans(doc.loss_mask)
        np.testing.assert_array_equal(got.loss_mask, doc.loss_mask)
        assert doc.loss_mask.any()
        assert not doc.loss_mask.all()
    assert manifest.num_tokens == sum(len(s["input_ids"]) for s in samples)


def test_rendered_chat_with_another_template_and_kept_fields(tmp_path, eos_tok_dir):
    records = [{"id": "a", "lang": "en", "messages": MESSAGES}]
    convert(tmp_path, records, tokenizer=str(eos_tok_dir), keep_fields=("lang",))
    (sample,) = read_back(tmp_path)
    hf = load_hf(eos_tok_dir)
    (doc,) = SampleEncoder(hf)([{"messages": MESSAGES}])
    assert sample["input_ids"].tolist() == doc.input_ids.tolist()
    assert doc.loss_mask is not None
    assert sample["loss_spans"] == mask_to_spans(doc.loss_mask)
    assert sample["lang"] == "en"
    trained = hf.decode(doc.input_ids[doc.loss_mask].tolist())
    assert trained == "déjà vu 🙂<|endoftext|>\nрусский текст<|endoftext|>\n"


def test_rendered_shards_open_with_pyarrow_and_as_webdataset_members(tmp_path, default_tok_dir):
    records, _ = SHAPES["messages"]
    convert(tmp_path, records, tokenizer=str(default_tok_dir))
    (shard,) = (tmp_path / "out").glob("*.arrow")
    table = pa.ipc.open_file(str(shard)).read_all()
    assert table.column_names == ["id", "input_ids", "loss_spans"]
    spans = [json.loads(v) for v in table.column("loss_spans").to_pylist()]
    assert all(isinstance(s, list) and s and len(s[0]) == 2 for s in spans)
    convert(tmp_path, records, tokenizer=str(default_tok_dir), format="tar", compression="none",
            overwrite=True)  # fmt: skip
    (shard,) = (tmp_path / "out").glob("*.tar")
    with tarfile.open(shard) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile(names[0]).read())  # type: ignore[union-attr]
    assert names[:2] == ["shard-00000-0000-0000000.json", "shard-00000-0000-0000000.npy"]
    assert meta == {"id": "m0", "loss_spans": spans[0]}


def test_many_processes_give_the_same_bytes_as_one(tmp_path, default_tok_dir):
    root = tmp_path / "in"
    for k in range(4):
        convs = [
            {"id": f"{k}-{i}", "messages": [user(f"q {k} {i} " * (i % 3 + 1)), bot(f"a {i}")]}
            for i in range(30)
        ]
        write_jsonl(root / f"part-{k}.jsonl", convs)
    runs = {}
    for num_proc in (1, 2):
        out = tmp_path / f"out-{num_proc}"
        config = ConvertConfig(
            output=str(out), tokenizer=str(default_tok_dir), num_proc=num_proc, task_bytes=1,
            shard_samples=25,
        )  # fmt: skip
        result = shardloader.convert(str(root), config)
        assert result.tasks_run == 4
        runs[num_proc] = published(out)
    assert runs[1] == runs[2]
    assert len(runs[1]) > 5  # the manifest and several shards
    # A crash inside task 2 (record and manifest gone, a shard cut short): the rerun redoes it.
    out = tmp_path / "out-1"
    (out / "_manifest.json").unlink()
    (out / "_work" / "task-00002.json").unlink()
    shard = sorted(out.glob("shard-00002-*"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    result = shardloader.convert(str(root), replace(config, output=str(out)))
    assert result.tasks_run == 1
    assert published(out) == runs[1]


def test_template_is_recorded_and_a_different_one_is_refused(
    tmp_path, default_tok_dir, eos_tok_dir
):
    records = [{"id": "a", "messages": MESSAGES}]
    result = convert(tmp_path, records, tokenizer=str(default_tok_dir))
    manifest = result.manifest
    assert manifest is not None
    assert manifest.tokenizer is not None
    want = template_hash(load_hf(default_tok_dir).chat_template)
    assert manifest.tokenizer["chat_template"] == want
    assert manifest.config["chat_template"] == want
    # another template, same vocabulary: another settings fingerprint
    other = convert(tmp_path / "o", records, tokenizer=str(eos_tok_dir)).manifest
    assert other is not None
    assert other.tokenizer is not None
    assert other.tokenizer["fingerprint"] == manifest.tokenizer["fingerprint"]
    assert other.config["plan_fingerprint"] != manifest.config["plan_fingerprint"]
    out = str(tmp_path / "out")
    # reading needs no tokenizer; the same one (either kind) is accepted
    assert len(list(shardloader.ShardDataset(out, pack=PackConfig(seq_len=128)))) == 1
    check_tokenizer(manifest, load_hf(default_tok_dir), where=out)
    check_tokenizer(manifest, shardloader.TextTokenizer(str(default_tok_dir)), where=out)
    wrong = load_hf(eos_tok_dir)
    with pytest.raises(ConfigError) as info:
        _ = shardloader.ShardDataset(out, tokenizer=wrong).manifest
    message = str(info.value)
    assert message.startswith(f"{out}: shards were rendered with the chat template {want}")
    assert template_hash(CHAT_TEMPLATE) in message
    assert str(eos_tok_dir) in message
    bare = load_hf(default_tok_dir)
    bare.chat_template = None
    with pytest.raises(ConfigError, match="has no chat template; use the tokenizer"):
        check_tokenizer(manifest, bare, where=out)


def test_prompt_too_long_is_a_bad_record_with_file_line(tmp_path, default_tok_dir):
    long_prompt = {"id": "long", "messages": [user("the quick brown fox " * 30), bot("ok")]}
    records = [{"id": "a", "messages": [user("q"), bot("a")]}, long_prompt, {"id": "b", **GOOD}]
    where = tmp_path / "in" / "chat.jsonl"
    with pytest.raises(CorpusError) as info:
        convert(tmp_path, records, tokenizer=str(default_tok_dir), max_prompt_tokens=40)
    message = str(info.value)
    assert message.startswith(f"{where}:2: ")
    assert "tokens before the first assistant turn, over --max-prompt-tokens 40" in message
    result = convert(tmp_path, records, tokenizer=str(default_tok_dir), max_prompt_tokens=40,
                     on_bad_record="skip", overwrite=True)  # fmt: skip
    manifest = result.manifest
    assert manifest is not None
    assert dict(manifest.skipped) == {"prompt_too_long": 1}
    assert manifest.skipped_examples[0].startswith(f"{where}:2: prompt_too_long: ")
    assert manifest.sources[0]["num_skipped"] == 1
    assert manifest.config["max_prompt_tokens"] == 40
    assert [s["id"] for s in read_back(tmp_path)] == ["a", "b"]
    assert result.num_docs == 2


def test_chat_rendering_settings_are_checked(tmp_path, default_tok_dir):
    with pytest.raises(ConfigError, match="max_prompt_tokens counts tokens, so it needs a tok"):
        ConvertConfig(output="x", max_prompt_tokens=10)
    with pytest.raises(ConfigError, match="max_prompt_tokens: applies to chat data only"):
        convert(tmp_path, [{"text": "hello"}], tokenizer=str(default_tok_dir), max_prompt_tokens=9)
    with pytest.raises(ConfigError, match="keep_fields: 'loss_spans' is reserved"):
        ConvertConfig(output="x", keep_fields=("loss_spans:json",))
    with pytest.raises(ConfigError, match="drop --add-bos"):
        ConvertConfig(output="x", schema="messages", tokenizer=str(default_tok_dir), add_bos=True)
    with pytest.raises(ConfigError, match="rendering chat data needs a tokenizer directory"):
        convert(tmp_path, [GOOD], tokenizer=str(default_tok_dir / "tokenizer.json"))


def test_a_conversation_the_template_cannot_render_is_a_bad_record(tmp_path):
    tok = _tokenizer_with_template(
        tmp_path / "tok",
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('no system turns') }}{% endif %}"
        "{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}",
    )
    records = [GOOD, {"messages": MESSAGES}, GOOD]
    result = convert(tmp_path, records, tokenizer=str(tok), on_bad_record="skip")
    manifest = result.manifest
    assert manifest is not None
    assert dict(manifest.skipped) == {"template_error": 1}
    assert "chat.jsonl:2: template_error: the chat template of" in manifest.skipped_examples[0]
    assert "no system turns" in manifest.skipped_examples[0]
    assert len(read_back(tmp_path)) == 2
