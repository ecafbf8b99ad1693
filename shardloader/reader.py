"""Runs one worker's plan: fetch shards via a fetcher, decode them via their format, yield samples.

A worker's share comes as windows of unit pieces (`shardloader.plan.WorkerPlan`); a unit is a
shard, or with ``shuffle_unit="block"`` a block (`shardloader.blocks.BlockTable`: an Arrow record
batch). For each window the reader asks the fetcher for the shards the window touches and those
of the next windows, then yields the window's samples in plan order, in slices.

- Whole shards are decoded before the window's first sample.
- Blocks are decoded in the order the samples first need them, on ``decode_threads`` threads,
  while this thread makes samples. A window's first slice is `FIRST_SLICE` samples and each
  next one twice as large, so the first sample waits for a few blocks, not for the window.
  Local Arrow blocks are decoded in groups (`GROUP_BLOCKS`; the first group is the first
  slice's): one buffer, one decode and one validation per group, so a
  decode thread takes the GIL back a few times per group, not about ten times per block, and
  two threads decode side by side (`GroupBlockFormat`). A spread window's first 2% of samples
  touch nearly all its blocks, so decoding cannot hide behind making samples; it can use two
  cores. A 300 MB text pass without workers: blocks 0.72 s on this thread, 0.75-0.84 s on two
  threads one block at a time, 0.53-0.60 s in groups on two (whole shards: 0.54-0.67 s).

Decoded units are kept only while the current window needs them, so a worker holds one window
decoded: ``shuffle_window`` shards, or the blocks of at most ``shuffle_bytes`` decoded bytes. A
block is read alone from its shard: with a digest in the block table its bytes are copied,
checked against the digest and decoded (so the shard is not hashed whole in each process), else
``RecordBatchFileReader.get_batch``. A block of a remote shard with a digest is read alone by a
ranged read (`shardloader.fetch_blocks.BlockFetcher`: several at once, in order of first use,
bounded in bytes), checked and decoded from memory; the node cache is not used for it. Whole
remote shards (and blocks without a digest) are fetched into the node cache.

Rows become Python objects a slice at a time (one ``take`` per unit). For packing,
`ShardReader.iter_token_runs` gives the slices' token documents as flat arrays instead, with no
object per sample.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol, cast

import numpy as np

from shardloader import storage
from shardloader.blocks import WHOLE_SHARD, BlockTable
from shardloader.fetch_blocks import BlockFetcher
from shardloader.formats import (
    BlockFormat,
    BlockRead,
    GroupBlockFormat,
    RangeBlockFormat,
    ReadSpec,
    ShardColumns,
    VerifiedBlockFormat,
    get_format,
)
from shardloader.manifest import Manifest
from shardloader.plan import Window, WorkerPlan

log = logging.getLogger(__name__)

Sample = dict[str, Any]
SLICE = 16384  # samples made into Python objects at a time (a window of blocks spans hundreds of
# blocks: fewer, larger takes per block; 16,384 documents of a few KB are tens of MB)
FIRST_SLICE = 32  # a window's first slice; each next one is twice as large, up to SLICE
GROUP_BLOCKS = 64  # blocks decoded together on a decode thread (the first group: FIRST_SLICE)
GROUP_THREADS = 2  # decode threads by default where blocks are decoded in groups
_NO_TOKENS = np.zeros(0, np.uint16)


class TokenRun(NamedTuple):
    """Consecutive token documents of a worker's share (`ShardReader.iter_token_runs`).

    Attributes:
        sample_ids: Each document's global sample id, in reading order (int64).
        lengths: Each document's token count (int64).
        tokens: Each document's tokens (views of the decoded shards, their dtype).
    """

    sample_ids: np.ndarray
    lengths: np.ndarray
    tokens: list[np.ndarray]


class LocalFile(Protocol):
    """A shard on local disk, pinned until released."""

    path: str

    def release(self) -> None:
        """Unpin the shard."""


class Fetcher(Protocol):
    """Gets shards onto local disk (`shardloader.fetch.ShardFetcher`)."""

    def open(
        self,
        url: str,
        *,
        num_bytes: int,
        checksum: str,
        algorithm: str = ...,
        hash_whole: bool = ...,
    ) -> LocalFile:
        """Block until ``url`` is local and checked; return it pinned."""

    def open_decoded(
        self,
        url: str,
        *,
        num_bytes: int,
        checksum: str,
        algorithm: str = ...,
        decode: Callable[[str], ShardColumns],
        hash_whole: bool = ...,
    ) -> tuple[LocalFile, ShardColumns]:
        """`open`, then ``decode`` the local path; a damaged cached copy is fetched again."""

    def prefetch(self, url: str, *, num_bytes: int, checksum: str, algorithm: str = ...) -> None:
        """Start fetching ``url`` in the background."""

    def read_range(self, url: str, offset: int, length: int) -> bytes:
        """The ``length`` bytes at ``offset`` of remote ``url``, uncached."""


class _InMemory:
    """What pins a block read into memory by a ranged read: nothing to release."""

    path = ""

    def release(self) -> None:
        """Nothing is pinned."""


_IN_MEMORY = _InMemory()


class _Part:
    """One block's share of a group decoded together: its result, or the group's error."""

    def __init__(self, group: Future[list[ShardColumns]], index: int) -> None:
        self._group = group
        self._index = index

    def result(self) -> ShardColumns:
        return self._group.result()[self._index]


class ShardReader:
    """Reads the samples of worker plans, in plan order.

    Args:
        manifest: The dataset's manifest.
        shard_urls: Full URL of every shard, in manifest order.
        fetcher: Brings shards to local disk (and caches remote ones).
        prefetch_windows: Windows ahead whose shards are fetched in the background.
        mark_padding: Add ``is_padding`` to every sample (under the ``"pad"`` policy).
        blocks: The units the plans were made over, when they are blocks (the plan's
            ``shard_index`` is then a block index); ``None``: units are shards.
        verify_blocks: Check each block against its digest in the block table, where it has
            one (instead of hashing the whole shard in each process that opens it).
        decode_threads: Threads decoding a window's units ahead of the samples being made:
            blocks in the order the samples need them, whole shards each as soon as it is
            fetched, while the next one downloads (0: each unit is decoded in this thread when
            first needed). ``None``: 1 for whole shards (from the loopback S3 server up to 2x
            faster: the reading thread waits on downloads); `GROUP_THREADS` for blocks decoded
            in groups (local Arrow blocks, when the machine has more cores than
            ``processes``); 0 for other blocks: a block decoded alone takes the GIL back about
            ten times, each time waiting for a sample-making thread to yield it, and one
            decode thread made them 5-20% slower than this thread.
        processes: Processes reading like this one (DataLoader workers). When they are as
            many as the cores, decode threads only compete with them: with 2 workers on 2
            cores, the first packed batch came after 0.10-0.14 s with 2 threads per worker
            and after 0.08 s with none, for the same rate.
        range_requests: Ranged reads in flight at once, for blocks of remote shards.
        range_bytes: Bound on the bytes of blocks of remote shards read ahead and not yet
            decoded (`shardloader.fetch_blocks.BlockFetcher`).
    """

    def __init__(
        self,
        manifest: Manifest,
        shard_urls: Sequence[str],
        *,
        fetcher: Fetcher,
        prefetch_windows: int = 1,
        mark_padding: bool = False,
        blocks: BlockTable | None = None,
        verify_blocks: bool = True,
        decode_threads: int | None = None,
        processes: int = 1,
        range_requests: int = 8,
        range_bytes: int = 64 << 20,
    ) -> None:
        self._manifest = manifest
        self._urls = list(shard_urls)
        self._fetcher = fetcher
        self._prefetch_windows = prefetch_windows
        self._mark_padding = mark_padding
        self._format = get_format(manifest.format)
        self._sizes = manifest.shards.column("num_bytes")
        self._checksums = manifest.shards.column("checksum")
        self._blocks = blocks
        self._verify_blocks = verify_blocks and hasattr(self._format, "read_verified_block")
        if blocks is None:
            counts = np.array(manifest.shards.column("num_samples"), dtype=np.int64)
            self._unit_shard = np.arange(len(counts), dtype=np.int64)
            self._unit_batch = np.full(len(counts), WHOLE_SHARD, dtype=np.int64)
        else:
            counts = blocks.num_samples
            self._unit_shard = blocks.shard_index
            self._unit_batch = blocks.batch_index
        self._counts = counts
        # Units read alone by ranged reads: blocks of remote shards whose digest is known.
        self._ranged = np.zeros(len(counts), dtype=bool)
        if blocks is not None and hasattr(self._format, "decode_block"):
            remote = np.array([not storage.is_local(url) for url in self._urls], dtype=bool)
            self._ranged = (
                remote[blocks.shard_index]
                & (blocks.batch_index != WHOLE_SHARD)
                & (blocks.digest != "")
            )
        self._range_requests = range_requests
        self._range_bytes = range_bytes
        self._ranges: BlockFetcher | None = None
        self._first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._names = list(manifest.fields)
        self._open: dict[int, tuple[LocalFile, ShardColumns]] = {}
        if decode_threads is None:  # measured: see the argument's description
            grouped = (  # (ranged reads of remote blocks are decoded one by one)
                self._grouped() is not None
                and not self._ranged.any()
                and (os.cpu_count() or 1) > max(1, processes)
            )
            decode_threads = 1 if blocks is None else GROUP_THREADS if grouped else 0
        self._decode_threads = decode_threads
        self._pool: ThreadPoolExecutor | None = None
        # Units being decoded on the decode threads, their shard pinned.
        self._ahead: dict[int, tuple[LocalFile, Future[ShardColumns] | _Part]] = {}
        # Seconds blocked on the fetcher, and spent decoding shards and building samples.
        self.stage_seconds = {"fetch_wait": 0.0, "decode": 0.0}

    def iter_samples(self, plan: WorkerPlan) -> Iterator[Sample]:
        """Yield the samples of ``plan`` in its reading order.

        Each sample is a dict: ``id`` (the source id), ``sample_id`` (the global position in
        manifest order), ``text`` or ``input_ids``, then the kept fields.
        """
        names = ["id", "sample_id", *self._names[1:]]
        if self._mark_padding:
            names.append("is_padding")
        for ids, owner, padded in self._iter_slices(plan):
            yield from self._slice(ids, owner, padded, names)

    def iter_token_runs(self, plan: WorkerPlan, field: str) -> Iterator[TokenRun]:
        """The token documents of ``plan`` in its reading order, as runs of flat arrays.

        The samples `iter_samples` would yield, without making a dict per sample: for packing
        (`shardloader.pack_rows.Packer.pack_runs`), which needs only the tokens and ids.
        """
        if self._manifest.fields.get(field) != "tokens":
            raise ValueError(f"field {field!r} is not a token field of this dataset")
        for ids, owner, _ in self._iter_slices(plan):
            started = time.perf_counter()
            parts: list[np.ndarray] = [_NO_TOKENS] * len(ids)
            for unit, positions in _groups(owner):
                taken = self._open[unit][1].take_tokens(ids[positions] - self._first[unit], field)
                for i, tokens in zip(positions.tolist(), taken, strict=True):
                    parts[i] = tokens
            lengths = np.fromiter(map(len, parts), np.int64, len(parts))
            self.stage_seconds["decode"] += time.perf_counter() - started
            yield TokenRun(ids, lengths, parts)

    def _iter_slices(self, plan: WorkerPlan) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Each window's ids in slices, with each id's unit, once the units are decoded.

        Whole shards are opened (fetched, checked, decoded) before the window's ids are made,
        so a count a shard does not hold fails before anything is sized by it. Blocks are
        decoded as the slices reach them, in order of first use, and the first slices of a
        window are small: the first sample waits for a few blocks, not for the whole window.
        A block's count is checked when it is decoded, before any of its rows is used.
        """
        try:
            windows = plan.windows
            made = plan.iter_windows()  # lazy: a window's ids are made at next()
            lazy = self._blocks is not None
            for index, spec in enumerate(windows):
                ahead = windows[index + 1 : index + 1 + self._prefetch_windows]
                units = _window_shards([spec], self._first)
                self._open_window(units, ahead)
                if not lazy:  # each shard decoded on a thread once fetched, while the next comes
                    self._decode_ahead(units)
                    for unit in units:
                        self._decoded(unit)
                window = next(made)
                ids, padded = window.sample_ids, window.padded
                owner = np.searchsorted(self._first, ids, side="right") - 1
                if lazy:
                    self._schedule_ranges(owner, ahead)
                if lazy and self._decode_threads:  # (the units in order of first use)
                    self._decode_ahead(list(dict.fromkeys(owner.tolist())))
                for start, stop in _slice_bounds(len(ids)):
                    part = owner[start:stop]
                    for unit in dict.fromkeys(part.tolist()):
                        if unit not in self._open:
                            self._decoded(unit)
                    yield ids[start:stop], part, padded[start:stop]
        finally:
            self.close()

    def read_ids(
        self, ids: np.ndarray, *, ahead: Sequence[int] = (), keep: int = 4
    ) -> list[Sample]:
        """The samples of ``ids`` (any order), for random access (`shardloader.mix_dataset`).

        Args:
            ids: Sample ids in manifest order.
            ahead: Shards to start fetching in the background (the next ones to be read).
            keep: Decoded shards kept open between calls (the least recently used go first).
        """
        decoded, owner = self._open_ids(ids, ahead, keep)
        names = ["id", "sample_id", *self._names[1:]]
        return self._slice(ids, owner, np.zeros(len(ids), bool), names)

    def token_lengths(
        self, ids: np.ndarray, field: str, *, ahead: Sequence[int] = (), keep: int = 4
    ) -> np.ndarray:
        """Token counts of the samples ``ids`` of token field ``field`` (int64)."""
        decoded, owner = self._open_ids(ids, ahead, keep)
        out = np.empty(len(ids), np.int64)
        started = time.perf_counter()
        for shard in sorted(set(owner.tolist())):
            positions = np.flatnonzero(owner == shard)
            rows = ids[positions] - self._first[shard]
            out[positions] = decoded[shard].token_lengths(rows, field)
        self.stage_seconds["decode"] += time.perf_counter() - started
        return out

    def _open_ids(
        self, ids: np.ndarray, ahead: Sequence[int], keep: int
    ) -> tuple[dict[int, ShardColumns], np.ndarray]:
        """Open (fetch, check, decode) the shards of ``ids``; return them and each id's shard."""
        if len(ids) and (ids.min() < 0 or ids.max() >= self._first[-1]):
            raise ValueError(f"sample ids out of range for {self._first[-1]} samples")
        owner = np.searchsorted(self._first, ids, side="right") - 1
        shards = list(dict.fromkeys(owner.tolist()))
        for shard in shards:
            if shard not in self._open:
                self._prefetch(shard)
        for shard in ahead:
            if shard not in self._open and shard not in shards:
                self._prefetch(shard)
        decoded = {shard: self._decoded(shard) for shard in shards}
        for shard in shards:  # most recently used last
            self._open[shard] = self._open.pop(shard)
        for shard in list(self._open)[: max(0, len(self._open) - max(keep, len(shards)))]:
            self._release(shard)
        return decoded, owner

    def _schedule_ranges(self, owner: np.ndarray, ahead: Sequence[Window]) -> None:
        """Read ahead the window's ranged blocks in order of first use, then the next windows'.

        Blocks decoded already are left out: those the next window shares with this one stay
        decoded (`_open_window` keeps them).
        """
        if not self._ranged.any():
            return
        first_use = dict.fromkeys(owner.tolist())
        later = _window_shards(ahead, self._first)
        units = [u for u in (*first_use, *later) if self._ranged[u] and u not in self._open]
        self._range_fetcher().schedule(units)

    def _range_fetcher(self) -> BlockFetcher:
        """The ranged reads of this reader (made on first use, in the process that reads)."""
        if self._ranges is None:
            self._ranges = BlockFetcher(
                self._fetcher,
                self._urls,
                cast(BlockTable, self._blocks),
                max_requests=self._range_requests,
                max_bytes=self._range_bytes,
            )
        return self._ranges

    def _open_window(self, units: list[int], ahead: Sequence[Window]) -> None:
        """Release what the window does not use; start fetching its shards and the next ones."""
        wanted = set(units)
        for index in [i for i in self._open if i not in wanted]:
            self._release(index)
        for unit in units:  # fetched side by side, not one after the other
            if unit not in self._open:
                self._prefetch(unit)
        for unit in _window_shards(ahead, self._first):
            if unit not in self._open and unit not in wanted:
                self._prefetch(unit)

    def _slice(
        self, ids: np.ndarray, owner: np.ndarray, padded: np.ndarray, names: list[str]
    ) -> list[Sample]:
        """Samples of one slice of a window: one ``take`` per unit, then Python dicts."""
        started = time.perf_counter()
        n = len(ids)
        columns: dict[str, list[Any]] = {name: [None] * n for name in self._names}
        for unit, positions in _groups(owner):
            taken = self._open[unit][1].take(ids[positions] - self._first[unit])
            if len(positions) == n:
                columns = taken
                break
            where = positions.tolist()
            for name in self._names:
                out, values = columns[name], taken[name]
                for i, value in zip(where, values, strict=True):
                    out[i] = value
        rows = [columns["id"], ids.tolist(), *(columns[n] for n in self._names[1:])]
        if self._mark_padding:
            rows.append(padded.tolist())
        samples = _dicts(names, rows)
        self.stage_seconds["decode"] += time.perf_counter() - started
        return samples

    def _decoded(self, unit: int) -> ShardColumns:
        if unit in self._ahead:
            local, future = self._ahead.pop(unit)
            started = time.perf_counter()
            try:
                self._open[unit] = (local, future.result())
            except Exception:  # noqa: BLE001 - decoded again below, where errors are handled
                local.release()
            finally:
                self.stage_seconds["decode"] += time.perf_counter() - started
        if unit not in self._open and self._ranged[unit]:
            started = time.perf_counter()
            data = self._range_bytes_of(unit)
            fetched = time.perf_counter()
            self.stage_seconds["fetch_wait"] += fetched - started
            self._open[unit] = (_IN_MEMORY, self._decode_range(unit, data))
            self.stage_seconds["decode"] += time.perf_counter() - fetched
        if unit not in self._open:
            started = time.perf_counter()
            decoded_at: list[float] = []
            decode, digest = self._decoder(unit)

            def timed(path: str) -> ShardColumns:
                decoded_at.append(time.perf_counter())
                return decode(path)

            shard = int(self._unit_shard[unit])
            # A cached copy that fails to decode is dropped and fetched again (once).
            local, decoded = self._fetcher.open_decoded(
                self._urls[shard],
                num_bytes=self._sizes[shard],
                checksum=self._checksums[shard],
                algorithm=self._manifest.checksum_algorithm,
                decode=timed,
                hash_whole=not digest,  # the block's own digest checks what is decoded
            )
            fetched = decoded_at[-1]  # a damaged cached copy's refetch counts as fetch wait
            self.stage_seconds["fetch_wait"] += fetched - started
            self._open[unit] = (local, decoded)
            self.stage_seconds["decode"] += time.perf_counter() - fetched
        return self._open[unit][1]

    def _range_bytes_of(self, unit: int) -> bytes:
        """The checked bytes of ranged block ``unit`` (read now if it was not read ahead)."""
        return self._range_fetcher().take(unit)

    def _decode_range(self, unit: int, data: bytes) -> ShardColumns:
        """Decode ranged block ``unit`` from its checked bytes."""
        read = self._block_read(unit, "", "")
        return cast(RangeBlockFormat, self._format).decode_block(data, read.spec, read.block_index)

    def _digest(self, unit: int) -> str:
        """The digest ``unit`` is checked against when read alone ("": none, or not checked)."""
        if self._blocks is None or not self._verify_blocks:
            return ""
        if self._unit_batch[unit] == WHOLE_SHARD:
            return ""
        return str(self._blocks.digest[unit])

    def _decoder(self, unit: int) -> tuple[Callable[[str], ShardColumns], str]:
        """How to decode ``unit`` from its shard's local path, and the block's digest (or "")."""
        shard = int(self._unit_shard[unit])
        digest = self._digest(unit)

        def decode(path: str) -> ShardColumns:
            if self._unit_batch[unit] == WHOLE_SHARD:
                spec = ReadSpec.for_shard(self._manifest, shard, self._urls[shard])
                return self._format.read_columns(path, spec)
            read = self._block_read(unit, path, digest)
            if digest:
                return cast(VerifiedBlockFormat, self._format).read_verified_block(
                    path, read.spec, read.block_index, read.span, digest
                )
            return cast(BlockFormat, self._format).read_block(
                path, read.spec, read.block_index, read.span
            )

        return decode, digest

    def _decode_ahead(self, units: list[int]) -> None:
        """Start decoding ``units`` (in this order) on the decode threads.

        The shard is opened (fetched, checked) here; only the decoding runs on a thread. A unit
        whose decoding fails there is decoded again in this thread when it is reached, where a
        damaged cached copy is fetched anew and errors are raised.
        """
        if self._decode_threads == 0:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                self._decode_threads, thread_name_prefix="shardloader-decode"
            )
        grouped = self._grouped()
        group: list[tuple[int, LocalFile, BlockRead]] = []
        size = FIRST_SLICE
        for unit in units:
            if unit in self._open or unit in self._ahead:
                continue
            if self._ranged[unit]:  # the read is waited for on the decode thread
                task = self._pool.submit(
                    lambda u: self._decode_range(u, self._range_bytes_of(u)), unit
                )
                self._ahead[unit] = (_IN_MEMORY, task)
                continue
            digest = self._digest(unit)
            shard = int(self._unit_shard[unit])
            started = time.perf_counter()
            local = self._fetcher.open(
                self._urls[shard],
                num_bytes=self._sizes[shard],
                checksum=self._checksums[shard],
                algorithm=self._manifest.checksum_algorithm,
                hash_whole=not digest,
            )
            self.stage_seconds["fetch_wait"] += time.perf_counter() - started
            if grouped is not None:  # (no digest: verify_local off, or hashed whole above)
                group.append((unit, local, self._block_read(unit, local.path, digest)))
                if len(group) >= size:
                    self._submit_group(group, grouped)
                    group, size = [], GROUP_BLOCKS
                continue
            decode, _ = self._decoder(unit)
            self._ahead[unit] = (local, self._pool.submit(decode, local.path))
        if group and grouped is not None:
            self._submit_group(group, grouped)

    def _grouped(self) -> GroupBlockFormat | None:
        """The format, when it decodes blocks in groups (`_submit_group`)."""
        if self._blocks is None or not hasattr(self._format, "read_verified_blocks"):
            return None
        return cast(GroupBlockFormat, self._format)

    def _block_read(self, unit: int, path: str, digest: str) -> BlockRead:
        """Block ``unit`` as its format reads it: its count, batch index and byte span."""
        blocks = cast(BlockTable, self._blocks)  # (a batch index comes from the block table)
        shard = int(self._unit_shard[unit])
        spec = ReadSpec.for_manifest(
            self._manifest, where=self._urls[shard], num_samples=int(self._counts[unit])
        )
        span = (int(blocks.offset[unit]), int(blocks.length[unit]))
        return BlockRead(path, spec, int(self._unit_batch[unit]), span, digest)

    def _submit_group(
        self, group: list[tuple[int, LocalFile, BlockRead]], fmt: GroupBlockFormat
    ) -> None:
        """Decode ``group``'s blocks together on a decode thread; each unit gets its share.

        If the group fails, each of its units is decoded again alone when reached, where the
        error names the block.
        """
        assert self._pool is not None
        task = self._pool.submit(fmt.read_verified_blocks, [read for _, _, read in group])
        for index, (unit, local, _) in enumerate(group):
            self._ahead[unit] = (local, _Part(task, index))

    def _prefetch(self, unit: int) -> None:
        if self._ranged[unit]:  # read by `_schedule_ranges`, not fetched whole
            return
        shard = int(self._unit_shard[unit])
        self._fetcher.prefetch(
            self._urls[shard],
            num_bytes=self._sizes[shard],
            checksum=self._checksums[shard],
            algorithm=self._manifest.checksum_algorithm,
        )

    def _release(self, shard: int) -> None:
        local, _ = self._open.pop(shard)
        local.release()

    def close(self) -> None:
        """Stop the ranged reads and decode threads; release every shard still held."""
        pool, self._pool = self._pool, None
        ranges, self._ranges = self._ranges, None
        if ranges is not None:  # first: a decode thread may be waiting for a read
            ranges.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for local, _ in self._ahead.values():
            local.release()
        self._ahead.clear()
        for index in list(self._open):
            self._release(index)


def _dicts(names: Sequence[str], columns: Sequence[list[Any]]) -> list[Sample]:
    """One dict per row of ``columns`` (equal lengths), keyed by ``names``.

    A dict display with the keys in variables builds a sample about 3x faster than
    ``dict(zip(names, row))`` (100k samples of 3 fields: 17 against 48 ms), so the usual field
    counts get one; others take the general form.
    """
    if len(names) == 3:
        a, b, c = names
        return [{a: x, b: y, c: z} for x, y, z in zip(*columns, strict=True)]
    if len(names) == 4:
        a, b, c, d = names
        return [{a: x, b: y, c: z, d: w} for x, y, z, w in zip(*columns, strict=True)]
    if len(names) == 5:
        a, b, c, d, e = names
        return [{a: x, b: y, c: z, d: w, e: v} for x, y, z, w, v in zip(*columns, strict=True)]
    return [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]


def _window_shards(windows: Sequence[Window], first: np.ndarray) -> list[int]:
    """Distinct shards the windows touch, in order of first use."""
    out: dict[int, None] = {}
    for window in windows:
        if window.ids is not None:
            for shard in (np.searchsorted(first, window.ids, side="right") - 1).tolist():
                out[shard] = None
        else:
            for span in window.spans:
                out[span.shard_index] = None
    return list(out)


def _slice_bounds(n: int) -> Iterator[tuple[int, int]]:
    """``[start, stop)`` of a window's slices: `FIRST_SLICE` samples, then twice as many each.

    A slice's blocks are decoded before its first sample, so a batch of ``b`` samples at a
    window's start waits for the blocks of at most about ``2 * b`` samples.
    """
    start, size = 0, FIRST_SLICE
    while start < n:
        yield start, min(n, start + size)
        start, size = start + size, min(size * 2, SLICE)


def _groups(owner: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """Each distinct unit of ``owner`` (ascending) with the positions that hold it (ascending)."""
    if not len(owner):
        return
    order = np.argsort(owner, kind="stable")
    ranked = owner[order]
    cuts = [0, *(np.flatnonzero(ranked[1:] != ranked[:-1]) + 1).tolist(), len(owner)]
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        yield int(ranked[a]), order[a:b]


def apply_transform(
    samples: Iterator[Sample], transform: Callable[[Sample], Any] | None
) -> Iterator[Any]:
    """``transform`` applied to each sample (or the samples as they are)."""
    if transform is None:
        return samples
    return (transform(s) for s in samples)
