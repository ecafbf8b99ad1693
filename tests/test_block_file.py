"""Block tables in a binary file beside the manifest: round trip, streaming, hostile files."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardloader import ShardDataset, StreamConfig, read_manifest
from shardloader.block_file import BLOCK_FILE_NAME
from shardloader.errors import ManifestError
from shardloader.manifest import MANIFEST_NAME, manifest_files, parse_manifest


@pytest.fixture
def file_dir(blocks_dir: Path, tmp_path: Path) -> Path:
    """``blocks_dir`` with its block table moved to a block file."""
    out = tmp_path / "with-file"
    shutil.copytree(blocks_dir, out)
    manifest = read_manifest(str(blocks_dir))
    files = manifest_files(manifest, block_file_min_blocks=0)
    assert [name for name, _ in files] == [BLOCK_FILE_NAME, MANIFEST_NAME]  # the file first
    for name, data in files:
        (out / name).write_bytes(data)
    return out


def entry_of(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST_NAME).read_text())["shards"]["blocks"]


def test_a_block_file_reads_back_the_same_manifest(blocks_dir: Path, file_dir: Path) -> None:
    original = read_manifest(str(blocks_dir))
    again = read_manifest(str(file_dir))
    assert again == original
    a, b = original.shards.block_table(), again.shards.block_table()
    for name in a._fields:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.num_blocks == 173
    assert a.digest.all()  # not vacuous: digests and decoded sizes went through the file
    assert a.decoded.all()
    assert entry_of(file_dir)["num_blocks"] == 173
    small = (file_dir / MANIFEST_NAME).stat().st_size
    assert small < (blocks_dir / MANIFEST_NAME).stat().st_size
    # Below the threshold, the manifest is written as before (the lists, no file).
    assert [n for n, _ in manifest_files(original)] == [MANIFEST_NAME]


def test_a_dataset_with_a_block_file_streams_the_same_order(
    blocks_dir: Path, file_dir: Path
) -> None:
    config = StreamConfig(shuffle_unit="block", shuffle_window=5, seed=3)
    want = list(ShardDataset(str(blocks_dir), config=config))
    got = list(ShardDataset(str(file_dir), config=config))
    assert got == want
    assert len(want) > 100


def rewrite(path: Path, data: bytes, *, fix_sha: bool) -> None:
    (path / BLOCK_FILE_NAME).write_bytes(data)
    if fix_sha:  # as a tamperer who rewrites both would
        doc = json.loads((path / MANIFEST_NAME).read_text())
        doc["shards"]["blocks"]["sha256"] = hashlib.sha256(data).hexdigest()
        (path / MANIFEST_NAME).write_text(json.dumps(doc))


def test_a_changed_or_truncated_block_file_is_refused_naming_it(file_dir: Path) -> None:
    data = (file_dir / BLOCK_FILE_NAME).read_bytes()
    flipped = bytearray(data)
    flipped[100] ^= 1
    rewrite(file_dir, bytes(flipped), fix_sha=False)
    with pytest.raises(ManifestError, match=r"block file manifest.blocks: sha256 .* restore it"):
        read_manifest(str(file_dir))
    rewrite(file_dir, data[:-8], fix_sha=False)
    with pytest.raises(ManifestError, match="bytes, the manifest says"):
        read_manifest(str(file_dir))
    (file_dir / BLOCK_FILE_NAME).unlink()
    with pytest.raises(ManifestError, match="block file manifest.blocks is missing"):
        read_manifest(str(file_dir))


def test_bad_values_in_a_block_file_are_refused_like_bad_json(file_dir: Path) -> None:
    """A file rewritten with its sha256: the columns are still checked (counts, digests)."""
    entry = entry_of(file_dir)
    data = bytearray((file_dir / BLOCK_FILE_NAME).read_bytes())
    at = entry["num_shards"] * 8  # the first block's sample count
    samples = np.frombuffer(bytes(data[at : at + 8]), "<i8")[0]
    data[at : at + 8] = np.array([samples + 1], "<i8").tobytes()
    rewrite(file_dir, bytes(data), fix_sha=True)
    with pytest.raises(ManifestError, match="blocks hold .* samples but the shard"):
        read_manifest(str(file_dir))
    data[at : at + 8] = np.array([samples], "<i8").tobytes()
    data[-1] = ord("Z")  # the last digest's last character
    rewrite(file_dir, bytes(data), fix_sha=True)
    with pytest.raises(ManifestError, match="digest values that are not 32"):
        read_manifest(str(file_dir))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"file": "../elsewhere"}, "not a file name beside the manifest"),
        ({"file": "x/manifest.blocks"}, "not a file name beside the manifest"),
        ({"num_blocks": 172}, "is malformed"),
        ({"columns": ["count", "samples"]}, "is malformed"),
        ({"extra": 1}, "is malformed"),
        ({"num_bytes": -1}, "is malformed"),
    ],
)
def test_a_malformed_block_file_entry_is_refused(
    file_dir: Path, change: dict[str, Any], match: str
) -> None:
    doc = json.loads((file_dir / MANIFEST_NAME).read_text())
    doc["shards"]["blocks"].update(change)
    (file_dir / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=match):
        read_manifest(str(file_dir))


def test_parse_manifest_needs_a_reader_for_a_block_file(file_dir: Path) -> None:
    data = (file_dir / MANIFEST_NAME).read_bytes()
    with pytest.raises(ManifestError, match="read the manifest with read_manifest"):
        parse_manifest(data)
    manifest = parse_manifest(data, read_file=lambda name: (file_dir / name).read_bytes())
    assert manifest.shards.block_table().num_blocks == 173


def test_convert_writes_a_large_block_table_to_a_block_file_and_resumes_over_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past BLOCK_FILE_MIN_BLOCKS (a million) convert writes the block file; here the bound is 0.
    import functools
    import importlib

    from shardloader import ConvertConfig, convert
    from tests.conftest import convert_docs, make_docs

    monkeypatch.setattr(
        importlib.import_module("shardloader.convert"),  # (the package exports convert())
        "manifest_files",
        functools.partial(manifest_files, block_file_min_blocks=0),
    )
    docs = make_docs(300)
    out = convert_docs(tmp_path, docs, batch_bytes=2000, num_proc=1)
    assert (out / BLOCK_FILE_NAME).is_file()
    assert "offset" not in entry_of(out)  # the table is in the file, not the JSON
    manifest = read_manifest(str(out))
    assert manifest.shards.block_columns is not None
    assert len(manifest.shards.block_columns.samples) > len(manifest.shards)
    result = convert([str(tmp_path / "in.jsonl")], ConvertConfig(output=str(out), batch_bytes=2000))
    assert result.tasks_skipped == result.tasks_total  # done already: read back through the file
    assert read_manifest(str(out)) == manifest
    texts = sorted(s["text"] for s in ShardDataset(str(out), config=StreamConfig(seed=1)))
    assert texts == sorted(d["text"] for d in docs)
