"""Hugging Face ``datasets``: it reads our Arrow shards, and convert takes its objects as input."""

from __future__ import annotations

import datasets  # the dev extra installs it: a missing one fails, it does not skip
import numpy as np
import pytest

import shardloader
from shardloader import ConvertConfig, convert
from shardloader.errors import ConfigError, CorpusError
from tests.conftest import convert_docs, make_docs


def _shard_files(out) -> list[str]:
    return [str(out / s.path) for s in shardloader.read_manifest(str(out)).shards]


def _ours(out) -> dict[str, object]:
    return {s["id"]: s.get("text", s.get("input_ids")) for s in shardloader.iter_samples(str(out))}


def test_load_dataset_arrow_reads_our_text_shards(tmp_path):
    docs = make_docs(120)
    out = convert_docs(tmp_path, docs, shard_samples=50, batch_bytes=2000, num_proc=1)
    files = _shard_files(out)
    assert len(files) == 3
    ds = datasets.load_dataset(
        "arrow", data_files=files, split="train", cache_dir=str(tmp_path / "hf")
    )
    assert ds.column_names == ["id", "text"]
    theirs = dict(zip(ds["id"], ds["text"], strict=True))
    assert len(theirs) == len(ds) == 120
    assert theirs == {d["id"]: d["text"] for d in docs}


def test_load_dataset_arrow_reads_our_token_shards(tmp_path, tokenizer_dir):
    docs = make_docs(60)
    out = convert_docs(tmp_path, docs, tokenizer=str(tokenizer_dir), shard_samples=25, num_proc=1)
    ds = datasets.load_dataset(
        "arrow", data_files=_shard_files(out), split="train", cache_dir=str(tmp_path / "hf")
    )
    ours = _ours(out)
    assert len(ds) == len(ours) == 60
    for row in ds:
        np.testing.assert_array_equal(np.asarray(row["input_ids"]), ours[row["id"]])


def _records(n: int) -> list[dict[str, object]]:
    """Records with ids, some without (id made from the row), and a kept field."""
    docs = make_docs(n, seed=3)
    for i, d in enumerate(docs):
        if i % 7 == 0:
            d["id"] = None
    return docs


def _expected(docs: list[dict[str, object]], name: str = "Dataset") -> dict[str, str]:
    return {(d["id"] or f"{name}:{i}"): d["text"] for i, d in enumerate(docs)}


@pytest.mark.parametrize("num_proc", [1, 2])
def test_convert_a_dataset_in_row_range_tasks(tmp_path, num_proc):
    docs = _records(700)
    ds = datasets.Dataset.from_list(docs)
    config = ConvertConfig(
        output=str(tmp_path / "out"),
        task_bytes=ds.data.nbytes // 4 + 1,  # 4 tasks
        shard_samples=100,
        keep_fields=("lang",),
        num_proc=num_proc,
    )
    result = convert(ds, config)
    assert result.tasks_total == 4
    assert result.manifest is not None
    assert result.manifest.num_samples == 700
    samples = list(shardloader.iter_samples(str(tmp_path / "out")))
    assert {s["id"]: s["text"] for s in samples} == _expected(docs)
    assert [s["lang"] for s in samples] == [d["lang"] for d in docs]
    sources = result.manifest.sources
    assert [s["url"] for s in sources] == [
        f"Dataset: rows {a}-{b}" for a, b in ((0, 174), (175, 349), (350, 524), (525, 699))
    ]
    assert sum(s["num_records"] for s in sources) == 700
    # The same dataset again: done, nothing to run.
    again = convert(ds, config)
    assert again.tasks_run == 0


def test_convert_reads_a_dataset_in_bounded_batches(tmp_path, monkeypatch):
    from shardloader.sources import hf

    monkeypatch.setattr(hf, "BATCH_ROWS", 16)
    seen: list[int] = []
    real = datasets.Dataset.__getitem__

    def spy(self, key):
        value = real(self, key)
        if isinstance(key, slice):
            seen.append(key.stop - key.start)
        return value

    monkeypatch.setattr(datasets.Dataset, "__getitem__", spy)
    docs = _records(100)
    convert(datasets.Dataset.from_list(docs), ConvertConfig(output=str(tmp_path), num_proc=1))
    assert sum(seen) == 100
    assert max(seen) == 16
    assert _ours(tmp_path) == _expected(docs)


def test_convert_an_iterable_dataset_with_a_tokenizer(tmp_path, tokenizer_dir):
    docs = _records(90)
    ds = datasets.Dataset.from_list(docs).to_iterable_dataset(num_shards=3)
    config = ConvertConfig(output=str(tmp_path / "out"), tokenizer=str(tokenizer_dir), num_proc=2)
    result = convert(ds, config)
    assert result.tasks_total == 1
    assert result.manifest is not None
    assert result.manifest.tokenized
    reference = convert_docs(
        tmp_path / "ref", [{**d, "id": d["id"] or "x"} for d in docs], tokenizer=str(tokenizer_dir)
    )
    ref = [s["input_ids"] for s in shardloader.iter_samples(str(reference))]
    ours = list(shardloader.iter_samples(str(tmp_path / "out")))
    assert [s["id"] for s in ours] == list(_expected(docs, "IterableDataset"))
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(a["input_ids"], b)
    assert result.manifest.sources[0]["url"] == "IterableDataset: all rows"


def test_bad_rows_raise_with_their_row_or_are_counted(tmp_path):
    docs = _records(30)
    docs[4]["text"] = ""
    docs[9]["text"] = None
    ds = datasets.Dataset.from_list(docs)
    with pytest.raises(CorpusError, match=r"^Dataset: row 4: field 'text' is an empty string"):
        convert(ds, ConvertConfig(output=str(tmp_path / "a"), num_proc=1))
    result = convert(
        ds, ConvertConfig(output=str(tmp_path / "b"), on_bad_record="skip", num_proc=1)
    )
    assert result.manifest is not None
    assert dict(result.manifest.skipped) == {"empty_text": 1, "missing_text": 1}
    want = {k: v for i, (k, v) in enumerate(_expected(docs).items()) if i not in (4, 9)}
    assert _ours(tmp_path / "b") == want


def test_chat_rows_are_detected_and_stored_as_messages(tmp_path):
    rows = [
        {
            "id": f"c{i}",
            "messages": [
                {"role": "user", "content": f"hi {i}"},
                {"role": "assistant", "content": f"hello {i}"},
            ],
        }
        for i in range(12)
    ]
    result = convert(datasets.Dataset.from_list(rows), ConvertConfig(output=str(tmp_path)))
    assert result.manifest is not None
    samples = list(shardloader.iter_samples(str(tmp_path)))
    assert {s["id"]: s["messages"] for s in samples} == {r["id"]: r["messages"] for r in rows}


def test_a_dataset_dict_asks_for_a_split(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(_records(3))})
    with pytest.raises(ConfigError, match=r"DatasetDict of splits \['train'\]: convert one split"):
        convert(dd, ConvertConfig(output=str(tmp_path)))
