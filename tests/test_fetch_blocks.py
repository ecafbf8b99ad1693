"""BlockFetcher: ranged reads ahead in the order given, bounded in requests and bytes, checked."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from shardloader.blocks import BlockTable, block_digest
from shardloader.errors import ShardError
from shardloader.fetch_blocks import BlockFetcher

BLOCK = 100


class GatedStore:
    """Objects in memory whose reads wait for ``gate``; records each read's offset."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.gate = threading.Event()
        self.changed = threading.Condition()
        self.started: list[tuple[str, int]] = []
        self.running = 0
        self.peak = 0

    def read_range(self, url: str, offset: int, length: int) -> bytes:
        with self.changed:
            self.started.append((url, offset))
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.changed.notify_all()
        assert self.gate.wait(10)
        with self.changed:
            self.running -= 1
        return self.objects[url][offset : offset + length]

    def wait_started(self, n: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.started) >= n, timeout=10)


def table_of(objects: dict[str, bytes], urls: list[str]) -> BlockTable:
    """Blocks of ``BLOCK`` bytes, shard by shard."""
    rows = [
        (shard, batch, offset)
        for shard, url in enumerate(urls)
        for batch, offset in enumerate(range(0, len(objects[url]), BLOCK))
    ]
    shard_index = np.array([r[0] for r in rows], np.int64)
    offset = np.array([r[2] for r in rows], np.int64)
    digests = [
        block_digest(objects[urls[s]][o : o + BLOCK])
        for s, o in zip(shard_index, offset, strict=True)
    ]
    n = len(rows)
    return BlockTable(
        num_samples=np.ones(n, np.int64),
        shard_index=shard_index,
        batch_index=np.array([r[1] for r in rows], np.int64),
        offset=offset,
        length=np.full(n, BLOCK, np.int64),
        decoded=np.full(n, BLOCK, np.int64),
        digest=np.array(digests),
    )


@pytest.fixture
def store() -> tuple[GatedStore, list[str], BlockTable]:
    rng = np.random.default_rng(0)
    urls = ["s3://b/a.arrow", "s3://b/b.arrow"]
    objects = {url: rng.bytes(10 * BLOCK) for url in urls}
    return GatedStore(objects), urls, table_of(objects, urls)


def test_reads_start_in_the_order_given_within_the_byte_bound(store) -> None:
    gated, urls, table = store
    order = [13, 2, 7, 0, 19, 5]
    with BlockFetcher(gated, urls, table, max_requests=8, max_bytes=3 * BLOCK) as fetcher:
        fetcher.schedule(order)
        gated.wait_started(3)
        assert fetcher.held_bytes == 3 * BLOCK  # a fourth would pass max_bytes
        expected = [(urls[int(table.shard_index[u])], int(table.offset[u])) for u in order]
        assert gated.started == expected[:3]
        gated.gate.set()
        for unit in order:  # each taken frees its bytes for the next in line
            data = fetcher.take(unit)
            url = urls[int(table.shard_index[unit])]
            offset = int(table.offset[unit])
            assert data == gated.objects[url][offset : offset + BLOCK]
        assert gated.started == expected  # each read once, in order
        assert fetcher.held_bytes == 0
    assert gated.peak <= 3


def test_requests_in_flight_are_bounded_and_a_needed_block_jumps_the_line(store) -> None:
    gated, urls, table = store
    single = {"max_run_bytes": BLOCK}  # one GET per block
    with BlockFetcher(gated, urls, table, max_requests=2, max_bytes=1 << 20, **single) as fetcher:
        fetcher.schedule(range(10))
        gated.wait_started(2)
        assert fetcher.held_bytes == 2 * BLOCK
        gated.gate.set()
        assert fetcher.take(15) == gated.objects[urls[1]][5 * BLOCK : 6 * BLOCK]  # not listed
        for unit in range(10):
            fetcher.take(unit)
    assert gated.peak <= 2
    assert len(gated.started) == 11


def test_a_new_schedule_drops_blocks_no_longer_listed(store) -> None:
    gated, urls, table = store
    single = {"max_run_bytes": BLOCK}  # one GET per block
    with BlockFetcher(gated, urls, table, max_requests=1, max_bytes=1 << 20, **single) as fetcher:
        fetcher.schedule([0, 1, 2])
        gated.wait_started(1)
        fetcher.schedule([4, 5])  # 0 runs on; 1 and 2 are not started
        assert fetcher.held_bytes == 0
        gated.gate.set()
        assert fetcher.take(4) == gated.objects[urls[0]][4 * BLOCK : 5 * BLOCK]
        fetcher.take(5)
    assert [offset for _, offset in gated.started] == [0, 4 * BLOCK, 5 * BLOCK]


def test_a_block_that_does_not_match_its_digest_is_read_twice_then_refused(store) -> None:
    gated, urls, table = store
    damaged = bytearray(gated.objects[urls[1]])
    damaged[3 * BLOCK + 7] ^= 0xFF
    gated.objects[urls[1]] = bytes(damaged)
    gated.gate.set()
    with BlockFetcher(gated, urls, table) as fetcher:
        assert len(fetcher.take(12)) == BLOCK  # shard 1 batch 2: intact
        with pytest.raises(ShardError, match=r"^s3://b/b\.arrow batch 3: bytes \[300, 400\)"):
            fetcher.take(13)
    assert gated.started.count((urls[1], 3 * BLOCK)) == 2


def test_a_short_object_is_refused(store) -> None:
    gated, urls, table = store
    gated.objects[urls[0]] = gated.objects[urls[0]][: 9 * BLOCK + 10]
    gated.gate.set()
    with (
        BlockFetcher(gated, urls, table) as fetcher,
        pytest.raises(ShardError, match="came back 10 bytes long"),
    ):
        fetcher.take(9)


def test_close_cancels_what_is_queued(store) -> None:
    gated, urls, table = store
    fetcher = BlockFetcher(gated, urls, table, max_requests=1)
    fetcher.schedule(range(20))
    gated.wait_started(1)
    closing = threading.Thread(target=fetcher.close)
    closing.start()  # it waits for the read running, which waits for the gate
    while fetcher.held_bytes:  # close() has begun: nothing more starts
        closing.join(0.001)
    gated.gate.set()
    closing.join(10)
    assert not closing.is_alive()
    assert len(gated.started) == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("shardloader-range")]
    with pytest.raises(RuntimeError, match="closed"):
        fetcher.take(0)


def test_listed_neighbours_join_one_get(store) -> None:
    gated, urls, table = store
    with BlockFetcher(gated, urls, table, max_requests=1, max_run_bytes=4 * BLOCK) as fetcher:
        fetcher.schedule([3, 1, 2, 17, 4, 5, 9])  # 1-4 around 3 (5 would pass 4 blocks)
        gated.wait_started(1)
        assert fetcher.held_bytes == 4 * BLOCK
        gated.gate.set()
        for unit in (3, 1, 2, 17, 4, 5, 9):
            url = urls[int(table.shard_index[unit])]
            offset = int(table.offset[unit])
            assert fetcher.take(unit) == gated.objects[url][offset : offset + BLOCK]
    # One GET for 1-4, then 17 (shard 1's 8th block: not adjacent to 9, shard 0's last) and 5.
    assert gated.started == [
        (urls[0], 1 * BLOCK),
        (urls[1], 7 * BLOCK),
        (urls[0], 5 * BLOCK),
        (urls[0], 9 * BLOCK),
    ]


def test_a_damaged_block_in_a_run_is_read_alone_and_refused_alone(store) -> None:
    gated, urls, table = store
    damaged = bytearray(gated.objects[urls[0]])
    damaged[2 * BLOCK + 1] ^= 0xFF
    gated.objects[urls[0]] = bytes(damaged)
    gated.gate.set()
    with BlockFetcher(gated, urls, table) as fetcher:
        fetcher.schedule([1, 2, 3])
        assert fetcher.take(1) == gated.objects[urls[0]][BLOCK : 2 * BLOCK]
        with pytest.raises(ShardError, match=r"^s3://b/a\.arrow batch 2: .* \(read twice\)"):
            fetcher.take(2)
        assert fetcher.take(3) == gated.objects[urls[0]][3 * BLOCK : 4 * BLOCK]
    assert gated.started == [(urls[0], BLOCK), (urls[0], 2 * BLOCK)]  # the run, then 2 alone
