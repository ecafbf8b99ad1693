"""Streaming from a real S3-compatible server on 127.0.0.1: splits, locality, outages, damage."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch.utils.data

from shardloader import (
    ShardDataset,
    ShardError,
    ShardLoader,
    StreamConfig,
    merge_states,
    read_manifest,
)
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
            config=StreamConfig(cache_dir=str(cache), shuffle_unit="shard"),
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
        config=StreamConfig(cache_dir=str(tmp_path / "cache"), shuffle_unit="shard"),
        storage_options=server.storage_options,
    )
    with pytest.raises(ShardError, match=victim.name) as caught:
        list(dataset)
    assert "s3://" in str(caught.value)


def ids_and_fetched(batch: list[dict[str, Any]]) -> tuple[list[int], tuple[int, float]]:
    """A collate_fn for workers: the sample ids, and this worker's bytes fetched so far."""
    info = torch.utils.data.get_worker_info()
    assert info is not None
    fetched = info.dataset.fetch_counters().get("bytes_fetched", 0)  # type: ignore[attr-defined]
    return ids_of(batch), (info.id, fetched)


@pytest.mark.parametrize("fixture", ["blocks_dir", "tar_blocks_dir"])
def test_block_mode_from_s3_reads_each_block_once_by_ranged_reads(
    fixture: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Block mode reads an S3 dataset's blocks, each by one ranged read: no whole-shard download.

    2 ranks x 2 workers (real processes) read every sample once, in the order of local disk,
    and fetch the dataset's blocks once: at most 1.1x the shards' bytes, nothing in the cache.
    Arrow record batches and plain tar's runs of samples alike.
    """
    blocks_dir: Path = request.getfixturevalue(fixture)
    world_size = 2
    cache = tmp_path / "node-cache"
    config = StreamConfig(cache_dir=str(cache), shuffle_window=8, seed=4, shuffle_unit="block")
    manifest = read_manifest(str(blocks_dir))
    blocks = manifest.shards.block_table()
    per_rank, fetched = [], 0.0
    with serve_dataset(blocks_dir) as s3:
        for rank in range(world_size):
            dataset = ShardDataset(
                "s3://data/set",
                config=config,
                rank=rank,
                world_size=world_size,
                storage_options=s3.storage_options,
            )
            assert dataset.resume_spec().config.shuffle_unit == "block"
            auto = ShardDataset("s3://data/set", storage_options=s3.storage_options)
            assert auto.resume_spec().config.shuffle_unit == "shard"  # "auto" on S3
            loader = ShardLoader(dataset, batch_size=8, num_workers=2, collate_fn=ids_and_fetched)
            ids: list[int] = []
            last: dict[int, float] = {}
            for batch, (worker, num_bytes) in loader:
                ids += batch
                last[worker] = num_bytes
            assert sorted(last) == [0, 1]  # both workers read
            per_rank.append(ids)
            fetched += sum(last.values())
    assert [len(ids) for ids in per_rank] == [NUM_SAMPLES // world_size] * world_size
    union = [i for ids in per_rank for i in ids]
    assert len(union) == len(set(union)) == NUM_SAMPLES - NUM_SAMPLES % world_size
    assert cached_bytes(cache) == 0  # no shard was downloaded whole
    # Every block once (less at most the block of the one sample the "drop" policy defers).
    assert int(blocks.length.sum()) - int(blocks.length.max()) <= fetched
    assert fetched <= 1.1 * dataset_bytes(blocks_dir)
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


def test_a_damaged_block_on_s3_is_refused_naming_shard_and_batch(
    blocks_dir: Path, tmp_path: Path
) -> None:
    manifest = read_manifest(str(blocks_dir))
    blocks = manifest.shards.block_table()
    unit = int(np.flatnonzero(blocks.shard_index == 2)[1])  # shard 2's second record batch
    name = manifest.shards.column("path")[2]
    with serve_dataset(blocks_dir) as s3:
        victim = s3.data_dir / "data" / "set" / name
        data = bytearray(victim.read_bytes())
        data[int(blocks.offset[unit]) + int(blocks.length[unit]) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
        dataset = ShardDataset(
            "s3://data/set",
            config=StreamConfig(cache_dir=str(tmp_path / "cache"), shuffle_unit="block"),
            storage_options=s3.storage_options,
        )
        with pytest.raises(ShardError, match="read twice") as caught:
            list(dataset)
    message = str(caught.value)
    assert message.startswith(f"s3://data/set/{name} batch {int(blocks.batch_index[unit])}: ")
    assert "block digest" in message
    assert dataset.fetch_stats["range_reads"] >= 2  # read again once before refusing


def test_block_mode_from_s3_resumes_mid_epoch_with_the_same_remaining_ids(
    blocks_dir: Path, tmp_path: Path
) -> None:
    """A state saved mid-epoch over ranged reads resumes exactly; so does an old shard state."""
    with serve_dataset(blocks_dir) as s3:

        def make(**config: Any) -> ShardLoader:
            dataset = ShardDataset(
                "s3://data/set",
                config=StreamConfig(cache_dir=str(tmp_path / "cache"), seed=2, **config),
                storage_options=s3.storage_options,
            )
            return ShardLoader(dataset, batch_size=8, num_workers=2, collate_fn=ids_of)

        for unit in ("block", "shard"):  # "shard": what "auto" chooses on S3
            full = [i for b in make(shuffle_unit=unit) for i in b]
            loader = make(shuffle_unit=unit)
            head: list[int] = []
            for batch in loader:
                head += batch
                if len(head) == 200:
                    break
            state = json.loads(json.dumps(loader.state_dict()))
            saved_unit = state["config"].get("shuffle_unit", "shard")  # (old states: no key)
            assert saved_unit == unit
            resumed = make()  # "auto": the state's unit is taken back
            resumed.load_state_dict(state)
            rest = [i for b in resumed for i in b]
            assert head + rest == full
            assert len(full) == NUM_SAMPLES
            assert 0 < len(rest) < NUM_SAMPLES  # not vacuous


@pytest.mark.parametrize(
    "settings",
    [
        {"decode_threads": 2, "policy": "pad"},  # reads waited for on the decode threads
        {"range_requests": 1, "range_bytes": 1},  # one block at a time
    ],
)
def test_ranged_reads_serve_what_local_disk_serves(
    blocks_dir: Path, tmp_path: Path, settings: dict[str, Any]
) -> None:
    config = StreamConfig(
        cache_dir=str(tmp_path / "cache"),
        shuffle_window=16,
        seed=9,
        shuffle_unit="block",
        **settings,
    )
    with serve_dataset(blocks_dir) as s3:
        remote = [
            [
                (s["sample_id"], s["text"])
                for s in ShardDataset(
                    "s3://data/set",
                    config=config,
                    rank=rank,
                    world_size=3,
                    storage_options=s3.storage_options,
                )
            ]
            for rank in range(3)
        ]
    local = [
        [
            (s["sample_id"], s["text"])
            for s in ShardDataset(str(blocks_dir), config=config, rank=rank, world_size=3)
        ]
        for rank in range(3)
    ]
    assert remote == local
    assert sum(map(len, remote)) >= NUM_SAMPLES - 2  # (the "drop" policy defers 1)


def test_block_mode_from_s3_resumes_elastically(blocks_dir: Path, tmp_path: Path) -> None:
    """2 ranks x 2 workers stop mid-epoch; 3 ranks x 1 worker serve the rest, once each."""
    config = StreamConfig(
        cache_dir=str(tmp_path / "cache"), shuffle_window=8, seed=5, shuffle_unit="block"
    )
    with serve_dataset(blocks_dir) as s3:

        def loader(rank: int, world_size: int, num_workers: int) -> ShardLoader:
            dataset = ShardDataset(
                "s3://data/set",
                config=config,
                rank=rank,
                world_size=world_size,
                storage_options=s3.storage_options,
            )
            return ShardLoader(dataset, batch_size=6, num_workers=num_workers, collate_fn=ids_of)

        consumed: list[int] = []
        states = []
        for rank in range(2):
            old = loader(rank, 2, 2)
            for batch in old:
                consumed += batch
                if len(consumed) >= 60 * (rank + 1):
                    break
            states.append(json.loads(json.dumps(old.state_dict())))
        merged = merge_states(states).to_dict()
        assert merged["config"]["shuffle_unit"] == "block"
        rest = []
        for rank in range(3):
            new = loader(rank, 3, 1)
            new.load_state_dict(merged)
            rest.append([i for b in new for i in b])
    assert len({len(r) for r in rest}) == 1
    served = consumed + [i for r in rest for i in r]
    assert len(served) == len(set(served))
    assert NUM_SAMPLES - len(served) <= (2 - 1) + (3 - 1)
    assert 0 < len(consumed) < NUM_SAMPLES - 100  # not vacuous: stopped mid-epoch
