"""Damage to the shard cache and to local shards: recovered where a copy exists, named where not.

The S3 tests stream from a real loopback S3 server (``shardloader.testing``) through DataLoader
workers (0 and 2) and damage the cache the way a user or a disk would: the folder deleted
mid-epoch, the folder replaced by a file, a bit flipped in a cached shard. Local shards get a
flipped bit with the size and mtime unchanged (bit rot), read in a fresh process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardloader import ShardDataset, ShardError, ShardLoader, StreamConfig
from shardloader.errors import StorageError
from shardloader.fetch import ShardFetcher
from shardloader.testing import S3Server
from tests.streaming import NUM_SAMPLES, ids_of, serve_dataset

ALL_IDS = list(range(NUM_SAMPLES))


@pytest.fixture
def server(dataset_dir: Path) -> Iterator[S3Server]:
    with serve_dataset(dataset_dir) as s3:
        yield s3


def flip_bit(path: Path, offset: int, *, keep_mtime: bool = True) -> None:
    """Flip the lowest bit of byte ``offset`` (negative: from the end); size (and mtime) kept."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def s3_dataset(server: S3Server, cache: Path, **config: Any) -> ShardDataset:
    # shuffle=False and one shard per window: later shards are opened well after the damage.
    # Whole shards: the node cache is under test (block mode reads remote blocks by ranged reads).
    config = {
        "shuffle": False,
        "shuffle_window": 1,
        "prefetch_windows": 0,
        "shuffle_unit": "shard",
        **config,
    }
    return ShardDataset(
        "s3://data/set",
        config=StreamConfig(cache_dir=str(cache), **config),
        storage_options=server.storage_options,
    )


def stream(dataset: ShardDataset, num_workers: int, damage: Any = None, at: int = 16) -> list[int]:
    """All sample ids of one epoch; ``damage()`` runs once ``at`` ids have arrived."""
    loader = ShardLoader(dataset, batch_size=8, num_workers=num_workers, collate_fn=ids_of)
    got: list[int] = []
    for batch in loader:
        got += batch
        if damage is not None and len(got) == at:
            damage()
    return got


def remove(folder: Path) -> None:
    """Delete ``folder`` at once, though workers write into it: rename it away, then delete."""
    gone = folder.with_name(folder.name + "-gone")
    folder.rename(gone)
    shutil.rmtree(gone)


def open_args(shard: Path) -> dict[str, Any]:
    """The ``open_decoded`` arguments of a local ``shard``, as served at ``s3://data/set``."""
    return {
        "url": f"s3://data/set/{shard.name}",
        "num_bytes": shard.stat().st_size,
        "checksum": hashlib.sha256(shard.read_bytes()).hexdigest(),
    }


def cached_shards(cache: Path) -> list[Path]:
    return sorted((cache / "shards").iterdir())


# -- the cache folder -------------------------------------------------------------------------


@pytest.mark.s3
@pytest.mark.parametrize("num_workers", [0, 2])
def test_cache_folder_deleted_mid_epoch_is_made_again(server, tmp_path, num_workers):
    cache = tmp_path / "cache"
    dataset = s3_dataset(server, cache)
    deleted: list[bool] = []

    def damage() -> None:
        remove(cache)
        deleted.append(True)

    assert sorted(stream(dataset, num_workers, damage)) == ALL_IDS
    assert deleted
    # Only the fetcher makes these folders, so they were made again after the deletion.
    assert {p.name for p in cache.iterdir()} >= {"shards", "tmp", "locks"}
    assert cached_shards(cache)


@pytest.mark.s3
def test_locks_folder_deleted_is_made_again(server, dataset_dir, tmp_path, caplog):
    cache = tmp_path / "cache"
    shards = sorted(dataset_dir.glob("shard-*.arrow"))
    args = [
        {
            "url": f"s3://data/set/{p.name}",
            "num_bytes": p.stat().st_size,
            "checksum": hashlib.sha256(p.read_bytes()).hexdigest(),
        }
        for p in shards[:2]
    ]
    with ShardFetcher(cache_dir=str(cache), storage_options=server.storage_options) as f:
        f.open(**args[0]).release()
        shutil.rmtree(cache / "locks")
        with (
            caplog.at_level(logging.WARNING, logger="shardloader.cache"),
            f.open(**args[1]) as local,
        ):
            assert Path(local.path).read_bytes() == shards[1].read_bytes()
        assert f.stats["cache_misses"] == 2
    assert (cache / "locks").is_dir()
    assert str(cache) in caplog.text


@pytest.mark.s3
@pytest.mark.parametrize("num_workers", [0, 2])
def test_cache_folder_replaced_by_a_file_fails_naming_it(server, tmp_path, num_workers):
    cache = tmp_path / "cache"
    dataset = s3_dataset(server, cache)

    def damage() -> None:
        # Workers re-create a missing cache folder at once, so swap a file in atomically: rename
        # the folder away and the file in; retry if a worker made the folder again in between.
        blocker = tmp_path / "blocker"
        for attempt in range(100):
            if cache.is_dir():
                cache.rename(tmp_path / f"gone-{attempt}")
            blocker.write_text("not a folder")
            try:
                blocker.rename(cache)
                return
            except IsADirectoryError:
                continue
        raise AssertionError("could not replace the cache folder by a file")

    with pytest.raises(StorageError, match="cache") as caught:
        stream(dataset, num_workers, damage)
    message = str(caught.value)
    assert str(cache) in message
    assert "pass another cache_dir" in message
    assert "Traceback" not in message.splitlines()[0]


# -- a damaged cached shard -------------------------------------------------------------------


@pytest.mark.s3
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize(
    ("verify_local", "offset"),
    [
        (True, None),  # a bit in the middle of the data: found by the hash of the first use
        (False, -1),  # the footer's magic: found by the decoder, no hash asked for
    ],
)
def test_cached_shard_with_a_flipped_bit_is_fetched_again(
    server, dataset_dir, tmp_path, num_workers, verify_local, offset
):
    cache = tmp_path / "cache"
    assert sorted(stream(s3_dataset(server, cache), 0)) == ALL_IDS  # fills the cache
    entries = cached_shards(cache)
    assert len(entries) == 7
    originals = {p: p.read_bytes() for p in entries}
    for entry in entries:
        flip_bit(entry, entry.stat().st_size // 2 if offset is None else offset)
    dataset = s3_dataset(server, cache, verify_local=verify_local)
    assert sorted(stream(dataset, num_workers)) == ALL_IDS
    # Every damaged entry was dropped and fetched again: the cache holds good copies now.
    for entry, data in originals.items():
        assert entry.read_bytes() == data


@pytest.mark.s3
def test_dropping_a_damaged_entry_warns_naming_it(server, tmp_path, caplog):
    cache = tmp_path / "cache"
    stream(s3_dataset(server, cache), 0)
    entry = cached_shards(cache)[0]
    flip_bit(entry, entry.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="shardloader.cache"):
        dataset = s3_dataset(server, cache)
        assert sorted(stream(dataset, 0)) == ALL_IDS
    assert f"{entry}: cached copy of s3://data/set/" in caplog.text
    assert "dropping it and fetching again" in caplog.text
    assert dataset.fetch_stats["cache_misses"] == 1  # only the damaged one


@pytest.mark.s3
def test_cached_copy_that_never_decodes_names_url_and_cache_path(
    server, dataset_dir, tmp_path, caplog
):
    shard = sorted(dataset_dir.glob("shard-*.arrow"))[0]
    args = open_args(shard)
    calls: list[str] = []

    def decode(path: str) -> None:
        calls.append(path)
        raise OSError("ZSTD decompression failed")

    cache = tmp_path / "cache"
    with ShardFetcher(cache_dir=str(cache), storage_options=server.storage_options) as f:
        with pytest.raises(ShardError) as caught:
            f.open_decoded(**args, decode=decode)
        assert f.stats["bytes_fetched"] == 2 * args["num_bytes"]  # fetched again, once
    message = str(caught.value)
    assert message.startswith(f"{args['url']} (cached at {cache}")
    assert "ZSTD decompression failed" in message
    assert "shardloader verify" in message
    assert len(calls) == 2


@pytest.mark.s3
def test_cached_copy_decoding_on_the_second_try_is_served(server, dataset_dir, tmp_path):
    shard = sorted(dataset_dir.glob("shard-*.arrow"))[0]
    args = open_args(shard)
    calls: list[str] = []

    def decode(path: str) -> bytes:
        calls.append(path)
        if len(calls) == 1:
            raise ValueError("bad bytes")
        return Path(path).read_bytes()

    with ShardFetcher(cache_dir=str(tmp_path / "c"), storage_options=server.storage_options) as f:
        local, data = f.open_decoded(**args, decode=decode)
        with local:
            assert data == shard.read_bytes()
        assert f.stats["cache_misses"] == 2


# -- a damaged local shard --------------------------------------------------------------------

_STREAM_LOCAL = """
import sys
from shardloader import ShardDataset, ShardError, StreamConfig
try:
    n = sum(1 for _ in ShardDataset(sys.argv[1], config=StreamConfig(shuffle=False)))
except ShardError as err:
    print("ShardError:", err)
else:
    print("streamed", n)
"""


def stream_in_fresh_process(dataset: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", _STREAM_LOCAL, str(dataset)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    return done.stdout.strip()


@pytest.mark.parametrize("keep_mtime", [True, False])
def test_local_shard_with_a_flipped_bit_is_refused_in_a_fresh_process(
    dataset_dir, tmp_path, keep_mtime
):
    dataset = tmp_path / "set"
    shutil.copytree(dataset_dir, dataset)
    assert stream_in_fresh_process(dataset) == f"streamed {NUM_SAMPLES}"
    victim = sorted(dataset.glob("shard-*.arrow"))[0]
    flip_bit(victim, victim.stat().st_size // 2, keep_mtime=keep_mtime)
    out = stream_in_fresh_process(dataset)
    # Read in blocks (the default for a dataset convert made): the damaged block's own digest
    # catches it, naming the shard and the record batch.
    assert out.startswith(f"ShardError: {victim} batch ")
    assert "do not match the manifest's block digest" in out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_local_shard_rotting_between_epochs_is_refused(dataset_dir, tmp_path, num_workers):
    copy = tmp_path / "set"
    shutil.copytree(dataset_dir, copy)
    dataset = ShardDataset(str(copy), config=StreamConfig(shuffle=False))
    assert sorted(stream(dataset, num_workers)) == ALL_IDS
    victim = sorted(copy.glob("shard-*.arrow"))[2]
    flip_bit(victim, victim.stat().st_size // 2)  # bit rot: size and mtime unchanged
    # A new ShardDataset (a new run in this process) and new workers check afresh: in blocks,
    # the block's digest; in whole shards, the shard's sha256.
    dataset = ShardDataset(str(copy), config=StreamConfig(shuffle=False))
    with pytest.raises(ShardError, match=f"{victim} batch .* block digest"):
        stream(dataset, num_workers)
    dataset = ShardDataset(str(copy), config=StreamConfig(shuffle=False, shuffle_unit="shard"))
    with pytest.raises(ShardError, match=f"{victim}: sha256 .* does not match manifest"):
        stream(dataset, num_workers)
