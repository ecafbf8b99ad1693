"""Gets shards onto local disk for reading: local ones as they are, remote ones via a node cache.

Local paths (and ``file://`` URLs) are returned as they are, after a size check. Remote shards go
through a bounded cache directory shared by every process of the node (DataLoader workers, ranks):

```
<cache_dir>/shards/<key>-<name>   complete, checked shards; mtime = last use (LRU order)
<cache_dir>/tmp/<key>.part        a download in progress (sized to the shard at once, so counted)
<cache_dir>/locks/<key>.lock      held (flock, exclusive) by the one process downloading <key>
<cache_dir>/cache.lock            held while the cache is trimmed to its budget
```

``key`` hashes the URL, the checksum algorithm and the checksum, so two datasets never collide and
a changed shard is never served stale. Every lock is an ``flock``, which dies with its process:
after a ``kill -9`` the next download of that key truncates the stale ``.part``, and the next
trim removes stale files of other keys. A reader pins a shard by holding a shared flock on it;
the trimmer evicts (oldest use first) only files it can lock exclusively without waiting, so a
shard in use by any process is never evicted. A pin checks after locking that the file still has
its name (an evictor may have unlinked it in between) and starts over if not.

Downloads stream into the ``.part`` file, hashing as they go, and are renamed into place only
after the size and checksum match the manifest (a mismatch is fetched once more, then refused).
Transient failures are retried until ``retry_deadline_s``, resuming at the bytes received.

The cache is only a cache, so damage to it costs a download, not the run: folders deleted under a
running loader are made again; an entry whose bytes no longer match the manifest (checked with
``verify_local``) or that fails to decode (:meth:`ShardFetcher.open_decoded`) is dropped, with a
warning naming it, and fetched once more; if the fresh copy fails too, the error names the URL and
the cache path. A cache folder that cannot be made (a file in its place) fails naming it.

Local files are hashed before their first use in each process when ``verify_local`` is on (the
default): local shards, and cached entries this process did not download itself. Decoding is no
check: in 300 single-bit flips of a zstd Arrow shard, 9% decoded to altered text without any
error, and 0.7% crashed pyarrow (SIGSEGV); pyarrow writes zstd frames without content checksums.
What was verified is remembered in this process only, keyed by the file's identity (path, inode,
size, mtime, ctime), so every new process (a fresh run, a DataLoader worker of a new epoch) checks
again: bit rot on disk changes none of those, so a marker kept on disk would hide it.

Cost: a hit is five system calls (open, flock, fstat, stat, utime), about 20 µs, plus, on the first
use in a process with ``verify_local``, a sha256 of the file (1.6 GB/s: 32 ms for a
51 MB zstd shard of 128 MiB text, whose decode takes 195 ms). A miss scans the cache
directory once under ``cache.lock`` to account and evict (about 1 ms per 1,000 entries).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

from shardloader import storage
from shardloader.errors import ConfigError, ShardError, StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

_KEY_CHARS = 32
_NAME_CHARS = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_PART = ".part"
_LOCK = ".lock"
_HASH_BLOCK = 1 << 20  # bytes hashed at a time (fits in L2 cache)
STAT_NAMES = (
    "bytes_fetched",
    "cache_hits",
    "cache_misses",
    "retries",
    "evictions",
    "fetch_seconds",
    "prefetch_skipped",
)


def default_cache_dir() -> str:
    """``<system temp dir>/shardloader-cache-<uid>``: per user, naming nothing secret."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(tempfile.gettempdir(), f"shardloader-cache-{uid}")


def entry_key(url: str, algorithm: str, checksum: str) -> str:
    """Cache key of a shard: a hash of its URL and its checksum."""
    return hashlib.sha256(f"{url}\n{algorithm}:{checksum}".encode()).hexdigest()[:_KEY_CHARS]


class LocalShard:
    """A shard on local disk; a cached one stays pinned (never evicted) until :meth:`release`.

    Attributes:
        path: A local file to open or memory-map; valid until :meth:`release`.
    """

    def __init__(
        self,
        path: str,
        fd: int | None = None,
        fetcher: ShardFetcher | None = None,
        cached_inode: tuple[int, int] | None = None,
    ):
        self.path = path
        self._fd = fd
        self._fetcher = fetcher
        # (device, inode) of a cache entry; None for a local shard read in place.
        self.cached_inode = cached_inode

    def release(self) -> None:
        """Unpin the shard (it may be evicted from now on); releasing twice is harmless."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _touch(fd)
        # Closing (not LOCK_UN) drops the pin: a forked child's copy of fd would share the lock.
        os.close(fd)
        if self._fetcher is not None:
            self._fetcher._released()

    def __enter__(self) -> LocalShard:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"LocalShard({self.path!r}, pinned={self._fd is not None})"


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
            not (it may also crash); costs one sha256 per shard and process (see the module
            docstring). Off: local shards are checked by size only.
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
        self._start_process()

    def _start_process(self) -> None:
        """(Re)set per-process state: after ``fork`` the parent's threads and locks are gone."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._prefetching: dict[str, tuple[Future[None], int]] = {}
        self._stats: dict[str, float] = dict.fromkeys(STAT_NAMES, 0)
        # Files hashed in this process: (path, device, inode, size, mtime, ctime, checksum) of
        # local shards; (device, inode, checksum) of cache entries (mtime moves with each use).
        self._verified: set[tuple[str, int, int, int, int, int, str]] = set()
        self._verified_entries: set[tuple[int, int, str]] = set()
        self._dirs_ready = False
        self._over_budget = False
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

        ``bytes_fetched``, ``cache_hits`` and ``cache_misses`` (of :meth:`open`; a miss is a
        download, also by prefetch), ``retries``, ``evictions``, ``fetch_seconds`` (time spent
        downloading) and ``prefetch_skipped`` (hints dropped).
        """
        with self._lock:
            return dict(self._stats)

    def _count(self, name: str, amount: float = 1) -> None:
        with self._lock:
            self._stats[name] += amount

    # -- public API ---------------------------------------------------------------------------

    def open(
        self, url: str, *, num_bytes: int, checksum: str, algorithm: str = "sha256"
    ) -> LocalShard:
        """Return ``url`` on local disk, checked against the manifest and pinned until released.

        Blocks while the shard downloads (or waits for another process downloading it).

        Raises:
            ShardError: The shard is missing, or its size or checksum does not match (a remote
                shard is fetched twice before this).
            StorageError: Transient failures went on past ``retry_deadline_s``, or access failed
                for good (no permission).
        """
        self._check_process()
        if storage.is_local(url):
            return self._open_local(url, num_bytes, checksum, algorithm)
        key = entry_key(url, algorithm, checksum)
        self._await_prefetch(key)
        return self._get(url, key, num_bytes, checksum, algorithm, prefetch=False)

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
            if os.path.exists(self._entry_path(key, url)):
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
        shard = self.open(url, num_bytes=num_bytes, checksum=checksum, algorithm=algorithm)
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
            log.warning(
                "%s: cached copy of %s does not decode (%s: %s); dropping it and fetching again",
                shard.path,
                url,
                type(err).__name__,
                err,
            )
            self._drop(key, shard.path, shard.cached_inode)
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

    def close(self) -> None:
        """Cancel queued prefetches and wait for running ones to stop (about one block)."""
        if self._pid != os.getpid():
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

    def _open_local(self, url: str, num_bytes: int, checksum: str, algorithm: str) -> LocalShard:
        path = url.removeprefix("file://")
        try:
            st = os.stat(path)
        except FileNotFoundError as err:
            raise ShardError(f'{path}: shard is missing; run "shardloader verify"') from err
        if st.st_size != num_bytes:
            raise ShardError(
                f"{path}: size {st.st_size} bytes does not match manifest {num_bytes} "
                '(truncated or replaced?); run "shardloader verify"'
            )
        if self.verify_local:
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
                        digest = _hash_fd(f.fileno(), algorithm)
                except OSError as err:
                    raise ShardError(f"{path}: cannot read the shard ({err})") from err
                if digest != checksum:
                    raise ShardError(
                        f"{path}: {algorithm} {digest} does not match manifest {checksum}; "
                        'the shard was modified or corrupted; run "shardloader verify", then '
                        "restore or convert it again"
                    )
                self._verified.add(seen)
        return LocalShard(path)

    # -- the cache ----------------------------------------------------------------------------

    def _entry_path(self, key: str, url: str) -> str:
        name = _UNSAFE.sub("_", url.rstrip("/").rsplit("/", 1)[-1])[-_NAME_CHARS:]
        return os.path.join(self.cache_dir, "shards", f"{key}-{name}")

    def _ensure_dirs(self) -> None:
        if self._dirs_ready:
            return
        if self._default_dir and os.path.isdir(self.cache_dir):
            owner = os.stat(self.cache_dir).st_uid
            if hasattr(os, "getuid") and owner != os.getuid():
                raise StorageError(
                    f"{self.cache_dir}: cache directory belongs to uid {owner}, not to this user; "
                    "pass cache_dir"
                )
        try:
            for sub in ("shards", "tmp", "locks"):
                os.makedirs(os.path.join(self.cache_dir, sub), mode=0o700, exist_ok=True)
        except OSError as err:
            raise StorageError(
                f"{self.cache_dir}: cannot make the cache folders ({err}); remove what is in the "
                "way (e.g. a file of that name) or pass another cache_dir"
            ) from err
        self._dirs_ready = True

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
    ) -> LocalShard:
        """Pin the cached entry, downloading it first (once across processes) if missing.

        Folders of the cache deleted meanwhile are made again (once per call); an entry that no
        longer matches the manifest is dropped and fetched again (once). ``fresh``: the entry
        was just dropped, so a copy found damaged now is not dropped again.
        """
        path = self._entry_path(key, url)
        for attempt in range(2):
            self._ensure_dirs()
            try:
                return self._get_once(
                    url, key, path, num_bytes, checksum, algorithm, prefetch, fresh
                )
            except (FileNotFoundError, NotADirectoryError) as err:
                # The cache folder (or one inside it) was deleted or replaced while in use.
                self._dirs_ready = False
                if attempt == 1:
                    raise StorageError(
                        f"{url}: the cache at {self.cache_dir} keeps disappearing while in use "
                        f"({err}); check what deletes it, or pass another cache_dir"
                    ) from err
                log.warning("%s: cache folder damaged (%s); making it again", self.cache_dir, err)
        raise AssertionError("unreachable")

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
    ) -> LocalShard:
        dropped = fresh
        while True:
            shard = self._try_pin(path, num_bytes)
            if shard is not None:
                if self._check_entry(shard, url, key, checksum, algorithm, final=dropped):
                    if not prefetch:
                        self._count("cache_hits")
                    return shard
                dropped = True
                continue
            with _exclusive(os.path.join(self.cache_dir, "locks", key + _LOCK), remove=True):
                if os.path.exists(path):
                    continue  # another process finished it while we waited
                self._count("cache_misses")
                return self._download(url, key, path, num_bytes, checksum, algorithm)

    def _check_entry(
        self, shard: LocalShard, url: str, key: str, checksum: str, algorithm: str, *, final: bool
    ) -> bool:
        """Hash a pinned entry first used in this process; drop it (False) if it is damaged."""
        inode = shard.cached_inode
        if not self.verify_local or inode is None or (*inode, checksum) in self._verified_entries:
            return True
        if shard._fd is None:  # not pinned: nothing to check
            return True
        digest = _hash_fd(shard._fd, algorithm)
        if digest == checksum:
            self._verified_entries.add((*inode, checksum))
            return True
        shard.release()
        if final:
            raise ShardError(
                f"{url} (cached at {shard.path}): {algorithm} {digest} does not match manifest "
                f"{checksum} even fetched again; check the disk of {self.cache_dir}, or pass "
                "another cache_dir"
            )
        log.warning(
            "%s: cached copy of %s has %s %s, not the manifest's %s; dropping it and fetching "
            "again",
            shard.path,
            url,
            algorithm,
            digest,
            checksum,
        )
        self._drop(key, shard.path, inode)
        return False

    def _drop(self, key: str, path: str, inode: tuple[int, int]) -> None:
        """Delete the damaged entry ``path`` (if it is still the file ``inode``), pinned or not.

        Readers that have it open keep their copy; the next open finds none and downloads.
        """
        self._verified_entries = {v for v in self._verified_entries if v[:2] != inode}
        with _exclusive(os.path.join(self.cache_dir, "locks", key + _LOCK), remove=True):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return
            if (st.st_dev, st.st_ino) == inode:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def _try_pin(self, path: str, num_bytes: int) -> LocalShard | None:
        """Pin ``path`` with a shared flock if it exists under that name with the right size."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            st = os.fstat(fd)
            if not _same_file(st, path):
                os.close(fd)  # evicted between open and flock: look again
                return None
            if st.st_size != num_bytes:  # e.g. cut short by a crash of the machine
                log.warning("%s: cached size %d, expected %d", path, st.st_size, num_bytes)
                os.close(fd)
                _evict(path)
                return None
            _touch(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        return LocalShard(path, fd, self, (st.st_dev, st.st_ino))

    def _download(
        self, url: str, key: str, path: str, num_bytes: int, checksum: str, algorithm: str
    ) -> LocalShard:
        """Download into ``tmp/<key>.part`` (the caller holds the key lock), check, publish.

        The file is pinned before it is renamed into place, so no trim can evict it before the
        caller reads it.
        """
        tmp = os.path.join(self.cache_dir, "tmp", key + _PART)
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except (FileNotFoundError, NotADirectoryError):
            raise  # the folder was deleted: _get makes it again
        except OSError as err:
            raise StorageError(f"{self.cache_dir}: cannot write the cache ({err})") from err
        try:
            got: tuple[int, str] = (0, "")
            for round_index in range(2):
                os.ftruncate(fd, 0)
                os.ftruncate(fd, num_bytes)  # reserve: the trim counts this file at full size
                self._trim()
                got = self._fetch_into(fd, url, num_bytes, algorithm)
                if got == (num_bytes, checksum):
                    break
                if round_index == 0:
                    log.warning("%s", _mismatch(url, got, (num_bytes, checksum), algorithm))
            else:
                raise ShardError(
                    _mismatch(url, got, (num_bytes, checksum), algorithm)
                    + ' (fetched twice); the object was replaced or corrupted; run "shardloader'
                    ' verify"'
                )
            fcntl.flock(fd, fcntl.LOCK_SH)
            _touch(fd)
            os.replace(tmp, path)
            st = os.fstat(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            os.close(fd)
            raise
        self._verified_entries.add((st.st_dev, st.st_ino, checksum))  # hashed as it arrived
        return LocalShard(path, fd, self, (st.st_dev, st.st_ino))

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
                timeout_s=self.timeout_s,
                storage_options=self.storage_options,
            )
            with contextlib.closing(blocks):
                for block in blocks:
                    if self._stop.is_set():
                        raise StorageError(f"{url}: download stopped (fetcher closed)")
                    if received + len(block) > num_bytes:  # longer than the manifest says:
                        block = block[: num_bytes + 1 - received]  # keep 1 byte to fail the size
                    self._write(fd, block)
                    hasher.update(block)
                    received += len(block)
                    self._count("bytes_fetched", len(block))
                    if received > num_bytes:
                        return

        start = time.perf_counter()
        try:
            storage.retry_until(
                attempt,
                url=url,
                what="download",
                deadline_s=self.retry_deadline_s,
                stop=self._stop,
                on_retry=lambda _: self._count("retries"),
            )
        except FileNotFoundError as err:
            raise ShardError(f'{url}: shard is missing ({err}); run "shardloader verify"') from err
        except PermissionError as err:
            raise StorageError(f"{url}: access denied ({err}); check the credentials") from err
        finally:
            self._count("fetch_seconds", time.perf_counter() - start)
        return received, hasher.hexdigest()

    def _write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError as err:  # local disk trouble is not a transient network error
            hint = "; free space or lower cache_bytes" if err.errno == errno.ENOSPC else ""
            raise StorageError(f"{self.cache_dir}: cannot write the cache ({err}){hint}") from err

    def _trim(self) -> None:
        """Evict unpinned entries, least recently used first, until the cache fits its budget.

        Also removes the leftovers of killed downloads (a ``.part`` or ``.lock`` whose key lock
        nobody holds).
        """
        with _exclusive(os.path.join(self.cache_dir, "cache.lock")):
            total = self._clean_stale()
            entries = []
            with os.scandir(os.path.join(self.cache_dir, "shards")) as it:
                for entry in it:
                    with contextlib.suppress(FileNotFoundError):
                        st = entry.stat()
                        entries.append((st.st_mtime_ns, st.st_size, entry.path))
                        total += st.st_size
            if total > self.cache_bytes:
                for _, size, path in sorted(entries):
                    if _evict(path):
                        total -= size
                        self._count("evictions")
                        if total <= self.cache_bytes:
                            break
            self._over_budget = total > self.cache_bytes
            if self._over_budget:
                log.debug(
                    "%s: %d bytes pinned, over the budget %d",
                    self.cache_dir,
                    total,
                    self.cache_bytes,
                )

    def _clean_stale(self) -> int:
        """Remove stale ``.part``/``.lock`` files; return the bytes of live ``.part`` files."""
        tmp_dir = os.path.join(self.cache_dir, "tmp")
        lock_dir = os.path.join(self.cache_dir, "locks")
        keys = {n.removesuffix(_PART) for n in os.listdir(tmp_dir) if n.endswith(_PART)}
        keys |= {n.removesuffix(_LOCK) for n in os.listdir(lock_dir) if n.endswith(_LOCK)}
        live = 0
        for key in keys:
            part = os.path.join(tmp_dir, key + _PART)
            lock = _try_exclusive(os.path.join(lock_dir, key + _LOCK))
            if lock is None:  # a download in progress
                with contextlib.suppress(FileNotFoundError):
                    live += os.stat(part).st_size
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
                log.info("%s: removed a download left by a killed process", part)
            _unlink_and_close(os.path.join(lock_dir, key + _LOCK), lock)
        return live

    def _released(self) -> None:
        if self._over_budget and self._pid == os.getpid():
            try:
                self._trim()
            except OSError as err:  # a damaged cache folder: the next open makes it again
                self._dirs_ready = False
                log.warning("%s: cannot trim the cache (%s)", self.cache_dir, err)

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


def _touch(fd: int) -> None:
    """Mark the file's last use (its mtime, the LRU order) with the fine-grained clock.

    The kernel stamps writes with a coarse clock (a few ms), too coarse to order quick uses.
    """
    now = time.time_ns()
    with contextlib.suppress(OSError):  # another user's file in a shared cache_dir
        os.utime(fd, ns=(now, now))


def _mismatch(url: str, got: tuple[int, str], want: tuple[int, str], algorithm: str) -> str:
    if got[0] == want[0]:
        return f"{url}: {algorithm} {got[1]} does not match manifest {want[1]}"
    if got[0] > want[0]:  # the download stopped one byte past the manifest's size
        return f"{url}: longer than manifest {want[0]} bytes with {algorithm} {want[1]}"
    return (
        f"{url}: {got[0]} bytes with {algorithm} {got[1]} do not match manifest "
        f"{want[0]} bytes with {algorithm} {want[1]}"
    )


def _same_file(st: os.stat_result, path: str) -> bool:
    """Whether the open file ``st`` still has the name ``path``."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return st.st_nlink > 0 and (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)


@contextlib.contextmanager
def _exclusive(path: str, *, remove: bool = False) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if needed); with ``remove``, delete it after.

    A lock file may be unlinked by its holder, so after locking the inode is compared with the
    name; on a mismatch the lock is taken again on the new file.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(os.fstat(fd), path):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        if remove:
            _unlink_and_close(path, fd)
        else:
            os.close(fd)


def _try_exclusive(path: str) -> int | None:
    """An fd of ``path`` locked exclusively, or None if another holds a lock on it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if not _same_file(os.fstat(fd), path):
        os.close(fd)
        return None
    return fd


def _unlink_and_close(path: str, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)


def _evict(path: str) -> bool:
    """Delete cache entry ``path`` unless some process has it pinned; return whether deleted."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    if not _same_file(os.fstat(fd), path):
        os.close(fd)
        return False
    log.debug("%s: evicted", path)
    _unlink_and_close(path, fd)
    return True


def _hash_fd(fd: int, algorithm: str) -> str:
    """Hex digest of the whole file open as ``fd`` (read with pread: the offset is left alone)."""
    try:
        hasher = hashlib.new(algorithm)
    except ValueError as err:
        raise ShardError(f"unknown checksum algorithm {algorithm!r}") from err
    buffer = bytearray(_HASH_BLOCK)
    view = memoryview(buffer)
    offset = 0
    while n := os.preadv(fd, [buffer], offset):
        hasher.update(view[:n])
        offset += n
    return hasher.hexdigest()
