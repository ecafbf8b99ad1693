"""Streaming from a real S3-compatible server on 127.0.0.1: splits, locality, outages, damage."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardloader import ShardDataset, ShardError, ShardLoader, StreamConfig, read_manifest
from shardloader.testing import S3Server
from tests.streaming import NUM_SAMPLES, ids_of, serve_dataset

pytestmark = pytest.mark.s3


@pytest.fixture
def server(dataset_dir: Path) -> Iterator[S3Server]:
    with serve_dataset(dataset_dir) as s3:
        yield s3


def dataset_bytes(local: Path) -> int:
    return read_manifest(str(local)).num_bytes


def cached_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file() and "shard" in str(p))


def test_ranks_and_workers_split_exactly_and_fetch_only_their_share(
    server: S3Server, dataset_dir: Path, tmp_path: Path
) -> None:
    world_size = 3
    per_rank, fetched = [], 0
    for rank in range(world_size):
        cache = tmp_path / f"cache-{rank}"
        dataset = ShardDataset(
            "s3://data/set",
            config=StreamConfig(cache_dir=str(cache)),
            rank=rank,
            world_size=world_size,
            storage_options=server.storage_options,
        )
        loader = ShardLoader(dataset, batch_size=8, num_workers=2, collate_fn=ids_of)
        per_rank.append([i for batch in loader for i in batch])
        fetched += cached_bytes(cache)
    assert [len(ids) for ids in per_rank] == [NUM_SAMPLES // world_size] * world_size
    union = [i for ids in per_rank for i in ids]
    assert len(union) == len(set(union))
    # Each rank fetches its own shards; only shards cut by a rank boundary are fetched twice.
    sizes = read_manifest(str(dataset_dir)).shards.column("num_bytes")
    assert fetched <= dataset_bytes(dataset_dir) + (world_size - 1) * max(sizes)
    assert fetched >= dataset_bytes(dataset_dir)


@pytest.mark.slow
def test_server_down_mid_epoch_then_back_loses_nothing(server: S3Server, tmp_path: Path) -> None:
    config = StreamConfig(
        cache_dir=str(tmp_path / "cache"), shuffle_window=1, prefetch_windows=0, timeout_s=2.0
    )
    dataset = ShardDataset("s3://data/set", config=config, storage_options=server.storage_options)
    loader = ShardLoader(dataset, batch_size=8, num_workers=0, collate_fn=ids_of)
    got: list[int] = []
    restarted = threading.Event()

    def outage() -> None:
        server.stop()
        time.sleep(2.5)
        server.start_again()
        restarted.set()

    for batch in loader:
        got += batch
        if len(got) == 160:  # inside the first shard (300 samples): later shards not yet fetched
            threading.Thread(target=outage, daemon=True).start()
            time.sleep(0.2)
    assert restarted.wait(30)
    assert sorted(got) == list(range(NUM_SAMPLES))
    assert dataset.fetch_stats["retries"] >= 1  # it did wait for the server


def test_a_replaced_shard_is_refused_naming_it(server: S3Server, tmp_path: Path) -> None:
    victim = sorted((server.data_dir / "data" / "set").glob("shard-*.arrow"))[2]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    dataset = ShardDataset(
        "s3://data/set",
        config=StreamConfig(cache_dir=str(tmp_path / "cache")),
        storage_options=server.storage_options,
    )
    with pytest.raises(ShardError, match=victim.name) as caught:
        list(dataset)
    assert "s3://" in str(caught.value)


def test_block_mode_from_s3_splits_exactly_through_one_node_cache(
    blocks_dir: Path, tmp_path: Path
) -> None:
    """shuffle_unit="block" over S3: remote shards are fetched whole into the node cache, once.

    A block-mode rank reads blocks of most shards, so the ranks of a node share one cache (as
    they do by default): every shard is fetched once, and the split is exact.
    """
    world_size = 2
    cache = tmp_path / "node-cache"
    config = StreamConfig(cache_dir=str(cache), shuffle_unit="block", shuffle_window=8, seed=4)
    with serve_dataset(blocks_dir) as s3:
        per_rank = []
        for rank in range(world_size):
            dataset = ShardDataset(
                "s3://data/set",
                config=config,
                rank=rank,
                world_size=world_size,
                storage_options=s3.storage_options,
            )
            loader = ShardLoader(dataset, batch_size=8, num_workers=2, collate_fn=ids_of)
            per_rank.append([i for batch in loader for i in batch])
    assert [len(ids) for ids in per_rank] == [NUM_SAMPLES // world_size] * world_size
    union = [i for ids in per_rank for i in ids]
    assert len(union) == len(set(union)) == NUM_SAMPLES - NUM_SAMPLES % world_size
    assert cached_bytes(cache) == dataset_bytes(blocks_dir)  # each shard fetched once
    local = [
        i
        for rank in range(world_size)
        for batch in ShardLoader(
            ShardDataset(str(blocks_dir), config=config, rank=rank, world_size=world_size),
            batch_size=8,
            num_workers=2,
            collate_fn=ids_of,
        )
        for i in batch
    ]
    assert local == union  # the same order as from local disk
