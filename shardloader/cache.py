"""The node-local cache of remote shards: layout, entry keys, pins, eviction, hashing, repair.

:class:`shardloader.fetch.ShardFetcher` gets shards onto local disk; remote ones go through this
bounded cache directory, shared by every process of the node (DataLoader workers, ranks):

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
after the size and checksum match the manifest (a mismatch is fetched once more, then refused:
:mod:`shardloader.cache_download`). Transient failures are retried until
``retry_deadline_s``, resuming at the bytes received.

The cache is only a cache, so damage to it costs a download, not the run: folders deleted under a
running loader are made again; an entry whose bytes no longer match the manifest (checked with
``verify_local``) or that fails to decode (:meth:`shardloader.fetch.ShardFetcher.open_decoded`)
is dropped, with a warning naming it, and fetched once more; if the fresh copy fails too, the
error names the URL and the cache path. A cache folder that cannot be made (a file in its place)
fails naming it.

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
import time
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from shardloader.errors import ShardError, StorageError
from shardloader.locks import exclusive, same_file, try_exclusive, unlink_and_close

log = logging.getLogger(__name__)
T = TypeVar("T")

_KEY_CHARS = 32
_NAME_CHARS = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_PART = ".part"
_LOCK = ".lock"
_HASH_BLOCK = 1 << 20  # bytes hashed at a time (fits in L2 cache)


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
        cache: NodeCache | None = None,
        cached_inode: tuple[int, int] | None = None,
    ):
        self.path = path
        self._fd = fd
        self._cache = cache
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
        if self._cache is not None:
            self._cache.released()

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


class NodeCache:
    """The cache directory as one fetcher uses it: entries, pins, the budget, and repairs.

    Creating one does no I/O. What belongs to a process (the entries it verified, whether its
    folders are made) starts afresh with :meth:`start_process`.

    Args:
        cache_dir: Absolute path of the cache directory.
        cache_bytes: Bound on the bytes in the cache (see :class:`shardloader.fetch.ShardFetcher`).
        check_owner: Refuse a directory owned by another user (the default one, in the shared
            temporary directory).
        verify_local: Hash an entry before its first use in each process (see the module
            docstring).
        count: Adds to the fetcher's counters (here: ``evictions``).
    """

    def __init__(
        self,
        cache_dir: str,
        cache_bytes: int,
        *,
        check_owner: bool,
        verify_local: bool,
        count: Callable[[str], None],
    ) -> None:
        self.cache_dir = cache_dir
        self.cache_bytes = cache_bytes
        self._check_owner = check_owner
        self._verify_local = verify_local
        self._count = count
        self.start_process()

    def start_process(self) -> None:
        """(Re)set per-process state: after ``fork`` the parent's checks are not this process's."""
        self._pid = os.getpid()
        # Cache entries hashed in this process: (device, inode, checksum) (mtime moves each use).
        self._verified_entries: set[tuple[int, int, str]] = set()
        self._dirs_ready = False
        self._over_budget = False

    def entry_path(self, key: str, url: str) -> str:
        """Where the entry of ``url`` under ``key`` lies once complete."""
        name = _UNSAFE.sub("_", url.rstrip("/").rsplit("/", 1)[-1])[-_NAME_CHARS:]
        return os.path.join(self.cache_dir, "shards", f"{key}-{name}")

    def key_lock(self, key: str) -> contextlib.AbstractContextManager[None]:
        """Hold the lock of ``key`` (one process downloads or drops an entry at a time)."""
        return exclusive(os.path.join(self.cache_dir, "locks", key + _LOCK), remove=True)

    def repairing(self, url: str, get: Callable[[], T]) -> T:
        """Call ``get`` with the cache folders made; make them again once if deleted meanwhile."""
        for attempt in range(2):
            self._ensure_dirs()
            try:
                return get()
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

    def _ensure_dirs(self) -> None:
        if self._dirs_ready:
            return
        if self._check_owner and os.path.isdir(self.cache_dir):
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

    # -- entries ------------------------------------------------------------------------------

    def pin(self, path: str, num_bytes: int) -> LocalShard | None:
        """Pin ``path`` with a shared flock if it exists under that name with the right size."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            st = os.fstat(fd)
            if not same_file(st, path):
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

    def check_entry(
        self, shard: LocalShard, url: str, key: str, checksum: str, algorithm: str, *, final: bool
    ) -> bool:
        """Hash a pinned entry first used in this process; drop it (False) if it is damaged.

        With ``final`` (the entry was dropped and fetched again already) a damaged one raises.
        """
        inode = shard.cached_inode
        if not self._verify_local or inode is None or (*inode, checksum) in self._verified_entries:
            return True
        if shard._fd is None:  # not pinned: nothing to check
            return True
        digest = hash_fd(shard._fd, algorithm)
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
        self.drop_damaged(
            shard, url, key, f"has {algorithm} {digest}, not the manifest's {checksum}"
        )
        return False

    def drop_damaged(self, shard: LocalShard, url: str, key: str, why: str) -> None:
        """Warn that the released entry ``shard`` of ``url`` is damaged (``why``), and delete it.

        It is deleted, pinned or not, if it is still the same file. Readers that have it open
        keep their copy; the next open finds none and downloads.
        """
        log.warning(
            "%s: cached copy of %s %s; dropping it and fetching again", shard.path, url, why
        )
        inode = shard.cached_inode
        if inode is None:  # a local shard read in place: not ours to delete
            return
        self._verified_entries = {v for v in self._verified_entries if v[:2] != inode}
        try:
            with self.key_lock(key):
                try:
                    st = os.stat(shard.path)
                except FileNotFoundError:
                    return
                if (st.st_dev, st.st_ino) == inode:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(shard.path)
        except (FileNotFoundError, NotADirectoryError):
            # The cache folder itself was deleted or replaced (so the copy went with it): the
            # fetch that follows goes through repairing(), which remakes it or names the cache.
            self._dirs_ready = False

    # -- downloads ----------------------------------------------------------------------------

    def open_part(self, key: str) -> tuple[str, int]:
        """Create (or truncate) ``tmp/<key>.part``; return its path and a writable fd.

        The caller holds the key lock, and calls :meth:`publish` or :meth:`discard_part`.
        """
        tmp = os.path.join(self.cache_dir, "tmp", key + _PART)
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except (FileNotFoundError, NotADirectoryError):
            raise  # the folder was deleted: repairing() makes it again
        except OSError as err:
            raise StorageError(f"{self.cache_dir}: cannot write the cache ({err})") from err
        return tmp, fd

    def reserve(self, fd: int, num_bytes: int) -> None:
        """Empty the part ``fd``, size it to ``num_bytes`` and trim the cache to fit it."""
        os.ftruncate(fd, 0)
        os.ftruncate(fd, num_bytes)  # reserve: the trim counts this file at full size
        self.trim()

    def write(self, fd: int, data: bytes) -> None:
        """Write all of ``data`` to the part ``fd``."""
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError as err:  # local disk trouble is not a transient network error
            hint = "; free space or lower cache_bytes" if err.errno == errno.ENOSPC else ""
            raise StorageError(f"{self.cache_dir}: cannot write the cache ({err}){hint}") from err

    def publish(self, fd: int, tmp: str, path: str, checksum: str) -> LocalShard:
        """Rename the checked part ``tmp`` (open as ``fd``) into place as entry ``path``, pinned.

        The file is pinned before it is renamed into place, so no trim can evict it before the
        caller reads it.
        """
        fcntl.flock(fd, fcntl.LOCK_SH)
        _touch(fd)
        os.replace(tmp, path)
        st = os.fstat(fd)
        self._verified_entries.add((st.st_dev, st.st_ino, checksum))  # hashed as it arrived
        return LocalShard(path, fd, self, (st.st_dev, st.st_ino))

    @staticmethod
    def discard_part(tmp: str, fd: int) -> None:
        """Delete the part ``tmp`` (if still there) and close its ``fd``."""
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        os.close(fd)

    # -- the budget ---------------------------------------------------------------------------

    def trim(self) -> None:
        """Evict unpinned entries, least recently used first, until the cache fits its budget.

        Also removes the leftovers of killed downloads (a ``.part`` or ``.lock`` whose key lock
        nobody holds).
        """
        with exclusive(os.path.join(self.cache_dir, "cache.lock")):
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
            lock = try_exclusive(os.path.join(lock_dir, key + _LOCK))
            if lock is None:  # a download in progress
                with contextlib.suppress(FileNotFoundError):
                    live += os.stat(part).st_size
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
                log.info("%s: removed a download left by a killed process", part)
            unlink_and_close(os.path.join(lock_dir, key + _LOCK), lock)
        return live

    def released(self) -> None:
        """A pin was dropped: trim now if the cache was over its budget."""
        if self._over_budget and self._pid == os.getpid():
            try:
                self.trim()
            except OSError as err:  # a damaged cache folder: the next open makes it again
                self._dirs_ready = False
                log.warning("%s: cannot trim the cache (%s)", self.cache_dir, err)


def _touch(fd: int) -> None:
    """Mark the file's last use (its mtime, the LRU order) with the fine-grained clock.

    The kernel stamps writes with a coarse clock (a few ms), too coarse to order quick uses.
    """
    now = time.time_ns()
    with contextlib.suppress(OSError):  # another user's file in a shared cache_dir
        os.utime(fd, ns=(now, now))


def _evict(path: str) -> bool:
    """Delete cache entry ``path`` unless some process has it pinned; return whether deleted."""
    fd = try_exclusive(path, create=False)
    if fd is None:
        return False
    log.debug("%s: evicted", path)
    unlink_and_close(path, fd)
    return True


def hash_fd(fd: int, algorithm: str) -> str:
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
