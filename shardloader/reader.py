"""Runs one worker's plan: fetch shards via a fetcher, decode them via their format, yield samples.

A worker's share comes as windows of unit pieces (`shardloader.plan.WorkerPlan`); a unit is a
shard, or with ``shuffle_unit="block"`` a block (`shardloader.blocks.BlockTable`: an Arrow record
batch). For each window the reader makes sure every unit the window touches is on local disk and
decoded, asks the fetcher to start on the shards of the next windows, then yields the window's
samples in plan order. Decoded units are kept only while the current window needs them, so a
worker holds one window in memory: ``shuffle_window`` shards, or the blocks of at most
``shuffle_bytes`` decoded bytes. A block is read alone from the memory-mapped shard: with a
digest in the block table its bytes are copied, checked against the digest and decoded (so the
shard is not hashed whole in each process), else ``RecordBatchFileReader.get_batch``. A remote
shard is still fetched whole into the node cache (range reads of single blocks are not done
yet). Rows are converted to
Python objects a window at a time (one Arrow ``take`` per unit), not one at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, cast

import numpy as np

from shardloader.blocks import WHOLE_SHARD, BlockTable
from shardloader.formats import (
    BlockFormat,
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


class LocalFile(Protocol):
    """A shard on local disk, pinned until released."""

    path: str

    def release(self) -> None:
        """Unpin the shard."""


class Fetcher(Protocol):
    """Gets shards onto local disk (`shardloader.fetch.ShardFetcher`)."""

    def open(self, url: str, *, num_bytes: int, checksum: str, algorithm: str = ...) -> LocalFile:
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
        self._first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._names = list(manifest.fields)
        self._open: dict[int, tuple[LocalFile, ShardColumns]] = {}
        # Seconds blocked on the fetcher, and spent decoding shards and building samples.
        self.stage_seconds = {"fetch_wait": 0.0, "decode": 0.0}

    def iter_samples(self, plan: WorkerPlan) -> Iterator[Sample]:
        """Yield the samples of ``plan`` in its reading order.

        Each sample is a dict: ``id`` (the source id), ``sample_id`` (the global position in
        manifest order), ``text`` or ``input_ids``, then the kept fields.
        """
        try:
            windows = plan.windows
            made = plan.iter_windows()  # lazy: a window's ids are made at next()
            for index, spec in enumerate(windows):
                ahead = windows[index + 1 : index + 1 + self._prefetch_windows]
                # Open (and so check) the window's shards before making its ids, which are sized
                # by the manifest's counts: a count the shard does not hold fails here.
                decoded = self._open_window(_window_shards([spec], self._first), ahead)
                window = next(made)
                yield from self._window(window.sample_ids, window.padded, decoded)
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
        return list(self._slice(ids, owner, np.zeros(len(ids), bool), decoded, names))

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

    def _open_window(self, shards: list[int], ahead: Sequence[Window]) -> dict[int, ShardColumns]:
        for index in [i for i in self._open if i not in shards]:
            self._release(index)
        for shard in shards:  # fetched side by side, not one after the other
            if shard not in self._open:
                self._prefetch(shard)
        for shard in _window_shards(ahead, self._first):
            if shard not in self._open and shard not in shards:
                self._prefetch(shard)
        return {shard: self._decoded(shard) for shard in shards}

    def _window(
        self, ids: np.ndarray, padded: np.ndarray, decoded: dict[int, ShardColumns]
    ) -> Iterator[Sample]:
        owner = np.searchsorted(self._first, ids, side="right") - 1
        names = ["id", "sample_id", *self._names[1:]]
        if self._mark_padding:
            names.append("is_padding")
        for start in range(0, len(ids), SLICE):
            yield from self._slice(
                ids[start : start + SLICE],
                owner[start : start + SLICE],
                padded[start : start + SLICE],
                decoded,
                names,
            )

    def _slice(
        self,
        ids: np.ndarray,
        owner: np.ndarray,
        padded: np.ndarray,
        decoded: dict[int, ShardColumns],
        names: list[str],
    ) -> Iterator[Sample]:
        """Samples of one slice of a window: one ``take`` per shard, then Python dicts."""
        started = time.perf_counter()
        n = len(ids)
        columns: dict[str, list[Any]] = {name: [None] * n for name in self._names}
        for shard in sorted(set(owner.tolist())):  # (np.unique: a lazy numpy import, 10 ms)
            positions = np.flatnonzero(owner == shard)
            taken = decoded[shard].take(ids[positions] - self._first[shard])
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
        samples = [dict(zip(names, row, strict=True)) for row in zip(*rows, strict=True)]
        self.stage_seconds["decode"] += time.perf_counter() - started
        yield from samples

    def _decoded(self, unit: int) -> ShardColumns:
        if unit not in self._open:
            started = time.perf_counter()
            decoded_at: list[float] = []
            shard, batch = int(self._unit_shard[unit]), int(self._unit_batch[unit])
            digest = ""
            if self._blocks is not None and self._verify_blocks and batch != WHOLE_SHARD:
                digest = str(self._blocks.digest[unit])

            def decode(path: str) -> ShardColumns:
                decoded_at.append(time.perf_counter())
                if batch == WHOLE_SHARD:
                    spec = ReadSpec.for_shard(self._manifest, shard, self._urls[shard])
                    return self._format.read_columns(path, spec)
                spec = ReadSpec.for_manifest(
                    self._manifest,
                    where=self._urls[shard],
                    num_samples=int(self._counts[unit]),
                )
                if digest and self._blocks is not None:
                    span = (int(self._blocks.offset[unit]), int(self._blocks.length[unit]))
                    return cast(VerifiedBlockFormat, self._format).read_verified_block(
                        path, spec, batch, span, digest
                    )
                return cast(BlockFormat, self._format).read_block(path, spec, batch)

            # A cached copy that fails to decode is dropped and fetched again (once).
            local, decoded = self._fetcher.open_decoded(
                self._urls[shard],
                num_bytes=self._sizes[shard],
                checksum=self._checksums[shard],
                algorithm=self._manifest.checksum_algorithm,
                decode=decode,
                hash_whole=not digest,  # the block's own digest checks what is decoded
            )
            fetched = decoded_at[-1]  # a damaged cached copy's refetch counts as fetch wait
            self.stage_seconds["fetch_wait"] += fetched - started
            self._open[unit] = (local, decoded)
            self.stage_seconds["decode"] += time.perf_counter() - fetched
        return self._open[unit][1]

    def _prefetch(self, unit: int) -> None:
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
        """Release every shard still held."""
        for index in list(self._open):
            self._release(index)


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


def apply_transform(
    samples: Iterator[Sample], transform: Callable[[Sample], Any] | None
) -> Iterator[Any]:
    """``transform`` applied to each sample (or the samples as they are)."""
    if transform is None:
        return samples
    return (transform(s) for s in samples)
