"""Downloads one remote shard into the node cache, resumed across retries, checked, published.

A download runs under its key's lock (:meth:`shardloader.cache.NodeCache.key_lock`): it sizes the
``.part`` file to the shard at once (so the trim counts it), streams the object into it with
:func:`shardloader.storage.iter_download`, hashing as it goes, and renames it into place only when
the size and checksum match the manifest. A mismatch is fetched once more (with a warning), then
refused. Transient failures are retried until ``retry_deadline_s``, resuming at the bytes
received; a closed fetcher stops a download within one block.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from shardloader import storage
from shardloader.cache import LocalShard, NodeCache
from shardloader.errors import ShardError, StorageError

log = logging.getLogger(__name__)


class Downloader:
    """Fills cache entries from remote storage for one fetcher in one process.

    Args:
        cache: The cache to fill.
        storage_options: Passed to fsspec.
        timeout_s: Deadline of every network wait of a download.
        retry_deadline_s: How long transient failures are retried.
        stop: Set when the fetcher closes: a running download stops at its next block.
        count: Adds to the fetcher's counters (``bytes_fetched``, ``retries``,
            ``fetch_seconds``).
    """

    def __init__(
        self,
        cache: NodeCache,
        *,
        storage_options: Mapping[str, Any],
        timeout_s: float,
        retry_deadline_s: float,
        stop: threading.Event,
        count: Callable[[str, float], None],
    ) -> None:
        self._cache = cache
        self._storage_options = storage_options
        self._timeout_s = timeout_s
        self._retry_deadline_s = retry_deadline_s
        self._stop = stop
        self._count = count

    def download(
        self, url: str, key: str, path: str, num_bytes: int, checksum: str, algorithm: str
    ) -> LocalShard:
        """Download into ``tmp/<key>.part`` (the caller holds the key lock), check, publish."""
        tmp, fd = self._cache.open_part(key)
        try:
            got: tuple[int, str] = (0, "")
            for round_index in range(2):
                self._cache.reserve(fd, num_bytes)
                got = self._fetch_into(fd, url, num_bytes, algorithm)
                if got == (num_bytes, checksum):
                    break
                if round_index == 0:
                    log.warning("%s", _mismatch(url, got, (num_bytes, checksum), algorithm))
            else:
                raise ShardError(
                    _mismatch(url, got, (num_bytes, checksum), algorithm)
                    + ' (fetched twice); the object was replaced or corrupted; run "shardloader'
                    ' verify" (Parquet files indexed in place: run "shardloader index" again)'
                )
            return self._cache.publish(fd, tmp, path, checksum)
        except BaseException:
            self._cache.discard_part(tmp, fd)
            raise

    def _fetch_into(self, fd: int, url: str, num_bytes: int, algorithm: str) -> tuple[int, str]:
        """Stream ``url`` into ``fd`` with retries; return (bytes received, hex digest)."""
        try:
            hasher = hashlib.new(algorithm)
        except ValueError as err:
            raise ShardError(f"{url}: unknown checksum algorithm {algorithm!r}") from err
        received = 0
        os.lseek(fd, 0, os.SEEK_SET)

        def attempt() -> None:
            nonlocal received
            blocks = storage.iter_download(
                url,
                offset=received,
                timeout_s=self._timeout_s,
                storage_options=self._storage_options,
            )
            with contextlib.closing(blocks):
                for block in blocks:
                    if self._stop.is_set():
                        raise StorageError(f"{url}: download stopped (fetcher closed)")
                    if received + len(block) > num_bytes:  # longer than the manifest says:
                        block = block[: num_bytes + 1 - received]  # keep 1 byte to fail the size
                    self._cache.write(fd, block)
                    hasher.update(block)
                    received += len(block)
                    self._count("bytes_fetched", len(block))
                    if received > num_bytes:
                        return

        retry_shard_read(
            attempt,
            url=url,
            what="download",
            deadline_s=self._retry_deadline_s,
            stop=self._stop,
            count=self._count,
        )
        return received, hasher.hexdigest()


def retry_shard_read(
    attempt: Callable[[], None],
    *,
    url: str,
    what: str,
    deadline_s: float,
    stop: threading.Event,
    count: Callable[[str, float], None],
) -> None:
    """Run ``attempt`` under the storage retry policy, as every read of a remote shard does.

    Counts ``retries`` and ``fetch_seconds`` through ``count``; a missing object is a
    `ShardError`, denied access a `StorageError`, each naming ``url``.
    """
    start = time.perf_counter()
    try:
        storage.retry_until(
            attempt,
            url=url,
            what=what,
            deadline_s=deadline_s,
            stop=stop,
            on_retry=lambda _: count("retries", 1),
        )
    except FileNotFoundError as err:
        raise ShardError(f'{url}: shard is missing ({err}); run "shardloader verify"') from err
    except PermissionError as err:
        raise StorageError(f"{url}: access denied ({err}); check the credentials") from err
    finally:
        count("fetch_seconds", time.perf_counter() - start)


def _mismatch(url: str, got: tuple[int, str], want: tuple[int, str], algorithm: str) -> str:
    if got[0] == want[0]:
        return f"{url}: {algorithm} {got[1]} does not match manifest {want[1]}"
    if got[0] > want[0]:  # the download stopped one byte past the manifest's size
        return f"{url}: longer than manifest {want[0]} bytes with {algorithm} {want[1]}"
    return (
        f"{url}: {got[0]} bytes with {algorithm} {got[1]} do not match manifest "
        f"{want[0]} bytes with {algorithm} {want[1]}"
    )
