"""Plain tar shards in blocks: what convert records, blocks read alone, damage, .tar.zst whole."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from shardloader import ShardDataset, StreamConfig, read_manifest
from shardloader.errors import ManifestError, ShardError
from shardloader.manifest import MANIFEST_NAME
from tests.streaming import NUM_SAMPLES, SHARD_SIZES, source_docs


def test_a_plain_tar_records_runs_of_whole_samples_that_parse_alone(tar_blocks_dir: Path) -> None:
    manifest = read_manifest(str(tar_blocks_dir))
    blocks = manifest.shards.blocks
    assert blocks is not None
    assert manifest.shards.block_table().num_blocks > 3 * len(SHARD_SIZES)
    for shard, entry in zip(manifest.shards, blocks, strict=True):
        data = (tar_blocks_dir / shard.path).read_bytes()
        assert sum(n for n, *_ in entry) == shard.num_samples
        end = 0
        for n, offset, length, decoded, digest in entry:
            assert offset == end  # the blocks tile the members, in order
            end = offset + length
            span = data[offset:end]
            assert digest == hashlib.sha256(span).hexdigest()[:32]
            with tarfile.open(fileobj=io.BytesIO(span + bytes(1024)), mode="r") as tar:
                members = tar.getmembers()
            assert len({m.name.rsplit(".", 1)[0] for m in members}) == n  # whole samples
            assert decoded == sum(m.size for m in members)
        assert data[end:] == bytes(len(data) - end)  # the end-of-archive marker
        assert len(data) - end >= 1024


def test_tar_blocks_are_read_alone_and_serve_what_whole_shards_serve(
    tar_blocks_dir: Path,
) -> None:
    docs = source_docs()
    dataset = ShardDataset(str(tar_blocks_dir), config=StreamConfig(seed=5))
    assert dataset.resume_spec().config.shuffle_unit == "block"  # auto: digests known
    orders = {}
    for name, config in {
        "blocks": StreamConfig(seed=5),
        "blocks, no digest check": StreamConfig(seed=5, verify_local=False),
        "whole shards": StreamConfig(seed=5, shuffle_unit="shard"),
    }.items():
        samples = list(ShardDataset(str(tar_blocks_dir), config=config))
        ids = [s["sample_id"] for s in samples]
        assert sorted(ids) == list(range(NUM_SAMPLES)), name
        assert all(s["text"] == docs[s["sample_id"]]["text"] for s in samples), name
        assert all(s["score"] == docs[s["sample_id"]]["score"] for s in samples), name
        orders[name] = ids
    assert orders["blocks"] == orders["blocks, no digest check"]
    assert orders["blocks"] != orders["whole shards"]


def test_a_changed_tar_block_is_refused_naming_the_shard_and_block(
    tar_blocks_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "damaged"
    shutil.copytree(tar_blocks_dir, out)
    manifest = read_manifest(str(out))
    table = manifest.shards.block_table()
    shard = manifest.shards[2]
    unit = int((table.shard_index == 2).nonzero()[0][1])  # shard 2's second block
    path = out / shard.path
    data = bytearray(path.read_bytes())
    data[int(table.offset[unit]) + int(table.length[unit]) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{shard.path} block 1: bytes \[\d+, \d+\) do not"):
        list(ShardDataset(str(out), config=StreamConfig(seed=1)))


def test_a_truncated_tar_shard_is_refused_by_its_size(tar_blocks_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "short"
    shutil.copytree(tar_blocks_dir, out)
    manifest = read_manifest(str(out))
    shard = manifest.shards[0]
    path = out / shard.path
    path.write_bytes(path.read_bytes()[:2048])
    # Caught by its size before any block is read, even without digest checks.
    for verify in (True, False):
        config = StreamConfig(seed=1, verify_local=verify)
        with pytest.raises(ShardError, match=rf"{shard.path}: size 2048 bytes does not match"):
            list(ShardDataset(str(out), config=config))


def test_a_tar_zst_is_one_stream_read_whole(tar_zst_dir: Path, tmp_path: Path) -> None:
    manifest = read_manifest(str(tar_zst_dir))
    assert manifest.shards.blocks is None
    assert manifest.shards.block_table().num_samples.tolist() == list(SHARD_SIZES)
    assert ShardDataset(str(tar_zst_dir)).resume_spec().config.shuffle_unit == "shard"
    samples = list(ShardDataset(str(tar_zst_dir)))
    assert sorted(s["sample_id"] for s in samples) == list(range(NUM_SAMPLES))
    # A blocks column on a .tar.zst cannot be right: refused as corrupt.
    out = tmp_path / "edited"
    out.mkdir()
    doc = json.loads((tar_zst_dir / MANIFEST_NAME).read_text())
    one = [1] * len(SHARD_SIZES)
    doc["shards"]["blocks"] = {
        "count": one,
        "samples": list(SHARD_SIZES),
        "offset": [0] * len(one),
        "length": [10] * len(one),
    }
    (out / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=r"\.tar\.zst shards have a blocks column"):
        read_manifest(str(out))
