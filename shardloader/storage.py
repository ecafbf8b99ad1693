"""All byte I/O: the only module that talks to fsspec.

Paths are URLs (``s3://bucket/dir``, ``memory://x``) or local paths. Reads retry transient failures
with exponential backoff and jitter; writes go to a temporary name and are published whole
(``os.replace`` locally, a single PUT remotely), so a crash never leaves a half-written file under
its final name.

Shard downloads (:func:`iter_download`, used by :mod:`shardloader.cache`) stream one GET in blocks
and give every network wait its own deadline, so a hung server costs ``timeout_s`` and not
forever; :func:`retry_until` retries them until a deadline, resuming where the last try stopped.
On an async filesystem (s3fs, HTTP, gcsfs) each wait is a coroutine run on fsspec's event loop
under ``asyncio.wait_for``, so a stalled request is cancelled (its connection closed), not merely
abandoned in a thread. Setting botocore's ``read_timeout`` is not enough: s3fs and botocore retry
timed-out and refused requests inside one call (a refused connection alone costs 3.7 s there).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import posixpath
import random
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Generator, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any, TypeVar

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.core import url_to_fs as _fsspec_url_to_fs

from shardloader.errors import ConfigError, ShardloaderError, StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

_GLOB_CHARS = ("*", "?", "[")
_NOT_TRANSIENT = (
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    FileExistsError,
)
# Errors that retrying cannot fix: programming or configuration errors, and ours.
_PERMANENT = (*_NOT_TRANSIENT, ShardloaderError, ValueError, TypeError, NotImplementedError)
_PERMANENT_NAMES = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "ParamValidationError", "NoRegionError"}
)
RETRIES = 5
BACKOFF_S = 0.2
MAX_BACKOFF_S = 10.0
DOWNLOAD_BLOCK_BYTES = 4 << 20


def is_url(path: str) -> bool:
    """Whether ``path`` carries a URL scheme (``s3://...``) rather than being a local path."""
    return "://" in path


def is_local(url: str) -> bool:
    """Whether ``url`` names the local filesystem."""
    return not is_url(url) or url.startswith("file://")


def normalize(url: str) -> str:
    """Return ``url`` with a local path made absolute; URLs are returned unchanged."""
    if is_url(url):
        return url.rstrip("/") if not url.endswith("://") else url
    return os.path.abspath(os.path.expanduser(url))


def join(base: str, *parts: str) -> str:
    """Join path parts onto ``base`` with ``/`` (URLs) or the OS separator (local paths)."""
    if is_url(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def dirname(url: str) -> str:
    """Return the parent of ``url``."""
    return posixpath.dirname(url) if is_url(url) else os.path.dirname(url)


def relpath(url: str, start: str) -> str:
    """Return ``url`` relative to ``start`` with ``/`` separators."""
    if is_url(url):
        return posixpath.relpath(url.split("://", 1)[1], start.split("://", 1)[1])
    return os.path.relpath(url, start).replace(os.sep, "/")


def url_to_fs(url: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec filesystem and the path inside it for ``url``.

    Raises:
        StorageError: The URL's scheme needs a package that is not installed.
    """
    try:
        return _fsspec_url_to_fs(url, **storage_options)
    except ImportError as err:
        scheme = url.split("://", 1)[0]
        extra = {"s3": "shardloader[s3] (s3fs)", "gs": "gcsfs", "gcs": "gcsfs"}.get(scheme, "")
        hint = f"; install {extra}" if extra else ""
        raise StorageError(f"{url}: no filesystem for scheme {scheme!r} ({err}){hint}") from err


def file_type(url: str, **storage_options: Any) -> str | None:
    """The type the filesystem reports for ``url`` (``"file"``, ``"directory"``, ``"other"``...).

    ``None`` where it reports no type, or where ``url`` cannot be looked at (missing, access
    denied, still failing after the retries): opening it then gives the precise error.

    Raises:
        StorageError: The URL's scheme needs a package that is not installed.
    """
    fs, path = url_to_fs(url, **storage_options)
    try:
        info = with_retries(lambda: fs.info(path), url=url, what="stat")
    except OSError:
        return None
    kind = info.get("type")
    return None if kind is None else str(kind)


def _protocol_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(path) if not _fs_is_local(fs) else path


def _fs_is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def is_transient(err: BaseException) -> bool:
    """Whether retrying might cure ``err``: connection refused or reset, timeouts, 5xx, throttling.

    Missing files, denied access, bad requests (HTTP 4xx other than 408 and 429, S3 ``EINVAL``
    codes), missing credentials and shardloader's own errors are permanent.
    """
    if not isinstance(err, Exception) or isinstance(err, _PERMANENT):
        return False
    if type(err).__name__ in _PERMANENT_NAMES:
        return False
    if isinstance(err, OSError) and err.errno == errno.EINVAL:
        return False
    status = getattr(err, "status", None)  # aiohttp.ClientResponseError (http://)
    return not (isinstance(status, int) and 400 <= status < 500 and status not in (408, 429))


def backoff_s(attempt: int, *, base_s: float = BACKOFF_S, max_s: float = MAX_BACKOFF_S) -> float:
    """Delay before retry number ``attempt`` (1-based): doubling from ``base_s``, jittered ±50%."""
    return min(max_s, base_s * 2 ** (attempt - 1)) * (0.5 + random.random())


def with_retries(fn: Callable[[], T], *, url: str, what: str, retries: int = RETRIES) -> T:
    """Call ``fn``, retrying transient errors with exponential backoff and jitter.

    ``FileNotFoundError`` and other permanent errors (see :func:`is_transient`) pass through at
    once; after the last try a transient error becomes a :class:`StorageError` naming the URL and
    the cause.
    """
    for attempt in range(retries):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - fsspec backends raise anything
            if not is_transient(err):
                raise
            if attempt == retries - 1:
                raise StorageError(
                    f"{url}: {what} failed after {retries} tries ({type(err).__name__}: {err})"
                ) from err
            delay = backoff_s(attempt + 1)
            log.warning("%s: %s failed (%s); retrying in %.2fs", url, what, err, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def retry_until(
    fn: Callable[[], T],
    *,
    url: str,
    what: str,
    deadline_s: float,
    stop: threading.Event | None = None,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """Call ``fn`` until it succeeds, retrying transient errors until ``deadline_s`` have passed.

    Retries wait with exponential backoff and jitter (:func:`backoff_s`), never past the deadline;
    ``fn`` should bound its own attempts (e.g. :func:`iter_download`'s ``timeout_s``). Permanent
    errors (:func:`is_transient`) pass through at once.

    Args:
        fn: One attempt.
        url: Named in log lines and errors.
        what: What is being done (``"download"``), for messages.
        deadline_s: Seconds after the first try after which no new try starts.
        stop: When set, waiting stops and a :class:`StorageError` is raised (used on shutdown).
        on_retry: Called with each transient error before the retry (e.g. to count retries).

    Raises:
        StorageError: Still failing at the deadline; names the URL, the tries and the last cause.
    """
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - fsspec backends raise anything
            if not is_transient(err):
                raise
            elapsed = time.monotonic() - start
            remaining = deadline_s - elapsed
            if remaining <= 0:
                raise StorageError(
                    f"{url}: {what} failed after {attempt} tries in {elapsed:.1f}s "
                    f"(last: {type(err).__name__}: {err}); check that the storage is reachable, "
                    "or allow longer with retry_deadline_s"
                ) from err
            delay = min(backoff_s(attempt), remaining)
            if on_retry is not None:
                on_retry(err)
            log.warning(
                "%s: %s try %d failed (%s: %s); retrying in %.2fs",
                url,
                what,
                attempt,
                type(err).__name__,
                err,
                delay,
            )
            if stop is not None and stop.wait(delay):
                raise StorageError(f"{url}: {what} stopped (shutting down)") from err
            if stop is None:
                time.sleep(delay)


def _run_bounded(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], timeout_s: float, what: str
) -> T:
    """Run ``coro`` on fsspec's event loop; cancel it and raise ``TimeoutError`` after timeout_s."""
    future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout_s), loop)
    try:
        # The grace covers a busy loop; wait_for itself cancels the coroutine at timeout_s.
        return future.result(timeout_s + 5.0)
    except (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError) as err:
        future.cancel()
        raise TimeoutError(f"{what}: no answer within timeout_s={timeout_s:g}") from err


async def _read_block(body: Any, num_bytes: int) -> bytes:
    """Read up to ``num_bytes`` from an aiobotocore body (less only at the end)."""
    parts: list[bytes] = []
    have = 0
    while have < num_bytes:
        chunk = await body.read(num_bytes - have)
        if not chunk:
            break
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)


def _iter_s3(
    fs: Any, path: str, offset: int, timeout_s: float, block_bytes: int
) -> Generator[bytes, None, None]:
    """One streamed GET (from ``offset``), read a block at a time, the next block in flight."""
    bucket, key, version = fs.split_path(path)
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if version:
        kwargs["VersionId"] = version
    if offset:
        kwargs["Range"] = f"bytes={offset}-"
    response = _run_bounded(fs.loop, fs._call_s3("get_object", **kwargs), timeout_s, "GET")
    body = response["Body"]
    pending: concurrent.futures.Future[bytes] | None = None
    try:

        def submit() -> concurrent.futures.Future[bytes]:
            coro = asyncio.wait_for(_read_block(body, block_bytes), timeout_s)
            return asyncio.run_coroutine_threadsafe(coro, fs.loop)

        pending = submit()
        while True:
            try:
                block = pending.result(timeout_s + 5.0)
            except (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError) as err:
                raise TimeoutError(
                    f"read stalled: no {block_bytes >> 20} MiB block within timeout_s={timeout_s:g}"
                ) from err
            if not block:
                return
            pending = submit()  # the loop reads ahead while the caller hashes and writes
            yield block
    finally:
        # Closing the body ends a read in flight at once; collect its error so that asyncio
        # does not log "exception was never retrieved".
        fs.loop.call_soon_threadsafe(body.close)
        if pending is not None:
            try:
                pending.result(timeout_s + 5.0)
            except BaseException:  # noqa: BLE001 - the attempt is over either way
                pending.cancel()


def _iter_async_ranges(
    fs: AsyncFileSystem, path: str, offset: int, timeout_s: float, block_bytes: int
) -> Generator[bytes, None, None]:
    """Ranged reads of ``block_bytes`` each, for async filesystems other than s3fs."""
    info = _run_bounded(fs.loop, fs._info(path), timeout_s, "stat")
    size = info.get("size")
    if size is None:  # e.g. HTTP without Content-Length: one whole read
        yield _run_bounded(fs.loop, fs._cat_file(path, start=offset), timeout_s, "GET")
        return
    while offset < size:
        end = min(offset + block_bytes, size)
        block = _run_bounded(fs.loop, fs._cat_file(path, start=offset, end=end), timeout_s, "GET")
        if not block:
            return
        offset += len(block)
        yield block


def _iter_sync(
    fs: fsspec.AbstractFileSystem, path: str, offset: int, block_bytes: int
) -> Generator[bytes, None, None]:
    with fs.open(path, "rb") as f:
        if offset:
            f.seek(offset)
        while block := f.read(block_bytes):
            yield block


def iter_download(
    url: str,
    *,
    offset: int = 0,
    timeout_s: float = 60.0,
    block_bytes: int = DOWNLOAD_BLOCK_BYTES,
    storage_options: Mapping[str, Any] | None = None,
) -> Generator[bytes, None, None]:
    """Yield the bytes of ``url`` from ``offset`` on, in blocks of up to ``block_bytes``.

    One attempt, no retries (wrap it in :func:`retry_until`, restarting at the bytes received).
    On async filesystems every network wait (the request, each block) must end within
    ``timeout_s``, else the request is cancelled and ``TimeoutError`` raised. s3fs gets one
    streamed GET (``Range: bytes=offset-``) with the next block read while the caller processes
    the last; other async filesystems get ranged reads. Synchronous filesystems (``memory://``,
    SFTP) are read in the calling thread with their own timeouts.

    Raises:
        FileNotFoundError: ``url`` does not exist.
        TimeoutError: A request or block took longer than ``timeout_s``.
        OSError: Other failures of the backend (see :func:`is_transient`).
    """
    fs, path = url_to_fs(url, **dict(storage_options or {}))
    if isinstance(fs, AsyncFileSystem) and fs.async_impl:
        if hasattr(fs, "_call_s3"):
            return _iter_s3(fs, path, offset, timeout_s, block_bytes)
        return _iter_async_ranges(fs, path, offset, timeout_s, block_bytes)
    return _iter_sync(fs, path, offset, block_bytes)


def _uncached_on_miss(fs: fsspec.AbstractFileSystem, path: str, fn: Callable[[], T]) -> T:
    """Call ``fn``; if it finds no file, forget cached listings of ``path`` and call it again.

    Object-store filesystems (s3fs, gcsfs) cache directory listings per instance and answer
    "missing" from a listing taken before another process (a pool worker, another machine)
    wrote the file; a miss therefore costs one fresh look before it counts.
    """
    try:
        return fn()
    except FileNotFoundError:
        fs.invalidate_cache(path)
        return fn()


def read_bytes(url: str, **storage_options: Any) -> bytes:
    """Read a whole file. Raises ``FileNotFoundError`` when it does not exist."""
    fs, path = url_to_fs(url, **storage_options)
    return with_retries(
        lambda: _uncached_on_miss(fs, path, lambda: fs.cat_file(path)), url=url, what="read"
    )


def open_read(url: str, **storage_options: Any) -> IO[bytes]:
    """Open ``url`` for binary reading. Raises ``FileNotFoundError`` when it does not exist."""
    fs, path = url_to_fs(url, **storage_options)
    return with_retries(
        lambda: _uncached_on_miss(fs, path, lambda: fs.open(path, "rb")), url=url, what="open"
    )


@dataclass(frozen=True, slots=True)
class InputFile:
    """One input file found by :func:`list_files`.

    Attributes:
        url: Full URL (or absolute local path) of the file.
        num_bytes: Size of the file as stored (compressed size for compressed files).
        root: The directory the user named (or the file's own directory), for relative names.
    """

    url: str
    num_bytes: int
    root: str


def _is_hidden(path: str, root: str) -> bool:
    rel = relpath(path, root) if path != root else ""
    return any(part.startswith((".", "_")) for part in rel.split("/") if part)


def list_files(patterns: Iterable[str], **storage_options: Any) -> list[InputFile]:
    """Expand files, directories (recursively) and glob patterns into a list of input files.

    Files come out in the order the patterns were given, each pattern's matches sorted by path.
    Inside a directory, names starting with ``.`` or ``_`` are ignored (and the count logged),
    as pyarrow does; files named explicitly are always taken.

    Raises:
        FileNotFoundError: A path or pattern matched nothing.
    """
    found: list[InputFile] = []
    for pattern in patterns:
        url = normalize(pattern)
        fs, path = url_to_fs(url, **storage_options)
        fs.invalidate_cache(path)  # listings cached earlier may predate files written since
        if any(c in path for c in _GLOB_CHARS):
            matches = fs.glob(path, detail=True)
            root = path.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
            root = root if root.endswith(("/", os.sep)) else posixpath.dirname(root)
            entries = {p: info for p, info in matches.items() if info.get("type") != "directory"}
            if not entries:
                raise FileNotFoundError(f"{pattern}: the pattern matches no file")
        elif not fs.exists(path):
            raise FileNotFoundError(f"{pattern}: no such file or directory")
        elif fs.isdir(path):
            root = path
            all_entries = fs.find(path, detail=True)
            entries = {p: i for p, i in all_entries.items() if not _is_hidden(p, path)}
            if len(entries) < len(all_entries):
                log.info(
                    "%s: ignored %d hidden files (names starting with . or _)",
                    pattern,
                    len(all_entries) - len(entries),
                )
            if not entries:
                raise FileNotFoundError(f"{pattern}: the directory holds no file")
        else:
            root = posixpath.dirname(path) if is_url(url) else os.path.dirname(path)
            entries = {path: fs.info(path)}
        root_url = _protocol_url(fs, root.rstrip("/") or "/")
        for p in sorted(entries):
            found.append(
                InputFile(_protocol_url(fs, p), int(entries[p].get("size") or 0), root_url)
            )
    return found


class AtomicWriter:
    """A binary file written under a temporary name and published whole by :meth:`commit`.

    It hashes what it writes (sha256) and counts bytes, so the checksum costs no second read.
    Use as a context manager: leaving the block normally commits, an exception aborts.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, final_path: str, tmp_path: str) -> None:
        self._fs = fs
        self._final = final_path
        self._tmp = tmp_path
        self._local = _fs_is_local(fs)
        self._file: IO[bytes] = open(tmp_path, "wb")  # noqa: SIM115 - closed in commit/abort
        self._hash = hashlib.sha256()
        self._num_bytes = 0
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write ``data``; returns the number of bytes written."""
        self._file.write(data)
        self._hash.update(data)
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        self._num_bytes += n
        return n

    def tell(self) -> int:
        """Bytes written so far."""
        return self._num_bytes

    def flush(self) -> None:
        """Flush the temporary file."""
        self._file.flush()

    def writable(self) -> bool:
        """This is a writable stream."""
        return True

    def close(self) -> None:
        """Do nothing: writers may close their sink, but publishing needs :meth:`commit`."""

    @property
    def num_bytes(self) -> int:
        """Bytes written so far."""
        return self._num_bytes

    @property
    def sha256(self) -> str:
        """Hex sha256 of what was written so far."""
        return self._hash.hexdigest()

    def commit(self) -> None:
        """Publish the file under its final name."""
        self._file.close()
        self.closed = True
        if self._local:
            os.replace(self._tmp, self._final)
        else:
            final = self._final
            with_retries(lambda: self._fs.put_file(self._tmp, final), url=final, what="upload")
            os.unlink(self._tmp)

    def abort(self) -> None:
        """Drop the temporary file."""
        if not self._file.closed:
            self._file.close()
        self.closed = True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)

    def __enter__(self) -> AtomicWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class OutputDir:
    """A directory (local or remote) that a conversion writes into.

    Args:
        url: Local path or fsspec URL of the directory.
        storage_options: Passed to fsspec for remote URLs.
    """

    TMP_DIR = "_work/tmp"

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = normalize(url)
        self._fs, self._path = url_to_fs(self.url, **dict(storage_options or {}))
        self.local = _fs_is_local(self._fs)
        self._remote_tmp: str | None = None

    def _full(self, rel: str) -> str:
        return posixpath.join(self._path, rel)

    def _fresh(self, rel: str) -> str:
        """Full path of ``rel``, with cached listings of it and its parents forgotten.

        Pool workers and other machines write into this directory while this process looks at
        it, so a listing that s3fs cached earlier would hide their files.
        """
        full = self._full(rel) if rel else self._path
        self._fs.invalidate_cache(full)
        return full

    def url_of(self, rel: str) -> str:
        """Full URL of ``rel`` inside this directory."""
        return join(self.url, rel)

    def exists(self, rel: str) -> bool:
        """Whether ``rel`` exists."""
        return bool(self._fs.exists(self._fresh(rel)))

    def size(self, rel: str) -> int:
        """Size of ``rel`` in bytes."""
        return int(self._fs.size(self._fresh(rel)))

    def read_bytes(self, rel: str) -> bytes:
        """Read ``rel`` whole; raises ``FileNotFoundError`` when missing."""
        full = self._fresh(rel)
        return with_retries(lambda: self._fs.cat_file(full), url=self.url_of(rel), what="read")

    def list(self, rel: str = "") -> list[str]:
        """Names of the files directly in ``rel`` (empty when it does not exist)."""
        full = self._fresh(rel)
        if not self._fs.exists(full):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self._fs.ls(full, detail=False))

    def remove(self, rel: str, *, recursive: bool = False) -> None:
        """Remove ``rel`` if it exists."""
        full = self._fresh(rel)
        if self._fs.exists(full):
            self._fs.rm(full, recursive=recursive)

    def makedirs(self, rel: str = "") -> None:
        """Create ``rel`` (and parents) where the filesystem has directories."""
        self._fs.makedirs(self._full(rel) if rel else self._path, exist_ok=True)

    def open_atomic(self, rel: str, *, tmp_prefix: str = "") -> AtomicWriter:
        """Open ``rel`` for writing under a temporary name; see :class:`AtomicWriter`.

        Local temporaries live in ``_work/tmp`` of this directory (same filesystem, so the final
        rename is atomic) named ``{tmp_prefix}{basename}``; remote ones in a local temp folder.
        """
        name = tmp_prefix + posixpath.basename(rel)
        if self.local:
            tmp_dir = self._full(self.TMP_DIR)
            os.makedirs(tmp_dir, exist_ok=True)
            os.makedirs(posixpath.dirname(self._full(rel)), exist_ok=True)
        else:
            if self._remote_tmp is None:
                self._remote_tmp = tempfile.mkdtemp(prefix="shardloader-")
            tmp_dir = self._remote_tmp
        return AtomicWriter(self._fs, self._full(rel), os.path.join(tmp_dir, name))

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` atomically."""
        with self.open_atomic(rel) as f:
            f.write(data)

    def clean_tmp(self, prefix: str) -> None:
        """Remove local temporaries whose names start with ``prefix`` (left by a crash)."""
        if not self.local:
            return
        tmp_dir = self._full(self.TMP_DIR)
        if os.path.isdir(tmp_dir):
            for name in os.listdir(tmp_dir):
                if name.startswith(prefix):
                    os.unlink(os.path.join(tmp_dir, name))

    def close(self) -> None:
        """Remove the local temp folder used for remote uploads."""
        if self._remote_tmp is not None:
            shutil.rmtree(self._remote_tmp, ignore_errors=True)
            self._remote_tmp = None


# ---- writing an output: failures as StorageError with a remedy, one run per output -------------
#
# `write_error` turns an ``OSError`` from writing into a `StorageError` that names the file, the
# system's reason and a remedy (a full disk reports ``[Errno 28]`` with no path of its own);
# `writing` applies it to a block. `lock_output` keeps a second run out of a local output.

_REMEDIES = {
    errno.ENOSPC: "free space there or choose another output, then rerun (finished tasks are kept)",
    errno.EDQUOT: "free space there or choose another output, then rerun (finished tasks are kept)",
    errno.EROFS: "the output is not writable; choose another output",
    errno.EACCES: "the output is not writable; choose another output or fix its permissions",
    errno.EPERM: "the output is not writable; choose another output or fix its permissions",
    errno.ENOTDIR: "a file is in the way of the output directory; choose another output",
    errno.EEXIST: "a file is in the way of the output directory; choose another output",
    errno.EISDIR: "a directory is in the way of an output file; choose another output",
}


def write_error(url: str, err: OSError) -> StorageError:
    """A `StorageError` for ``err``, raised while writing ``url``: where, why, and what to do."""
    reason = err.strerror or str(err)
    if err.filename and os.fspath(err.filename) != url:
        reason = f"{reason}: {err.filename}"
    remedy = _REMEDIES.get(err.errno or 0, "check the output location, then rerun")
    return StorageError(f"{url}: cannot write ({reason}); {remedy}")


@contextlib.contextmanager
def writing(url: str) -> Generator[None, None, None]:
    """Turn an ``OSError`` from writing ``url`` into a `StorageError` with a remedy."""
    try:
        yield
    except ShardloaderError:
        raise
    except OSError as err:
        raise write_error(url, err) from err


def write_file(out: OutputDir, rel: str, data: bytes) -> None:
    """Write ``rel`` atomically, under a temporary name no other process uses.

    Raises:
        StorageError: Writing failed (the file, the reason, a remedy).
    """
    with writing(out.url_of(rel)):
        f = out.open_atomic(rel, tmp_prefix=f"p{os.getpid()}-")
        try:
            f.write(data)
            f.commit()
        except BaseException:
            with contextlib.suppress(OSError):  # a full disk fails the flush in close() again
                f.abort()
            raise


def lock_output(out: OutputDir, rel: str) -> int | None:
    """Lock ``out`` for this run; returns the descriptor to hold (``None``: a remote output).

    The lock is an ``flock`` on ``rel``, so the kernel drops it when its holder dies and a rerun
    after ``kill -9`` takes it at once; the file names the holder (pid and host) for the message
    a second run gets. Object stores have no locks: there, one run per output is up to the user.

    Raises:
        ConfigError: Another process holds the lock.
    """
    if not out.local:
        return None
    path = url_to_fs(out.url_of(rel))[1]
    with writing(out.url_of(rel)):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 256).decode("utf-8", "replace").split()
                os.close(fd)
                pid, host = [*holder, "?", "?"][:2]
                raise ConfigError(
                    f"{out.url}: is being written by pid {pid} on {host}; wait for it or remove "
                    f"{path} if it died"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            os.close(fd)  # its holder removed it as we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    return fd


def unlock_output(out: OutputDir, rel: str, fd: int | None) -> None:
    """Release the lock `lock_output` took (and remove its file)."""
    if fd is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(url_to_fs(out.url_of(rel))[1])
        os.close(fd)
