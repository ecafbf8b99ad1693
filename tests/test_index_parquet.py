"""Parquet files indexed in place (``shardloader index``) and streamed with every guarantee.

The corpus is `tests.streaming`'s: 1,003 documents in 7 files of very different sizes, here
written as Parquet with uneven row groups, so the plan (which needs only counts) is the one of the
converted Arrow dataset: the same seed must give the same samples in the same order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.multiprocessing

import shardloader
from shardloader import (
    CorpusError,
    PackConfig,
    ShardDataset,
    ShardError,
    ShardLoader,
    StreamConfig,
    index_parquet,
    read_manifest,
)
from shardloader import fetch as fetch_module
from shardloader.manifest import MANIFEST_NAME
from shardloader.testing import S3Server
from tests import dist_stream
from tests.conftest import run_cli
from tests.streaming import NUM_SAMPLES, SHARD_SIZES, ids_of, source_docs

ROW_GROUPS = (64, 5, 33, 150, 1, 7, 120)  # rows per row group, per file: uneven on purpose


def write_corpus(root: Path, *, with_ids: bool = True) -> Path:
    """The documents of `tests.streaming` as 7 Parquet files with uneven row groups."""
    docs = source_docs()
    root.mkdir(parents=True, exist_ok=True)
    start = 0
    for index, (size, group) in enumerate(zip(SHARD_SIZES, ROW_GROUPS, strict=True)):
        rows = docs[start : start + size]
        table = pa.table(
            {
                **({"id": [d["id"] for d in rows]} if with_ids else {}),
                "text": [d["text"] for d in rows],
                "score": [d["score"] for d in rows],
                "lang": [d["lang"] for d in rows],
            }
        )
        pq.write_table(table, root / f"part-{index}.parquet", row_group_size=group)
        start += size
    (root / "README.md").write_text("a dataset card, not data\n")
    return root


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_corpus(tmp_path_factory.mktemp("pq") / "corpus")
    index_parquet(str(root), keep_fields=["score", "lang"])
    return root


def pyarrow_rows(root: Path) -> list[dict[str, Any]]:
    """Every row of the files as pyarrow reads them, in manifest order."""
    rows: list[dict[str, Any]] = []
    for index in range(len(SHARD_SIZES)):
        rows += pq.read_table(root / f"part-{index}.parquet").to_pylist()
    return rows


def test_index_reads_footers_into_counts_blocks_and_checksums(parquet_dir: Path) -> None:
    manifest = read_manifest(str(parquet_dir))
    assert manifest.format == "parquet"
    assert tuple(manifest.shards.column("num_samples")) == SHARD_SIZES
    assert manifest.fields == {
        "id": "string",
        "text": "string",
        "score": "float64",
        "lang": "string",
    }
    assert manifest.checksum_algorithm == "sha256"
    assert manifest.root is None  # beside the files
    table = manifest.shards.blocks
    assert table is not None
    for shard, blocks in zip(manifest.shards, table, strict=True):
        path = parquet_dir / shard.path
        assert shard.num_bytes == path.stat().st_size
        meta = pq.read_metadata(path)
        if blocks is None:  # one row group: the file is one block
            assert meta.num_row_groups == 1
            continue
        assert [b[0] for b in blocks] == [meta.row_group(g).num_rows for g in range(len(blocks))]
        assert sum(b[0] for b in blocks) == shard.num_samples
        data = path.read_bytes()
        footer_length = int.from_bytes(data[-8:-4], "little")
        footer = data[len(data) - 8 - footer_length :]
        for group, (_, offset, length, decoded, digest) in enumerate(blocks):
            # the spans tile the file between magic and footer; decoded is the row group's
            # uncompressed size; the digest covers the span's bytes, then the footer
            assert offset >= 4
            assert offset + length <= len(data) - 8 - footer_length
            assert decoded == meta.row_group(group).total_byte_size > 0
            want = hashlib.sha256(data[offset : offset + length] + footer).hexdigest()[:32]
            assert digest == want
        assert [b[1] + b[2] for b in blocks[:-1]] == [b[1] for b in blocks[1:]]
    assert len(manifest.shards) == 7  # README.md beside them is not a shard


def test_round_trip_is_exact(parquet_dir: Path) -> None:
    want = pyarrow_rows(parquet_dir)
    samples = list(ShardDataset(str(parquet_dir), config=StreamConfig(seed=3)))
    assert len(samples) == NUM_SAMPLES
    assert sorted(s["sample_id"] for s in samples) == list(range(NUM_SAMPLES))
    for sample in samples:
        row = want[sample["sample_id"]]
        assert {k: sample[k] for k in row} == row
    # verify's sequential reader and the CLI agree.
    assert [s["id"] for s in shardloader.iter_samples(str(parquet_dir))] == [r["id"] for r in want]
    assert shardloader.verify(str(parquet_dir)).num_samples == NUM_SAMPLES


def test_same_plan_as_the_converted_dataset(parquet_dir: Path, dataset_dir: Path) -> None:
    """Counts alone make the plan: Parquet in place and converted Arrow give the same stream."""
    for rank in range(2):
        got = ShardDataset(str(parquet_dir), rank=rank, world_size=2)
        want = ShardDataset(str(dataset_dir), rank=rank, world_size=2)
        for a, b in zip(got, want, strict=True):
            assert (a["sample_id"], a["id"], a["text"], a["lang"]) == (
                b["sample_id"],
                b["id"],
                b["text"],
                b["lang"],
            )


def test_ids_from_file_and_row_without_an_id_column(tmp_path: Path) -> None:
    root = write_corpus(tmp_path / "noid", with_ids=False)
    manifest = index_parquet(str(root))
    assert manifest.config["id_field"] is None
    samples = sorted(ShardDataset(str(root)), key=lambda s: s["sample_id"])
    assert samples[0]["id"] == "part-0.parquet:0"
    assert samples[SHARD_SIZES[0] + 3]["id"] == "part-1.parquet:3"
    assert len({s["id"] for s in samples}) == NUM_SAMPLES


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_split_exactly_and_resume(parquet_dir: Path, num_workers: int) -> None:
    """2 ranks (simulated in process) x ``num_workers`` real DataLoader workers."""
    per_rank: list[list[int]] = []
    for rank in range(2):

        def loader(rank: int = rank) -> ShardLoader:
            dataset = ShardDataset(str(parquet_dir), rank=rank, world_size=2)
            return ShardLoader(dataset, batch_size=6, num_workers=num_workers, collate_fn=ids_of)

        full = list(loader())
        per_rank.append([i for batch in full for i in batch])
        head, state = [], None
        first = loader()
        for batch in first:
            head.append(batch)
            if len(head) == 17:
                state = json.loads(json.dumps(first.state_dict()))
                break
        assert head == full[:17]
        resumed = loader()
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert rest == full[17:]
        assert rest
    assert [len(ids) for ids in per_rank] == [NUM_SAMPLES // 2] * 2
    union = [i for ids in per_rank for i in ids]
    assert len(union) == len(set(union)) == NUM_SAMPLES - NUM_SAMPLES % 2


def rows_of(batch: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
    return [(s["sample_id"], s["id"], s["text"]) for s in batch]


def write_grouped(root: Path) -> Path:
    """3 Parquet files of 200 documents, each in several row groups (40, 30 and 70 rows)."""
    docs = source_docs()[:600]
    root.mkdir(parents=True)
    for index, group in enumerate((40, 30, 70)):
        rows = docs[200 * index : 200 * (index + 1)]
        table = pa.table({"id": [d["id"] for d in rows], "text": [d["text"] for d in rows]})
        pq.write_table(table, root / f"part-{index}.parquet", row_group_size=group)
    return root


def test_row_group_digests_make_blocks_the_default_and_no_file_is_hashed_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local files indexed with a digest per row group: "auto" reads row groups, checking each
    one's bytes and the footer, and never hashes a file whole (the reader's whole-file check)."""
    root = write_grouped(tmp_path / "g")
    index_parquet(str(root))
    want = [r for i in range(3) for r in pq.read_table(root / f"part-{i}.parquet").to_pylist()]
    hashed: list[int] = []
    real = fetch_module.hash_fd
    monkeypatch.setattr(
        fetch_module, "hash_fd", lambda fd, algorithm: hashed.append(fd) or real(fd, algorithm)
    )
    dataset = ShardDataset(str(root), config=StreamConfig(seed=2))
    assert dataset.resume_spec().config.shuffle_unit == "block"
    samples = list(dataset)
    assert sorted(s["sample_id"] for s in samples) == list(range(600))
    for sample in samples:
        assert (sample["id"], sample["text"]) == (
            want[sample["sample_id"]]["id"],
            want[sample["sample_id"]]["text"],
        )
    assert hashed == []
    shards = list(ShardDataset(str(root), config=StreamConfig(seed=2, shuffle_unit="shard")))
    assert len(hashed) == 3  # whole shards: each file hashed once before use
    assert sorted(s["sample_id"] for s in shards) == list(range(600))


@pytest.mark.parametrize("where", ["row_group", "footer"])
def test_a_changed_row_group_or_footer_is_refused_naming_the_row_group(
    tmp_path: Path, where: str
) -> None:
    root = write_grouped(tmp_path / "g")
    index_parquet(str(root))
    victim = root / "part-1.parquet"
    data = bytearray(victim.read_bytes())
    meta = pq.read_metadata(victim)
    if where == "row_group":  # a byte of row group 2's column chunks
        column = meta.row_group(2).column(1)
        data[column.data_page_offset + 20] ^= 0xFF
        match = r"part-1\.parquet row group 2: bytes \[\d+, \d+\) and the footer do not match"
    else:  # a byte of the footer's key-value metadata (it still parses): every row group fails
        footer_length = int.from_bytes(data[-8:-4], "little")
        data[len(data) - 8 - footer_length // 2] ^= 0x01
        match = r"part-1\.parquet row group \d+: .* do not match the manifest's block digest"
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=match + r".*shardloader index"):
        list(ShardDataset(str(root), config=StreamConfig(seed=0)))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_row_groups_are_blocks_split_exactly_and_resumed(
    parquet_dir: Path, num_workers: int
) -> None:
    """shuffle_unit="block": row groups are the units; exact split, same rows, exact resume."""
    manifest = shardloader.read_manifest(str(parquet_dir))
    blocks = manifest.shards.blocks
    assert blocks is not None
    grouped = [b for b in blocks if b is not None]
    assert sum(len(b) for b in grouped) > len(SHARD_SIZES)  # more units than files: not vacuous
    for b, size in zip(blocks, SHARD_SIZES, strict=True):
        assert b is None or sum(n for n, *_ in b) == size
    want = pyarrow_rows(parquet_dir)
    config = StreamConfig(seed=5, shuffle_unit="block", shuffle_window=3)
    per_rank: list[list[int]] = []
    for rank in range(2):

        def loader(rank: int = rank) -> ShardLoader:
            dataset = ShardDataset(str(parquet_dir), config=config, rank=rank, world_size=2)
            return ShardLoader(dataset, batch_size=5, num_workers=num_workers, collate_fn=rows_of)

        full = list(loader())
        per_rank.append([i for batch in full for i, _, _ in batch])
        for batch in full:
            for sample_id, doc_id, text in batch:
                assert (doc_id, text) == (want[sample_id]["id"], want[sample_id]["text"])
        first, state = loader(), None
        for taken, _ in enumerate(first, start=1):
            if taken == 11:
                state = json.loads(json.dumps(first.state_dict()))
                break
        resumed = loader()
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert rest == full[11:]
    assert [len(ids) for ids in per_rank] == [NUM_SAMPLES // 2] * 2
    union = [i for ids in per_rank for i in ids]
    assert len(union) == len(set(union)) == NUM_SAMPLES - NUM_SAMPLES % 2
    shard_order = ShardDataset(str(parquet_dir), config=StreamConfig(seed=5, shuffle_window=3))
    assert [s["sample_id"] for s in shard_order] != [
        s["sample_id"] for s in ShardDataset(str(parquet_dir), config=config)
    ]  # the unit changes the order


@pytest.mark.slow
def test_real_ranks_and_workers_split_exactly(parquet_dir: Path, tmp_path: Path) -> None:
    """2 ranks (gloo, spawned) x 2 forked DataLoader workers: exact id sets."""
    torch.multiprocessing.spawn(
        dist_stream.spawn_main,
        args=(2, str(tmp_path / "init"), str(parquet_dir), str(tmp_path), [("w2", 2, None)]),
        nprocs=2,
        join=True,
    )
    ranks = [json.loads((tmp_path / f"w2-rank{r}.json").read_text()) for r in range(2)]
    ids = [[i for batch in rank for i in batch] for rank in ranks]
    assert [len(r) for r in ids] == [NUM_SAMPLES // 2] * 2
    union = ids[0] + ids[1]
    assert len(union) == len(set(union)) == NUM_SAMPLES - 1


def test_text_is_packed_with_a_tokenizer_as_for_text_shards(
    parquet_dir: Path, dataset_dir: Path, tokenizer_dir: Path
) -> None:
    pack = PackConfig(seq_len=128)
    tok = str(tokenizer_dir)
    got = ShardLoader(ShardDataset(str(parquet_dir), pack=pack, tokenizer=tok), batch_size=8)
    # Both in whole shards (Parquet row groups have no digest, so "auto" plans them so).
    same = StreamConfig(shuffle_unit="shard")
    want = ShardLoader(
        ShardDataset(str(dataset_dir), pack=pack, tokenizer=tok, config=same), batch_size=8
    )
    n = 0
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["labels"], b["labels"])
        n += 1
    assert n > 10


def test_output_elsewhere_resolves_the_files(tmp_path: Path) -> None:
    root = write_corpus(tmp_path / "readonly")
    out = tmp_path / "index"
    result = run_cli("index", str(root), "--output", str(out), "--keep-fields", "lang")
    assert "7 parquet shards" in result.stdout
    assert not (root / MANIFEST_NAME).exists()
    assert read_manifest(str(out)).root == str(root)
    samples = list(ShardDataset(str(out)))
    assert sorted(s["id"] for s in samples) == sorted(d["id"] for d in source_docs())
    assert "OK: 7 shards" in run_cli("verify", str(out)).stdout
    assert "parquet" in run_cli("inspect", str(out)).stdout


@pytest.mark.parametrize("change", ["rewritten", "same_size"])
def test_a_file_changed_after_indexing_is_refused_by_name(tmp_path: Path, change: str) -> None:
    root = write_corpus(tmp_path / "c")
    index_parquet(str(root))
    victim = root / "part-3.parquet"
    if change == "rewritten":  # other rows, other size
        table = pq.read_table(victim).slice(0, 100)
        pq.write_table(table, victim)
    else:  # one byte of a page flipped: same size and row count
        data = bytearray(victim.read_bytes())
        data[200] ^= 0xFF
        victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"part-3\.parquet.*shardloader index"):
        list(ShardDataset(str(root)))
    report = shardloader.verify(str(root))
    assert len(report.problems) == 1
    assert "part-3.parquet" in report.problems[0]


def test_a_row_count_the_file_does_not_hold_is_refused(tmp_path: Path) -> None:
    """A manifest whose counts the file contradicts (not just its checksum) names the file."""
    root = write_corpus(tmp_path / "n")
    index_parquet(str(root))
    doc = json.loads((root / MANIFEST_NAME).read_text())
    doc["shards"]["num_samples"][2] -= 1
    doc["shards"].pop("blocks", None)  # else the manifest contradicts itself and is refused first
    doc["shards"]["first_sample_id"] = [
        sum(doc["shards"]["num_samples"][:i]) for i in range(len(SHARD_SIZES))
    ]
    doc.pop("totals")
    (root / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(ShardError, match=r"part-2\.parquet: holds 200 rows .* says 199"):
        list(ShardDataset(str(root)))


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    root = write_corpus(tmp_path / "bad")
    with pytest.raises(CorpusError, match=r"part-0\.parquet: no column 'body'"):
        index_parquet(str(root), text_field="body")
    with pytest.raises(CorpusError, match=r"part-0\.parquet: column 'score' has type double"):
        index_parquet(str(root), text_field="score")
    with pytest.raises(CorpusError, match=r"part-0\.parquet: no column 'nope' to keep"):
        index_parquet(str(root), keep_fields=["nope"])
    fake = root / "part-9.parquet"
    fake.write_text('{"text": "JSON, not Parquet"}\n')
    with pytest.raises(CorpusError, match=r"part-9\.parquet: not a readable Parquet file"):
        index_parquet(str(root))
    fake.unlink()
    pq.write_table(pa.table({"text": ["a", None]}), root / "part-8.parquet")
    with pytest.raises(CorpusError, match=r"part-8\.parquet: column 'text' holds 1 nulls"):
        index_parquet(str(root), id_field=None)
    result = run_cli("index", str(tmp_path / "missing"), check=False)
    assert result.returncode == 1
    assert "missing" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(CorpusError, match="no Parquet file"):
        index_parquet(str(empty))


@pytest.mark.s3
def test_remote_files_are_indexed_by_etag_and_streamed(s3_server: S3Server, tmp_path: Path) -> None:
    local = write_corpus(tmp_path / "up")
    bucket = f"pq-{os.getpid()}"
    fs = fsspec.filesystem("s3")
    fs.mkdir(bucket)
    for path in sorted(local.glob("*.parquet")):
        fs.put_file(str(path), f"{bucket}/corpus/{path.name}")
    url = f"s3://{bucket}/corpus"
    manifest = index_parquet(url, keep_fields=["lang"])
    assert manifest.checksum_algorithm == "md5"  # the ETags, from info(): nothing downloaded
    assert manifest.sources[0]["etag"] == manifest.shards[0].checksum
    config = StreamConfig(cache_dir=str(tmp_path / "cache"))
    samples = list(ShardDataset(url, config=config))
    want = pyarrow_rows(local)
    assert sorted(s["sample_id"] for s in samples) == list(range(NUM_SAMPLES))
    for s in samples:
        assert (s["id"], s["text"], s["lang"]) == tuple(
            want[s["sample_id"]][k] for k in ("id", "text", "lang")
        )
    # A replaced object is refused by name, by the download's check against the ETag.
    pq.write_table(pq.read_table(local / "part-0.parquet").slice(0, 10), tmp_path / "x.parquet")
    fs.put_file(str(tmp_path / "x.parquet"), f"{bucket}/corpus/part-0.parquet")
    config = StreamConfig(cache_dir=str(tmp_path / "cache2"))
    with pytest.raises(ShardError, match=r"part-0\.parquet.*shardloader index"):
        list(ShardDataset(url, config=config))
    shutil.rmtree(tmp_path / "cache2", ignore_errors=True)
