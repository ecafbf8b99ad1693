"""All byte I/O: the only module that talks to fsspec.

Paths are URLs (``s3://bucket/dir``, ``memory://x``) or local paths. Reads retry transient failures
with exponential backoff and jitter; writes go to a temporary name and are published whole
(``os.replace`` locally, a single PUT remotely), so a crash never leaves a half-written file under
its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any, TypeVar

import fsspec
from fsspec.core import url_to_fs as _fsspec_url_to_fs

from shardloader.errors import StorageError

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
RETRIES = 5
BACKOFF_S = 0.2


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


def _protocol_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(path) if not _fs_is_local(fs) else path


def _fs_is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def with_retries(fn: Callable[[], T], *, url: str, what: str, retries: int = RETRIES) -> T:
    """Call ``fn``, retrying transient errors with exponential backoff and jitter.

    ``FileNotFoundError`` and other permanent errors pass through at once; after the last try a
    transient error becomes a :class:`StorageError` naming the URL and the cause.
    """
    for attempt in range(retries):
        try:
            return fn()
        except _NOT_TRANSIENT:
            raise
        except Exception as err:  # noqa: BLE001 - fsspec backends raise anything
            if attempt == retries - 1:
                raise StorageError(
                    f"{url}: {what} failed after {retries} tries ({type(err).__name__}: {err})"
                ) from err
            delay = BACKOFF_S * (2**attempt) * (0.5 + random.random())
            log.warning("%s: %s failed (%s); retrying in %.2fs", url, what, err, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


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
