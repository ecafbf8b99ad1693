"""Reads single blocks of remote shards by ranged reads, several at once, in the order of use.

In block mode a worker's window mixes blocks of many shards, so fetching whole shards into the
node cache reads most of the dataset for a few blocks of each unless the cache holds it all. A
`BlockFetcher` instead reads each block alone, one ranged GET of exactly its bytes (``offset``,
``length`` from the manifest's block table), through `shardloader.fetch.ShardFetcher.read_range`
(the storage retry policy and the fetch counters), and checks them against the block's digest
before the reader decodes them. As the plan reads each block once per epoch, nothing is cached:
an epoch fetches the dataset's bytes once (the ranks' and workers' shares are disjoint).

Order and bounds: the reader lists the units it will need (`BlockFetcher.schedule`: the
window's blocks in order of first use, then the next windows'), and up to ``max_requests``
reads run at once on as many threads, starting in that order. A read starts only while the
bytes fetched and not yet taken (reads in flight included) stay within ``max_bytes``, so that is
what a process holds undecoded (plus one block asked for out of turn). A block the reader needs
before its read started is read at once, ahead of the list. A block whose bytes do not match
its digest is read once more (a damaged transfer), then refused naming the shard and batch.

Adjacent blocks: when a read starts, the listed blocks that lie right before and after it in the
same shard file join it, one GET of up to ``max_run_bytes`` for the run (the blocks' bytes are
contiguous in an Arrow file). A shuffled epoch over a large dataset rarely lists neighbours
together; reading in order (``shuffle=False``), or a dataset a few windows long, does, and a GET
costs far more CPU than its bytes (below).

Cost, measured on a 2-core machine against the loopback S3 server (rclone), 41 MB of text in 32
shards of 765 blocks (about 54 KB each compressed), one process, no DataLoader workers, one
epoch: every way fetched 41.2 MB (0.999x the shards). A GET costs about 1.7 ms of this process's
CPU, nearly all in botocore (building, signing and parsing the request), so the count of GETs
sets the time. One GET per block (no runs): 765 GETs, 3.1 s, against 0.6-0.95 s in whole
shards. With runs under the default 64 MiB windows, the first two windows list every block:
32 GETs (one per shard), 0.6-1.0 s. With 4 MiB windows, as a dataset much larger than its
window reads: 514 GETs, 1.9 s. First sample: 0.12-0.27 s in blocks, 0.11-0.31 s in whole shards.
Before, block mode over S3 fetched whole shards into the node cache: with an 8 MiB cache, 2.15x
the dataset (69 downloads of 32 shards). Since, on S3 a GET is a plain HTTP GET of a presigned
URL (`shardloader.storage.presigned`), 0.9-1.3 ms of CPU: one GET per block 1.9-3.0 s (CPU
1.3-1.6 s) where the same run through botocore took 3.8-4.3 s (CPU 3.1-3.4 s) on a busier
machine; 4 MiB windows 1.3-1.4 s against 1.9 s.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from typing import Protocol

from shardloader.blocks import BlockTable, block_digest
from shardloader.errors import ConfigError, ShardError

log = logging.getLogger(__name__)


class RangeReader(Protocol):
    """Reads byte ranges of remote objects (`shardloader.fetch.ShardFetcher.read_range`)."""

    def read_range(self, url: str, offset: int, length: int) -> bytes:
        """The ``length`` bytes at ``offset`` of ``url``, retried on transient failures."""


class BlockFetcher:
    """Fetches blocks of remote shards ahead of use by ranged reads, bounded in count and bytes.

    Creating one starts no thread; the first `schedule` or `take` does. Close it (or use it as a
    context manager) to cancel what is queued and wait for the reads running.

    Args:
        fetcher: Does each ranged read (with retries, counting bytes fetched).
        shard_urls: Full URL of every shard, in manifest order.
        blocks: The dataset's block table (a unit is a row of it).
        max_requests: Ranged reads in flight at once (threads).
        max_bytes: Bound on the bytes of blocks fetched or being fetched and not yet taken.
        max_run_bytes: Bound on one GET of adjacent listed blocks (one block: no runs).
    """

    def __init__(
        self,
        fetcher: RangeReader,
        shard_urls: Sequence[str],
        blocks: BlockTable,
        *,
        max_requests: int = 8,
        max_bytes: int = 64 << 20,
        max_run_bytes: int = 4 << 20,
    ) -> None:
        if max_requests < 1 or max_bytes < 1:
            raise ConfigError(
                f"max_requests={max_requests}, max_bytes={max_bytes}; both must be >= 1"
            )
        self._fetcher = fetcher
        self._urls = list(shard_urls)
        self._blocks = blocks
        self._max_requests = max_requests
        self._max_bytes = max_bytes
        self._max_run_bytes = max_run_bytes
        self._lock = threading.RLock()  # a done callback may run in the thread that submits
        self._pool: ThreadPoolExecutor | None = None
        self._queue: dict[int, None] = {}  # units to read, in order, not started
        self._started: dict[int, Future[bytes]] = {}  # running or done, not yet taken
        self._running = 0  # GETs
        self._held = 0  # bytes of the units in _started
        self._closed = False

    @property
    def held_bytes(self) -> int:
        """Bytes of the blocks being read or read and not yet taken."""
        with self._lock:
            return self._held

    def schedule(self, units: Iterable[int]) -> None:
        """Read ``units`` ahead, in this order; replaces the list given before.

        Units already started stay; a started unit not listed any more is dropped (its bytes
        freed, its read cancelled if it has not begun).
        """
        order = list(dict.fromkeys(units))
        wanted = set(order)
        with self._lock:
            self._check_open()
            for unit in [u for u in self._started if u not in wanted]:
                self._forget(unit, self._started.pop(unit))
            self._queue = {u: None for u in order if u not in self._started}
            self._pump()

    def take(self, unit: int) -> bytes:
        """The bytes of ``unit``, checked against its digest; waits for its read.

        A unit not started yet is read now, ahead of the list. Its bytes are no longer held.

        Raises:
            ShardError: The block's bytes do not match its digest (read twice), or its shard is
                missing.
            StorageError: As `shardloader.fetch.ShardFetcher.read_range`.
        """
        with self._lock:
            self._check_open()
            future = self._started.get(unit)
            if future is None:
                self._queue.pop(unit, None)
                self._start([unit])
                future = self._started[unit]
        try:
            return future.result()
        finally:
            with self._lock:
                if self._started.get(unit) is future:
                    del self._started[unit]
                    self._held -= self._length(unit)
                if not self._closed:
                    self._pump()

    def close(self) -> None:
        """Cancel the reads not begun and wait for the running ones (one block each)."""
        with self._lock:
            self._closed = True
            self._queue.clear()
            for future in self._started.values():
                future.cancel()
            self._started.clear()
            self._held = 0
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BlockFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals (called with the lock held) -------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("BlockFetcher is closed")

    def _length(self, unit: int) -> int:
        return int(self._blocks.length[unit])

    def _pump(self) -> None:
        """Start queued reads in order while a thread is free and the bytes allow."""
        while self._queue and self._running < self._max_requests:
            unit = next(iter(self._queue))
            if self._held and self._held + self._length(unit) > self._max_bytes:
                return
            del self._queue[unit]
            self._start(self._run_around(unit))

    def _run_around(self, unit: int) -> list[int]:
        """``unit`` with the listed blocks adjacent to it in its shard file, within the bounds."""
        table = self._blocks
        shard = table.shard_index[unit]
        run = [unit]
        size = self._length(unit)

        def joins(other: int, offset: int) -> bool:
            return (
                other in self._queue
                and table.shard_index[other] == shard
                and int(table.offset[other]) == offset
                and size + self._length(other) <= self._max_run_bytes
                and self._held + size + self._length(other) <= self._max_bytes
            )

        while run[0] > 0 and joins(
            run[0] - 1, int(table.offset[run[0]]) - self._length(run[0] - 1)
        ):
            run.insert(0, run[0] - 1)
            size += self._length(run[0])
            del self._queue[run[0]]
        last = table.num_blocks - 1
        while run[-1] < last and joins(
            run[-1] + 1, int(table.offset[run[-1]]) + self._length(run[-1])
        ):
            run.append(run[-1] + 1)
            size += self._length(run[-1])
            del self._queue[run[-1]]
        return run

    def _start(self, run: list[int]) -> None:
        """Start one GET for the adjacent blocks ``run``; each gets its own future."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                self._max_requests, thread_name_prefix="shardloader-range"
            )
        futures: list[Future[bytes]] = []
        for unit in run:
            future: Future[bytes] = Future()
            self._started[unit] = future
            self._held += self._length(unit)
            futures.append(future)
        self._running += 1
        task = self._pool.submit(self._read_run, run, futures)
        task.add_done_callback(self._finished)

    def _finished(self, _: Future[None]) -> None:
        with self._lock:
            self._running -= 1
            if not self._closed:
                self._pump()

    def _forget(self, unit: int, future: Future[bytes]) -> None:
        future.cancel()  # a running read finishes; its bytes are dropped with the future
        self._held -= self._length(unit)

    # -- one read (on a pool thread) -------------------------------------------------------------

    def _read_run(self, run: list[int], futures: list[Future[bytes]]) -> None:
        """One GET for ``run``, each block checked on its own (and read alone if it fails)."""
        try:
            if all(f.cancelled() for f in futures):
                return
            table = self._blocks
            start = int(table.offset[run[0]])
            data: bytes | None = None
            if len(run) > 1:
                stop = int(table.offset[run[-1]]) + self._length(run[-1])
                url = self._urls[int(table.shard_index[run[0]])]
                data = self._fetcher.read_range(url, start, stop - start)
            for unit, future in zip(run, futures, strict=True):
                if future.cancelled():
                    continue
                piece = None
                if data is not None:
                    at = int(table.offset[unit]) - start
                    piece = data[at : at + self._length(unit)]
                try:
                    _settle(future, self._read(unit, piece))
                except Exception as err:  # noqa: BLE001 - raised where the block is taken
                    _settle(future, error=err)
        except BaseException as err:
            for future in futures:
                _settle(future, error=err)
            if not isinstance(err, Exception):
                raise

    def _read(self, unit: int, first: bytes | None = None) -> bytes:
        """The checked bytes of ``unit``: ``first`` (read with its run) or a read of its own."""
        table = self._blocks
        shard, batch = int(table.shard_index[unit]), int(table.batch_index[unit])
        offset, length = int(table.offset[unit]), int(table.length[unit])
        digest = str(table.digest[unit])
        url = self._urls[shard]
        for attempt in range(2):
            if attempt == 0 and first is not None:
                data = first
            else:
                data = self._fetcher.read_range(url, offset, length)
            if len(data) == length and block_digest(data) == digest:
                return data
            what = f"{url} batch {batch}: bytes [{offset}, {offset + length}) " + (
                f"came back {len(data)} bytes long"
                if len(data) != length
                else "do not match the manifest's block digest"
            )
            if attempt == 0:
                log.warning("%s; reading them once more", what)
        raise ShardError(
            f"{what} (read twice); the shard was modified or corrupted: run "
            '"shardloader verify", then restore or convert it again'
        )


def _settle(
    future: Future[bytes], result: bytes = b"", *, error: BaseException | None = None
) -> None:
    """Give ``future`` its result or error, unless it was cancelled meanwhile."""
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except InvalidStateError:
        pass  # cancelled (dropped from the list, or the fetcher closed)
