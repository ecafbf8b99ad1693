"""Gets shards onto local disk for reading: local ones as they are, remote ones via the node cache.

Local paths (and ``file://`` URLs) are returned as they are, after a size check and, with
``verify_local``, a hash before their first use in each process. Remote shards are pinned in the
node cache (:mod:`shardloader.cache`, which draws its layout and the cost of a hit), downloaded
first (:mod:`shardloader.cache_download`) by exactly one process of the node if missing. Background
prefetch runs those downloads on a few threads, so that the reader's later :meth:`open
<ShardFetcher.open>` finds the shard cached or joins its download. Single blocks of remote shards
are read by :meth:`ShardFetcher.read_range` (ranged reads, not cached; see
:mod:`shardloader.fetch_blocks`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

from shardloader import storage
from shardloader.cache import LocalShard, NodeCache, default_cache_dir, entry_key, hash_fd
from shardloader.cache_download import Downloader, retry_shard_read
from shardloader.errors import ConfigError, ShardError, StorageError

T = TypeVar("T")

STAT_NAMES = (
    "bytes_fetched",
    "cache_hits",
    "cache_misses",
    "retries",
    "evictions",
    "fetch_seconds",
    "prefetch_skipped",
    "range_reads",
)


class ShardFetcher:
    """Gets shards onto local disk for reading: local paths as they are, remote ones cached.

    Creating one does no I/O and starts no thread, so it is safe to build in a DataLoader worker
    (forked or spawned) or before it; a copy carried across ``fork`` starts afresh.

    Args:
        cache_dir: Node-local cache directory for remote shards, shared by every process that
            names it (default: :func:`default_cache_dir`).
        cache_bytes: Bound on the bytes in the cache. Shards in use by any process are never
            evicted, so the cache may exceed it while they are pinned; a shard larger than the
            whole budget is still served, then evicted on release.
        storage_options: Passed to fsspec for remote URLs.
        timeout_s: Deadline of every network wait of a download (the request, then each block of
            4 MiB); a stalled attempt is cancelled and retried, resuming at the bytes received.
        retry_deadline_s: How long transient failures (refused or reset connections, timeouts,
            5xx, throttling) are retried before a :class:`StorageError`.
        prefetch_threads: Background downloads running at once (0: :meth:`prefetch` does
            nothing).
        verify_local: Hash local files against the manifest before their first use in each
            process: local shards, and cached entries another process downloaded (a download is
            hashed as it arrives). Catches a shard changed or rotted on disk, which decoding may
            not (it may also crash); costs one sha256 per shard and process (see
            :mod:`shardloader.cache`). Off: local shards are checked by size only.
    """

    def __init__(
        self,
        *,
        cache_dir: str | None = None,
        cache_bytes: int = 8 << 30,
        storage_options: Mapping[str, Any] | None = None,
        timeout_s: float = 60.0,
        retry_deadline_s: float = 300.0,
        prefetch_threads: int = 2,
        verify_local: bool = True,
    ) -> None:
        if cache_bytes < 0 or prefetch_threads < 0:
            raise ConfigError(
                f"cache_bytes={cache_bytes}, prefetch_threads={prefetch_threads}; both must be >= 0"
            )
        if not timeout_s > 0 or not retry_deadline_s >= 0:
            raise ConfigError(
                f"timeout_s={timeout_s}, retry_deadline_s={retry_deadline_s}; "
                "expected timeout_s > 0 and retry_deadline_s >= 0"
            )
        self._default_dir = cache_dir is None
        self.cache_dir = os.path.abspath(cache_dir or default_cache_dir())
        self.cache_bytes = cache_bytes
        self.storage_options = dict(storage_options or {})
        self.timeout_s = timeout_s
        self.retry_deadline_s = retry_deadline_s
        self.prefetch_threads = prefetch_threads
        self.verify_local = verify_local
        self._cache = NodeCache(
            self.cache_dir,
            cache_bytes,
            check_owner=self._default_dir,
            verify_local=verify_local,
            count=self._count,
        )
        self._start_process()

    # An iterator still held when the interpreter exits is closed after module globals are
    # gone (`os` is None by then): the class keeps what `close` needs.
    _getpid = staticmethod(os.getpid)

    def _start_process(self) -> None:
        """(Re)set per-process state: after ``fork`` the parent's threads and locks are gone."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._prefetching: dict[str, tuple[Future[None], int]] = {}
        self._stats: dict[str, float] = dict.fromkeys(STAT_NAMES, 0)
        # Local shards hashed in this process: (path, device, inode, size, mtime, ctime, checksum).
        self._verified: set[tuple[str, int, int, int, int, int, str]] = set()
        self._cache.start_process()
        self._downloader = Downloader(
            self._cache,
            storage_options=self.storage_options,
            timeout_s=self.timeout_s,
            retry_deadline_s=self.retry_deadline_s,
            stop=self._stop,
            count=self._count,
        )
        self._closed = False

    def _check_process(self) -> None:
        if self._pid != os.getpid():
            self._start_process()
        if self._closed:
            raise RuntimeError("ShardFetcher is closed")

    def __getstate__(self) -> dict[str, Any]:
        return {
            "cache_dir": None if self._default_dir else self.cache_dir,
            "cache_bytes": self.cache_bytes,
            "storage_options": self.storage_options,
            "timeout_s": self.timeout_s,
            "retry_deadline_s": self.retry_deadline_s,
            "prefetch_threads": self.prefetch_threads,
            "verify_local": self.verify_local,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    @property
    def stats(self) -> dict[str, float]:
        """Counters of this process since it created (or inherited) the fetcher.

        ``bytes_fetched`` (downloads and range reads), ``cache_hits`` and ``cache_misses`` (of
        :meth:`open`; a miss is a download, also by prefetch), ``retries``, ``evictions``,
        ``fetch_seconds`` (time spent downloading, summed over threads), ``prefetch_skipped``
        (hints dropped) and ``range_reads`` (ranged GETs of :meth:`read_range`).
        """
        with self._lock:
            return dict(self._stats)

    def _count(self, name: str, amount: float = 1) -> None:
        with self._lock:
            self._stats[name] += amount

    # -- public API ---------------------------------------------------------------------------

    def open(
        self,
        url: str,
        *,
        num_bytes: int,
        checksum: str,
        algorithm: str = "sha256",
        hash_whole: bool = True,
    ) -> LocalShard:
        """Return ``url`` on local disk, checked against the manifest and pinned until released.

        Blocks while the shard downloads (or waits for another process downloading it).
        ``hash_whole=False``: the caller checks what it reads itself (block digests), so a
        local shard or a cached copy is not hashed whole first (its size still is, and every
        download is still checked whole).

        Raises:
            ShardError: The shard is missing, or its size or checksum does not match (a remote
                shard is fetched twice before this).
            StorageError: Transient failures went on past ``retry_deadline_s``, or access failed
                for good (no permission).
        """
        self._check_process()
        if storage.is_local(url):
            return self._open_local(url, num_bytes, checksum, algorithm, hash_whole)
        key = entry_key(url, algorithm, checksum)
        self._await_prefetch(key)
        return self._get(
            url, key, num_bytes, checksum, algorithm, prefetch=False, hash_whole=hash_whole
        )

    def prefetch(
        self, url: str, *, num_bytes: int, checksum: str, algorithm: str = "sha256"
    ) -> None:
        """Start downloading ``url`` in the background, unless it is local or cached already.

        Never blocks. Errors surface at the later :meth:`open`. A hint is dropped (and counted
        as ``prefetch_skipped``) when the downloads queued would pass half the cache budget.
        """
        self._check_process()
        if self.prefetch_threads == 0 or storage.is_local(url):
            return
        key = entry_key(url, algorithm, checksum)
        with self._lock:
            if key in self._prefetching:
                return
            queued = sum(size for f, size in self._prefetching.values() if not f.done())
            if self._prefetching and queued + num_bytes > self.cache_bytes // 2:
                self._stats["prefetch_skipped"] += 1
                return
            if os.path.exists(self._cache.entry_path(key, url)):
                return
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    self.prefetch_threads, thread_name_prefix="shardloader-prefetch"
                )
            future = self._executor.submit(
                self._prefetch_one, url, key, num_bytes, checksum, algorithm
            )
            self._prefetching[key] = (future, num_bytes)
        future.add_done_callback(lambda f: self._forget_prefetch(key, f))

    def open_decoded(
        self,
        url: str,
        *,
        num_bytes: int,
        checksum: str,
        algorithm: str = "sha256",
        decode: Callable[[str], T],
        hash_whole: bool = True,
    ) -> tuple[LocalShard, T]:
        """:meth:`open` ``url``, then ``decode`` its local path; a cached copy gets a second try.

        When the cached copy of a remote shard fails to decode, the entry is dropped (with a
        warning naming it), fetched again, checked against the manifest and decoded once more.

        Returns:
            The pinned shard (release it when done with the decoded value) and ``decode``'s result.

        Raises:
            ShardError: As :meth:`open`; or the shard does not decode (for a remote shard: not
                even a fresh copy matching the manifest), naming the URL and the local path.
        """
        shard = self.open(
            url, num_bytes=num_bytes, checksum=checksum, algorithm=algorithm, hash_whole=hash_whole
        )
        key = entry_key(url, algorithm, checksum)
        try:
            return shard, decode(shard.path)
        except MemoryError:
            shard.release()
            raise
        except Exception as err:  # noqa: BLE001 - decoders of damaged bytes raise anything
            shard.release()
            if shard.cached_inode is None:  # a local shard: there is no other copy
                if isinstance(err, ShardError):
                    raise
                raise ShardError(
                    f"{shard.path}: cannot decode the shard ({type(err).__name__}: {err}); "
                    'run "shardloader verify"'
                ) from err
            why = f"does not decode ({type(err).__name__}: {err})"
            self._cache.drop_damaged(shard, url, key, why)
        shard = self._get(url, key, num_bytes, checksum, algorithm, prefetch=False, fresh=True)
        try:
            return shard, decode(shard.path)
        except BaseException as err:
            shard.release()
            if isinstance(err, MemoryError) or not isinstance(err, Exception):
                raise
            raise ShardError(
                f"{url} (cached at {shard.path}): does not decode ({type(err).__name__}: {err}) "
                f"even fetched again and matching the manifest's {algorithm}; the shard itself "
                'is damaged: run "shardloader verify" and convert it again'
            ) from err

    def read_range(self, url: str, offset: int, length: int) -> bytes:
        """The ``length`` bytes at ``offset`` of remote ``url`` (one block), fetched uncached.

        One ranged read, retried on transient failures until ``retry_deadline_s``; the caller
        checks what comes back (a block's digest). Safe to call from several threads at once.

        Raises:
            ShardError: The object is missing.
            StorageError: Transient failures went on past ``retry_deadline_s``, access was
                denied, or the fetcher was closed.
        """
        self._check_process()
        got = b""

        def attempt() -> None:
            nonlocal got
            if self._stop.is_set():
                raise StorageError(f"{url}: range read stopped (fetcher closed)")
            got = storage.read_range(
                url,
                offset,
                length,
                timeout_s=self.timeout_s,
                storage_options=self.storage_options,
            )

        retry_shard_read(
            attempt,
            url=url,
            what=f"read of bytes [{offset}, {offset + length})",
            deadline_s=self.retry_deadline_s,
            stop=self._stop,
            count=self._count,
        )
        self._count("bytes_fetched", len(got))
        self._count("range_reads")
        return got

    def close(self) -> None:
        """Cancel queued prefetches and wait for running ones to stop (about one block)."""
        if self._pid != self._getpid():
            self._start_process()
        self._closed = True
        self._stop.set()
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ShardFetcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- local shards -------------------------------------------------------------------------

    def _open_local(
        self, url: str, num_bytes: int, checksum: str, algorithm: str, hash_whole: bool = True
    ) -> LocalShard:
        path = url.removeprefix("file://")
        try:
            st = os.stat(path)
        except FileNotFoundError as err:
            raise ShardError(f'{path}: shard is missing; run "shardloader verify"') from err
        if st.st_size != num_bytes:
            raise ShardError(
                f"{path}: size {st.st_size} bytes does not match manifest {num_bytes} "
                '(truncated or replaced?); run "shardloader verify" (Parquet files indexed in '
                'place: run "shardloader index" again)'
            )
        if self.verify_local and hash_whole:
            seen = (
                path,
                st.st_dev,
                st.st_ino,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                checksum,
            )
            if seen not in self._verified:
                try:
                    with open(path, "rb") as f:
                        digest = hash_fd(f.fileno(), algorithm)
                except OSError as err:
                    raise ShardError(f"{path}: cannot read the shard ({err})") from err
                if digest != checksum:
                    raise ShardError(
                        f"{path}: {algorithm} {digest} does not match manifest {checksum}; "
                        'the shard was modified or corrupted; run "shardloader verify", then '
                        "restore or convert it again (Parquet files indexed in place: run "
                        '"shardloader index" again)'
                    )
                self._verified.add(seen)
        return LocalShard(path)

    # -- remote shards ------------------------------------------------------------------------

    def _get(
        self,
        url: str,
        key: str,
        num_bytes: int,
        checksum: str,
        algorithm: str,
        *,
        prefetch: bool,
        fresh: bool = False,
        hash_whole: bool = True,
    ) -> LocalShard:
        """Pin the cached entry, downloading it first (once across processes) if missing.

        Folders of the cache deleted meanwhile are made again (once per call); an entry that no
        longer matches the manifest is dropped and fetched again (once). ``fresh``: the entry
        was just dropped, so a copy found damaged now is not dropped again.
        """
        path = self._cache.entry_path(key, url)
        return self._cache.repairing(
            url,
            lambda: self._get_once(
                url, key, path, num_bytes, checksum, algorithm, prefetch, fresh, hash_whole
            ),
        )

    def _get_once(
        self,
        url: str,
        key: str,
        path: str,
        num_bytes: int,
        checksum: str,
        algorithm: str,
        prefetch: bool,
        fresh: bool,
        hash_whole: bool = True,
    ) -> LocalShard:
        dropped = fresh
        while True:
            shard = self._cache.pin(path, num_bytes)
            if shard is not None:
                if not hash_whole or self._cache.check_entry(
                    shard, url, key, checksum, algorithm, final=dropped
                ):
                    if not prefetch:
                        self._count("cache_hits")
                    return shard
                dropped = True
                continue
            with self._cache.key_lock(key):
                if os.path.exists(path):
                    continue  # another process finished it while we waited
                self._count("cache_misses")
                return self._downloader.download(url, key, path, num_bytes, checksum, algorithm)

    # -- prefetch -----------------------------------------------------------------------------

    def _prefetch_one(
        self, url: str, key: str, num_bytes: int, checksum: str, algorithm: str
    ) -> None:
        shard = self._get(url, key, num_bytes, checksum, algorithm, prefetch=True)
        shard.release()

    def _forget_prefetch(self, key: str, future: Future[None]) -> None:
        if not future.cancelled() and future.exception() is not None:
            return  # kept for open() to raise
        with self._lock:
            if key in self._prefetching and self._prefetching[key][0] is future:
                del self._prefetching[key]

    def _await_prefetch(self, key: str) -> None:
        """Wait for a running prefetch of ``key``; take over a queued one; raise a failed one."""
        with self._lock:
            item = self._prefetching.get(key)
        if item is None:
            return
        future = item[0]
        if future.cancel():
            return
        try:
            future.result()
        finally:
            with self._lock:
                if self._prefetching.get(key, (None,))[0] is future:
                    del self._prefetching[key]
