"""Shard formats: exact round trips, and our shards read as-is by pyarrow and webdataset."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import webdataset as wds

import shardloader
from shardloader import ConvertConfig, convert
from shardloader.errors import ShardError
from shardloader.formats import MAX_JSON_DEPTH, load_json
from tests.conftest import convert_docs, make_docs, sha


@pytest.mark.parametrize(
    ("fmt", "compression"), [("arrow", "zstd"), ("arrow", "none"), ("tar", "zstd"), ("tar", "none")]
)
def test_round_trip_is_exact(corpus, tmp_path, read_back, fmt, compression):
    root, docs = corpus
    out = tmp_path / "out"
    result = convert(
        [str(root)],
        ConvertConfig(
            output=str(out),
            format=fmt,
            compression=compression,
            shard_samples=70,
            keep_fields=("lang", "score:float64"),
            num_proc=1,
        ),
    )
    assert result.manifest is not None
    assert result.manifest.num_samples == len(docs) == result.num_docs
    samples = read_back(out)
    assert [s["id"] for s in samples] == [d["id"] for d in docs]
    assert [sha(s["text"]) for s in samples] == [sha(d["text"]) for d in docs]
    assert [s["lang"] for s in samples] == [d["lang"] for d in docs]
    assert [s["score"] for s in samples] == [d["score"] for d in docs]
    assert [s["sample_id"] for s in samples] == list(range(len(docs)))
    # shard limits: every shard but each task's last holds exactly shard_samples
    counts = [s.num_samples for s in result.manifest.shards]
    assert max(counts) == 70
    assert sum(counts) == len(docs)
    suffix = {"arrow": ".arrow", "tar": ".tar.zst" if compression == "zstd" else ".tar"}[fmt]
    assert all(s.path.endswith(suffix) for s in result.manifest.shards)


def test_zstd_compresses(corpus, tmp_path):
    root, _ = corpus
    sizes = {}
    for compression in ("zstd", "none"):
        r = convert(
            [str(root)],
            ConvertConfig(output=str(tmp_path / compression), compression=compression, num_proc=1),
        )
        assert r.manifest is not None
        sizes[compression] = r.manifest.num_bytes
    assert sizes["zstd"] < 0.7 * sizes["none"]


def test_pyarrow_reads_arrow_shards_as_is(corpus, tmp_path):
    root, docs = corpus
    out = tmp_path / "out"
    convert([str(root)], ConvertConfig(output=str(out), shard_samples=100, num_proc=1))
    manifest = shardloader.read_manifest(str(out))
    ids, texts = [], []
    for shard in manifest.shards:
        with pa.ipc.open_file(out / shard.path) as reader:
            assert reader.num_record_batches >= 1
            table = reader.read_all()
        assert table.num_rows == shard.num_samples
        assert table.schema.names == ["id", "text"]
        ids += table.column("id").to_pylist()
        texts += table.column("text").to_pylist()
    assert ids == [d["id"] for d in docs]
    assert texts == [d["text"] for d in docs]
    # the whole output directory opens as a pyarrow dataset (manifest and _work are ignored)
    table = pads.dataset(str(out), format="arrow").to_table()
    assert sorted(table.column("id").to_pylist()) == sorted(d["id"] for d in docs)


def test_arrow_record_batches_respect_batch_bytes(tmp_path):
    docs = [{"id": str(i), "text": "x" * 10_000} for i in range(100)]
    out = convert_docs(tmp_path, docs, batch_bytes=100_000, num_proc=1)
    (shard,) = shardloader.read_manifest(str(out)).shards
    with pa.ipc.open_file(out / shard.path) as reader:
        sizes = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
    assert sizes == [10] * 10


def _wds_urls(out: Path) -> list[str]:
    manifest = shardloader.read_manifest(str(out))
    return [str(out / s.path) for s in manifest.shards]


def test_webdataset_reads_tar_shards_as_is(corpus, tmp_path):
    root, docs = corpus
    out = tmp_path / "out"
    convert(
        [str(root)],
        ConvertConfig(
            output=str(out),
            format="tar",
            compression="none",
            shard_samples=64,
            keep_fields=("lang",),
            num_proc=1,
        ),
    )
    samples = list(wds.WebDataset(_wds_urls(out), shardshuffle=False))
    assert len(samples) == len(docs)
    for sample, doc in zip(samples, docs, strict=True):
        assert sample["txt"] == doc["text"].encode("utf-8")
        meta = json.loads(sample["json"])
        assert meta == {"id": doc["id"], "lang": doc["lang"]}
    assert len({s["__key__"] for s in samples}) == len(docs)


def test_default_tar_shards_are_plain_and_webdataset_reads_them_as_they_are(tmp_path):
    """Issue 18: ``--format tar`` with no other flag gives what ``wds.WebDataset(urls)`` opens."""
    docs = make_docs(90)
    out = convert_docs(tmp_path, docs, format="tar", shard_samples=40, num_proc=1)
    manifest = shardloader.read_manifest(str(out))
    assert manifest.compression == "none"
    assert manifest.config["compression"] == "none"
    assert [s.path for s in manifest.shards] == [f"shard-00000-{i:04d}.tar" for i in range(3)]
    samples = list(wds.WebDataset(_wds_urls(out), shardshuffle=False))
    theirs = {json.loads(s["json"])["id"]: s["txt"].decode("utf-8") for s in samples}
    assert len(samples) == len(theirs) == 90
    assert theirs == {d["id"]: d["text"] for d in docs}


def test_webdataset_reads_zstd_tar_shards_through_a_pipe(corpus, tmp_path):
    root, docs = corpus
    out = tmp_path / "out"
    convert(
        [str(root)], ConvertConfig(output=str(out), format="tar", compression="zstd", num_proc=1)
    )
    assert {p.suffix for p in out.glob("shard-*")} == {".zst"}
    unzstd = (
        f"{sys.executable} -c 'import sys, zstandard; "
        "zstandard.ZstdDecompressor().copy_stream(sys.stdin.buffer, sys.stdout.buffer)'"
    )
    urls = [f"pipe:{unzstd} < {u}" for u in _wds_urls(out)]
    texts = [s["txt"].decode("utf-8") for s in wds.WebDataset(urls, shardshuffle=False)]
    assert texts == [d["text"] for d in docs]


def test_webdataset_decodes_tokenized_tar_shards(tmp_path, tokenizer_dir):
    docs = make_docs(50)
    out = convert_docs(
        tmp_path, docs, format="tar", compression="none", tokenizer=str(tokenizer_dir)
    )
    ours = [s["input_ids"] for s in shardloader.iter_samples(str(out))]
    theirs = [s["npy"] for s in wds.WebDataset(_wds_urls(out), shardshuffle=False).decode()]
    assert len(theirs) == len(ours) == 50
    for a, b in zip(ours, theirs, strict=True):
        assert b.dtype == np.uint16
        np.testing.assert_array_equal(a, b)


def test_tar_headers_are_deterministic(corpus, tmp_path):
    root, _ = corpus
    digests = []
    for name in ("x", "y"):
        out = tmp_path / name
        convert([str(root)], ConvertConfig(output=str(out), format="tar", num_proc=1))
        digests.append(
            [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*"))]
        )
    assert digests[0] == digests[1]
    assert len(digests[0]) >= 1


@pytest.mark.parametrize(
    ("name", "size"),
    [(b"a.txt", 0), (b"shard-00001-0002-0000003.json", 1234), (b"x" * 99, 8**11 - 1)],
)
def test_ustar_header_matches_tarfile(name, size):
    import tarfile

    from shardloader.formats.tar import ustar_header

    info = tarfile.TarInfo(name.decode())
    info.size, info.mode, info.mtime = size, 0o444, 0
    assert ustar_header(name, size) == info.tobuf(format=tarfile.USTAR_FORMAT)


def test_json_depth_is_bounded_whatever_the_brackets_in_strings() -> None:
    """Brackets bound the depth cheaply; inside strings they only make the real walk run."""
    shallow = json.dumps({"id": "a", "text": "[" * 200 + "{" * 200})
    assert load_json(shallow, "s")["text"].startswith("[[")
    assert load_json(shallow.encode("utf-16"), "s")["id"] == "a"
    deep = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    with pytest.raises(ShardError, match="nested deeper than 64"):
        load_json(deep, "s")
    with pytest.raises(ShardError, match="nested deeper than 64"):
        load_json(deep.encode("utf-32"), "s")
    at_limit = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert load_json(at_limit, "s") == json.loads(at_limit)


def test_a_token_column_of_many_record_batches_is_read_without_joining_them() -> None:
    # A whole shard is many record batches; their ids were copied into one array first.
    from shardloader.formats.arrow import _token_column

    list_type = pa.list_(pa.uint16())
    chunks = [
        pa.array([[1, 2, 3], [], [4]], list_type),
        pa.array([], list_type),  # an empty batch
        pa.array([[9, 9], [5, 6, 7], [], [8]], list_type).slice(1),  # a slice: offset 1
        pa.array([[], [10, 11]], list_type),  # a batch starting with an empty row
    ]
    column = pa.chunked_array(chunks, list_type)
    tokens = _token_column(column)
    rows = np.array([7, 0, 6, 1, 3, 5, 2, 4], np.int64)
    expected = column.combine_chunks().to_pylist()
    assert [t.tolist() for t in tokens.take(rows)] == [expected[r] for r in rows]
    lengths = tokens.offsets[rows + 1] - tokens.offsets[rows]
    assert lengths.tolist() == [len(expected[r]) for r in rows]
    # Views of the decoded batches, not copies.
    assert all(
        np.shares_memory(view, np.frombuffer(chunk.values.buffers()[1], np.uint16))
        for view, chunk in zip(tokens.values, chunks, strict=True)
        if len(view)
    )
    empty = _token_column(pa.chunked_array([], list_type))
    assert empty.take(np.zeros(0, np.int64)) == []
